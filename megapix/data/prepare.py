"""`megapix prepare`: images -> palette ids in memory-mapped uint16 token shards, plus a JSON manifest.

    megapix prepare --data SPEC (--palette kmeans_centers.npy | --fit-palette) --resolution R --out DIR
                    [--shard-size N] [--workers W] [--seed S] [--val-fraction F]

Layout of DIR (read back by the "shards:DIR" source):
    manifest.json            splits, shard files (count, bytes, sha256), resolution, palette, settings
    palette.npy              the palette used (a byte copy of --palette, or the one fitted on train)
    {split}-NNNNN.npy        uint16 [n, R*R] palette ids, raster order
    {split}-labels.npy       int64 [N] (when the source has labels)

Shards are written under a temporary name and renamed when complete; the manifest is rewritten (atomically)
after each shard. Re-running with the same arguments skips shards that the manifest lists as done and whose
size matches, removes stale temporary files, and redoes the rest. Shards are encoded in parallel by W worker
processes (W=1 runs in this process). Each worker receives what the opened source's `for_workers()` gives:
the sharded sources send their index, built once by this process; the others are opened again from the spec.
The index goes through a queue once the workers run, not in their spawn payload: a payload larger than a pipe's
buffer holds the driver until that child has imported torch, so the workers started one after another.

Shards hold the evaluation view of each image (no augmentation): random crops cannot be precomputed. Token
sources (igpt:, shards:) are copied into shards without a palette.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
import queue
import shutil
import sys
import warnings

import numpy as np

from megapix.config import VOCAB_SIZE, ConfigError
from megapix.data.files import MANIFEST, SHARDS_FORMAT, open_shard, read_manifest
from megapix.data.palette import LUT_FULL_AFTER, Palette
from megapix.data import splits as data_splits
from megapix.data.sources import SPLITS, open_source
from megapix.errors import DataError
from megapix.runfolder import preallocate
from megapix.utils import atomic_path, write_json

PALETTE_FILE = "palette.npy"
ENCODE_BATCH = 512  # images encoded per step inside a shard


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.npy"


def _tmp_name(final: str) -> str:
    d, b = os.path.split(final)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}")


def _clean_stale(out: str) -> None:
    """Remove what an interrupted run left half-written: our shard temp files and atomic_path temp dirs."""
    for p in glob.glob(os.path.join(out, ".*.tmp-*")):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)


# ---- the per-shard work (runs in worker processes, or inline when workers == 1) ----
_STATE: dict = {}


SOURCE_WAIT_S = 600  # how long a worker waits for the driver's index (a respawned worker would wait forever)


def _init_worker(box, open_args, palette_file, threads=1):
    """`box`: a queue holding the driver's source as pickled bytes of its for_workers(), one copy per worker, or
    None: open `open_args` (the spec) again.
    An error is kept and raised by the first shard: a Pool whose initializer raises starts new workers forever."""
    try:
        import torch

        torch.set_num_threads(threads)
        if box is not None:
            try:  # bytes this run's driver pickled a moment ago, through the pool's own kind of pipe
                _STATE["src"] = pickle.loads(box.get(timeout=SOURCE_WAIT_S))
            except queue.Empty:
                raise DataError(f"a prepare worker got no source from the driver in {SOURCE_WAIT_S} s; run "
                                "prepare again (it resumes)") from None
        else:
            spec, resolution, val_fraction, seed, skip_corrupt = open_args
            with warnings.catch_warnings():  # the driver already warned of what indexing skipped
                warnings.simplefilter("ignore")
                _STATE["src"] = open_source(spec, resolution, val_fraction, seed, augment=False,
                                            skip_corrupt=skip_corrupt)
        # from the file prepare wrote into --out, so its cached colour table (palette.lut.npz) is shared
        _STATE["palette"] = None if palette_file is None else Palette.load(palette_file)
    except Exception as e:  # noqa: BLE001 - re-raised, whatever it is, by _encode_shard in the driver's pool
        _STATE["init_error"] = e


def _encode_shard(task) -> tuple:
    if "init_error" in _STATE:
        raise _STATE["init_error"]
    split, i, start, stop, path = task
    src, palette = _STATE["src"], _STATE["palette"]
    skipped_before = getattr(src, "skipped", 0)  # sharded sources count damaged samples (--skip-corrupt)
    s = src.split(split)
    data = s.tokens if s.tokens is not None else s.images
    T = None
    tmp = _tmp_name(path)
    mm = None
    try:
        for b in range(start, stop, ENCODE_BATCH):
            chunk = data[b:min(b + ENCODE_BATCH, stop)]
            if s.tokens is not None:
                ids = np.asarray(chunk)
                if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
                    raise ConfigError(f"token ids outside [0, {VOCAB_SIZE}) in {split} rows {b}..; not palette ids")
            else:
                ids = palette.encode(np.asarray(chunk))
            if mm is None:
                T = ids.shape[1]
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(stop - start, T))
                preallocate(tmp)  # a full disk is one line here, never a SIGBUS in a mapped write
            mm[b - start:b - start + len(ids)] = ids
        if mm is None:  # an empty shard cannot happen (shards cover >= 1 row), but stay total
            raise ConfigError(f"{split} shard {i} is empty")
        mm.flush()
        del mm
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return split, i, os.path.getsize(path), sha256_file(path), getattr(src, "skipped", 0) - skipped_before


# ---- the driver ----
def _build_table_beside_workers(pal: Palette) -> None:
    """Build the palette's whole colour table while the pool's workers start (seconds of imports) and cache it in
    --out, where each worker's first encode loads it. Without this every worker searches the same colours and, past
    LUT_FULL_AFTER distinct ones (the pixels to encode bound them), builds the whole table itself. One intra-op
    thread: the workers hold the other cores, and two threads among them took 4.1 s here against 2.5 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pal.build_table()
    finally:
        torch.set_num_threads(threads)


def _plan(src, shard_size: int) -> dict:
    splits = {}
    for name in SPLITS:
        s = src.split(name)
        same = next((o for o in splits if src.split(o) is s), None)
        n = len(s)
        splits[name] = {
            "count": n,
            "same_as": same,
            "shards": [{"file": shard_name(same or name, i), "count": min(shard_size, n - st), "start": st}
                       for i, st in enumerate(range(0, n, shard_size))],
            "labels": None if s.labels is None else f"{same or name}-labels.npy",
        }
    return splits


def _resolve_palette(src, spec, out, palette, fit, seed, old, tokens_only):
    """-> (Palette | None, manifest palette entry)."""
    dst = os.path.join(out, PALETTE_FILE)
    if palette is not None and fit:
        raise ConfigError("pass either --palette FILE or --fit-palette, not both")
    if palette is not None:
        pal = Palette.load(palette)  # validates shape, range, readability
        sha = sha256_file(palette)
        if not (os.path.isfile(dst) and sha256_file(dst) == sha):
            with atomic_path(dst) as tmp:
                shutil.copyfile(palette, tmp)
        return pal, {"file": PALETTE_FILE, "sha256": sha, "from": os.path.abspath(palette)}
    if fit:
        prev = (old or {}).get("palette") or {}
        if prev.get("from") == "fit" and os.path.isfile(dst) and sha256_file(dst) == prev.get("sha256"):
            return Palette.load(dst), prev  # resume: the fit is deterministic, keep the one already made
        train = src.split("train")
        if train.images is None:
            raise ConfigError(f"{spec}: holds tokens, not images; it needs no palette (drop --fit-palette)")
        pal = data_splits.fit_palette(train.images, seed)  # the one fit rule, the same as training
        pal.save(dst)
        return pal, {"file": PALETTE_FILE, "sha256": sha256_file(dst), "from": "fit"}
    if tokens_only:
        return None, None
    raise ConfigError("prepare needs a palette to encode images: pass --palette kmeans_centers.npy "
                      "or --fit-palette (k-means on the train split)")


def prepare(spec: str, out: str, *, resolution: int, palette: str | None = None, fit_palette: bool = False,
            shard_size: int = 65536, workers: int = 1, seed: int = 0, val_fraction: float | None = None,
            progress: bool = True, skip_corrupt: bool = False) -> dict:
    """Encode every split of `spec` into token shards under `out`; returns the manifest. Resumable.
    `skip_corrupt`: a sharded source's damaged samples are skipped and counted in the manifest's "skipped"
    (found while indexing, and replaced while encoding shard by shard)."""
    src, tokens_only = _checked_source(spec, resolution, palette, fit_palette, shard_size, workers, seed, val_fraction,
                                       skip_corrupt)
    out = os.path.abspath(out)
    old = _old_manifest(out)
    settings = {"source": spec, "resolution": resolution, "seed": seed, "val_fraction": val_fraction,
                "shard_size": shard_size, "palette": "fit" if fit_palette else
                (sha256_file(palette) if palette and os.path.isfile(palette) else palette)}
    if skip_corrupt:  # only then: a folder prepared before the option existed still resumes
        settings["skip_corrupt"] = True
    if old is not None and old.get("settings") != settings:
        diff = sorted(k for k in settings if (old.get("settings") or {}).get(k) != settings[k])
        raise ConfigError(f"--out {out!r} holds shards prepared with different settings ({', '.join(diff)}); "
                          "use a new --out directory or delete the old one")
    pal, pal_entry = _resolve_palette(src, spec, out, palette, fit_palette, seed, old, tokens_only)  # fit, then write
    os.makedirs(out, exist_ok=True)
    _clean_stale(out)
    splits = _plan(src, shard_size)
    _carry_over(splits, (old or {}).get("splits", {}))
    manifest = {"format": SHARDS_FORMAT, "version": 1, "complete": False, "settings": settings,
                "resolution": resolution, "tokens_per_image": resolution**2, "dtype": "uint16",
                "num_classes": src.num_classes, "palette": pal_entry, "splits": splits,
                "skipped": {"indexing": getattr(src, "skipped", 0)}}
    write_json(os.path.join(out, MANIFEST), manifest)
    for name, info in splits.items():  # labels are small: write them here
        if info["labels"] and not info["same_as"]:
            with atomic_path(os.path.join(out, info["labels"])) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.asarray(src.split(name).labels, dtype=np.int64))
    palette_file = None if pal is None else os.path.join(out, PALETTE_FILE)
    if pal is not None:
        pal = Palette.load(palette_file)  # the copy in --out: its colour table is cached there
    _encode_all(src, pal, manifest, out, _todo(splits, out, resolution**2), resolution**2, workers, progress,
                (src.for_workers(), (spec, resolution, val_fraction, seed, skip_corrupt), palette_file))
    for info in splits.values():
        if info["same_as"]:
            info["shards"] = splits[info["same_as"]]["shards"]
    manifest["skipped"]["decoding"] = sum(s.get("skipped", 0) for info in splits.values() if not info["same_as"]
                                          for s in info["shards"])
    manifest["complete"] = True
    write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _checked_source(spec, resolution, palette, fit_palette, shard_size, workers, seed, val_fraction, skip_corrupt):
    """The opened source and whether it holds tokens already, after every check that needs no output folder."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size={shard_size} must be >= 1 (images per shard)")
    if workers < 1:
        raise ConfigError(f"--workers={workers} must be >= 1")
    if palette is not None:
        Palette.load(palette)  # a missing or bad palette file fails here, before anything is written
    if palette is not None and fit_palette:
        raise ConfigError("pass either --palette FILE or --fit-palette, not both")
    src = open_source(spec, resolution, val_fraction, seed, augment=False, skip_corrupt=skip_corrupt)
    tokens_only = src.split("train").tokens is not None
    if palette is None and not fit_palette and not tokens_only:
        raise ConfigError("prepare needs a palette to encode images: pass --palette kmeans_centers.npy "
                          "or --fit-palette (k-means on the train split)")
    return src, tokens_only


def _old_manifest(out: str) -> dict | None:
    """The manifest of an earlier run into `out` (resumed), None for a new or empty folder; a folder of other
    .npy files, or a file, is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} exists and is not a directory; choose a directory")
    old = read_manifest(out) if os.path.isfile(os.path.join(out, MANIFEST)) else None
    if old is None and os.path.isdir(out) and any(f.endswith(".npy") and f != PALETTE_FILE for f in os.listdir(out)):
        raise ConfigError(f"--out {out!r} holds .npy files but no {MANIFEST}; use an empty or new directory")
    return old


def _carry_over(splits: dict, old_splits: dict) -> None:
    """Shards an earlier run finished keep their size and checksum in the new plan."""
    for name, info in splits.items():
        prev = {s["file"]: s for s in old_splits.get(name, {}).get("shards", [])}
        for s in info["shards"]:
            p = prev.get(s["file"])
            if p and p.get("sha256") and p.get("count") == s["count"]:
                s["bytes"], s["sha256"] = p["bytes"], p["sha256"]


def _todo(splits: dict, out: str, tokens: int) -> list[tuple]:
    """The shards left to encode: (split, index, first row, end row, path). A shard renamed into place before the
    run died (complete, but not yet in the manifest) is checked and kept; a damaged one is removed and redone."""
    todo = []
    for name, info in splits.items():
        if info["same_as"]:
            continue
        for i, s in enumerate(info["shards"]):
            path = os.path.join(out, s["file"])
            if s.get("sha256") and os.path.isfile(path) and os.path.getsize(path) == s["bytes"]:
                continue  # done in an earlier run
            if os.path.isfile(path):
                try:
                    open_shard(path, s["count"], tokens)
                    s["bytes"], s["sha256"] = os.path.getsize(path), sha256_file(path)
                    continue
                except ConfigError:
                    os.remove(path)
            s.pop("sha256", None)
            s.pop("bytes", None)
            todo.append((name, i, s["start"], s["start"] + s["count"], path))
    return todo


def _encode_all(src, pal, manifest: dict, out: str, todo: list, tokens: int, workers: int, progress: bool,
                worker_args) -> None:
    """Encode the shards in `todo` (in this process, or a pool of `workers`), the manifest rewritten after each."""
    from tqdm import tqdm

    by_key = {(name, i): s for name, info in manifest["splits"].items() for i, s in enumerate(info["shards"])}
    bar = tqdm(total=sum(t[3] - t[2] for t in todo), unit="img", desc=f"prepare {os.path.basename(out)}",
               disable=not progress, file=sys.stderr)

    def done(result):
        name, i, nbytes, sha, skipped = result
        s = by_key[(name, i)]
        s["bytes"], s["sha256"], s["skipped"] = nbytes, sha, skipped
        write_json(os.path.join(out, MANIFEST), manifest)
        bar.update(s["count"])

    try:
        if workers == 1 or len(todo) <= 1:
            _STATE["src"], _STATE["palette"] = src, pal  # in this process: reuse what is already open
            for t in todo:
                done(_encode_shard(t))
        else:
            import multiprocessing as mp

            # spawn, not fork: workers use torch, whose thread pools are not fork-safe once used.
            ctx = mp.get_context("spawn")
            sent, open_args, palette_file = worker_args
            n = min(workers, len(todo))
            box = None if sent is None else ctx.Queue()
            if box is not None:  # a copy no worker took (one failed to start) must not hold this process at exit
                box.cancel_join_thread()
            with ctx.Pool(n, initializer=_init_worker, initargs=(box, open_args, palette_file)) as pool:
                if box is not None:
                    payload = pickle.dumps(sent, protocol=pickle.HIGHEST_PROTOCOL)
                    for _ in range(n):  # the queue's feeder thread writes as each worker reads: no wait here
                        box.put(payload)
                if pal is not None and sum(t[3] - t[2] for t in todo) * tokens >= LUT_FULL_AFTER:
                    _build_table_beside_workers(pal)
                for r in pool.imap_unordered(_encode_shard, todo):
                    done(r)
    finally:
        bar.close()
        _STATE.clear()


