"""A run's data: open the source, settle its palette (the ONE fit/reuse rule), wrap the splits as TokenData.

The palette fit rule (used by training, fine-tuning and `megapix prepare --fit-palette`): k-means with k = 512 on
every pixel of a seeded sample of the train images, at most FIT_PIXELS pixels (all images when they hold fewer).

The run folder always holds the palette its model is trained with, as <out>/palette.npy, with a record beside it
(<out>/palette.json: where it came from, the data spec and settings of the fit, the sample size, the sha256 of
palette.npy). A palette.npy already in --out (an earlier run, a resumed run, a run that failed after fitting) is
reused only when its record says it was made the way this run would make it; anything else is refused in one
line naming both and the fix, never overwritten and never silently reused.
"""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from megapix.config import VOCAB_SIZE, Config, ConfigError
from megapix.data.loader import TokenData
from megapix.data.palette import Palette
from megapix.data.sources import SPLITS, open_source
from megapix.parallel import dist
from megapix.utils import atomic_path, read_json, write_json

PALETTE_FILE = "palette.npy"
RECORD_FILE = "palette.json"
RECORD_FORMAT = "megapix-palette"
FIT_PIXELS = 4_000_000  # pixels in the k-means sample (4M: ~3.9k 32x32 images, ~1k 64x64)
FIT_ITERS = 30
FIT_TOL = 1e-6


def fit_settings(max_pixels: int = FIT_PIXELS) -> dict:
    """The fit settings a record stores and a reuse compares (the seed is stored beside them)."""
    return {"k": VOCAB_SIZE, "max_pixels": int(max_pixels), "iters": FIT_ITERS, "tol": FIT_TOL,
            "rule": "seeded sample of train images, every pixel"}


def fit_sample(images, seed: int, max_pixels: int = FIT_PIXELS) -> np.ndarray:
    """The seeded sample of train images the palette is fitted on: uint8 [n, H, W, 3]."""
    n = len(images)
    if n == 0:
        raise ConfigError("the training split is empty: no images to fit a palette on; check the data path")
    per_image = int(images.shape[1]) * int(images.shape[2])
    take = min(n, max(1, int(max_pixels) // per_image))
    idx = np.sort(np.random.default_rng(seed).choice(n, take, replace=False))
    return np.asarray(images[idx])


def fit_palette(images, seed: int, max_pixels: int = FIT_PIXELS) -> Palette:
    """THE palette fit: 512-means on every pixel of fit_sample(images, seed, max_pixels)."""
    sample = fit_sample(images, seed, max_pixels)
    return Palette.fit(sample.reshape(-1, 3), k=VOCAB_SIZE, seed=seed, iters=FIT_ITERS, tol=FIT_TOL)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256(f.read())


def _npy_bytes(palette: Palette) -> bytes:
    buf = io.BytesIO()
    np.save(buf, palette.centres, allow_pickle=False)
    return buf.getvalue()


def read_palette_record(out: str) -> dict | None:
    """The palette record in `out`, or None when there is none or it is unreadable (torn, edited)."""
    rec = read_json(os.path.join(out, RECORD_FILE))
    return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT else None


def checked_run_palette(run: str) -> str | None:
    """<run>/palette.npy, after checking that it is the palette the run was trained with (its sha256 is the one
    palette.json records); None when the folder holds no palette.npy. Every command that reads a run's palette
    (sample, extract, export, finetune) goes through here: a swapped or edited file is refused in one line."""
    saved = os.path.join(run, PALETTE_FILE)
    if not os.path.isfile(saved):
        return None
    path = os.path.join(run, RECORD_FILE)
    fix = ("restore the palette the run was trained with, or name a palette explicitly with --palette FILE "
           "(sample, extract, finetune)")
    rec = read_json(path)
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        state = "is missing" if not os.path.lexists(path) else "is torn or not a megapix palette record"
        raise ConfigError(f"{path} {state}, so {saved} cannot be checked against the run; {fix}")
    sha = rec.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ConfigError(f"{path}: field 'sha256' is {sha!r}, not a sha256 hex digest; {fix}")
    if _file_sha256(saved) != sha:
        raise ConfigError(f"{saved} does not match the sha256 in {path} (swapped or edited since the run wrote "
                          f"it); {fix}")
    return saved


def _describe(rec: dict) -> str:
    if rec.get("from") != "fit":
        return f"copied from --palette {rec.get('from')!r}"
    return (f"fitted on data {rec.get('data')!r} (resolution {rec.get('resolution')}, val_fraction "
            f"{rec.get('val_fraction')}, seed {rec.get('seed')}, fit {rec.get('fit')})")


def settle_palette(out: str, wanted: str, images=None, *, data: str = "", resolution: int = 0,
                   val_fraction=None, seed: int = 0, max_pixels: int = FIT_PIXELS) -> str:
    """Make <out>/palette.npy the palette this run uses, or refuse. `wanted` is "fit" or a palette file.

    Returns the path of <out>/palette.npy. Run it on one rank only (load_splits does); it writes the record
    first and the palette second, both atomically, so a crash leaves either nothing or a record without a
    palette (which the next run simply redoes), never a palette without its record.
    """
    saved = os.path.join(out, PALETTE_FILE)
    fix_other = f"choose another --out, or pass --palette {saved} to train on the palette already there"
    want = {"from": "fit", "data": data, "resolution": int(resolution), "val_fraction": val_fraction,
            "seed": int(seed), "fit": fit_settings(max_pixels)}
    given = None
    if wanted != "fit":
        Palette.load(wanted)  # a missing or bad file fails here, with its own line
        with open(wanted, "rb") as f:
            given = f.read()
        want = {"from": os.path.abspath(wanted)}
    if os.path.isdir(saved) or (os.path.exists(out) and not os.path.isdir(out)):
        raise ConfigError(f"--out {out!r} cannot hold {PALETTE_FILE} (a directory of that name, or --out is a "
                          "file); choose another --out")

    if os.path.isfile(saved):
        sha = _file_sha256(saved)
        rec = read_palette_record(out)
        if given is not None and _sha256(given) == sha:
            if rec is None or rec.get("sha256") != sha:  # the user vouches for these exact bytes
                write_json(os.path.join(out, RECORD_FILE), {"format": RECORD_FORMAT, "version": 1, **want,
                                                            "sha256": sha})
            return saved
        if rec is None or rec.get("sha256") != sha:
            raise ConfigError(f"--out {out!r} holds a {PALETTE_FILE} with no matching record {RECORD_FILE} (left "
                              f"by another run or edited), so it cannot be checked against data {data!r}; "
                              f"{fix_other}")
        if given is not None:
            raise ConfigError(f"--out {out!r} holds a {PALETTE_FILE} {_describe(rec)}, which differs from "
                              f"--palette {wanted!r}; {fix_other}")
        same = rec.get("from") == "fit" and all(rec.get(k) == v for k, v in want.items())
        if not same:
            raise ConfigError(f"--out {out!r} holds a {PALETTE_FILE} {_describe(rec)}, but this run would fit one "
                              f"on data {data!r} (resolution {resolution}, val_fraction {val_fraction}, seed "
                              f"{seed}, fit {fit_settings(max_pixels)}); {fix_other}")
        return saved

    extra = {}
    if given is None:
        sample = fit_sample(images, seed, max_pixels)
        extra = {"sample": {"images": int(len(sample)), "pixels": int(sample.shape[0] * sample.shape[1]
                                                                        * sample.shape[2])}}
        palette = Palette.fit(sample.reshape(-1, 3), k=VOCAB_SIZE, seed=seed, iters=FIT_ITERS, tol=FIT_TOL)
        given = _npy_bytes(palette)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, RECORD_FILE), {"format": RECORD_FORMAT, "version": 1, **want, **extra,
                                                "sha256": _sha256(given)})
    with atomic_path(saved) as tmp:
        with open(tmp, "wb") as f:
            f.write(given)
    return saved


def load_splits(cfg: Config, out: str) -> tuple[dict[str, TokenData], Palette | None]:
    """Open cfg.data.source, settle the palette and return ({"train"|"val"|"test": TokenData}, Palette | None).

    Image sources: --palette FILE, else a palette fitted (rank 0, once) on the train split by fit_palette's rule;
    either way copied to <out>/palette.npy with its record (see the module docstring for the reuse rule).
    Token sources need no palette; one is kept when --palette is given (or a shard folder names its own), so
    that samples can be decoded. Every rank returns the same palette, read from <out>/palette.npy.
    """
    m, d = cfg.model, cfg.data
    source = open_source(d.source, m.resolution, d.val_fraction, cfg.train.seed, d.augment, d.skip_corrupt)
    splits = {name: source.split(name) for name in SPLITS}
    images = splits["train"].images
    wanted = d.palette
    if wanted is None and images is not None:
        wanted = "fit"
    own = getattr(source, "palette_path", None)  # shards encoded with a palette
    if own and wanted and os.path.isfile(own) and os.path.isfile(wanted) \
            and _file_sha256(own) != _file_sha256(wanted):
        raise ConfigError(f"--palette {wanted!r} differs from the palette {own!r} that the shards of "
                          f"{d.source!r} were encoded with; drop --palette or pass that file")
    if wanted is None and own and os.path.isfile(own):
        wanted = own
    palette = None
    if wanted is not None:
        out = os.path.abspath(out)
        saved = dist.rank0_decides(lambda: settle_palette(
            out, wanted, images, data=d.source, resolution=m.resolution, val_fraction=d.val_fraction,
            seed=cfg.train.seed))
        palette = Palette.load(saved or os.path.join(out, PALETTE_FILE))
    return {name: TokenData(s, m.n_ctx, palette, f"{d.source} [{name}]") for name, s in splits.items()}, palette
