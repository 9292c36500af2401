"""Offline feature extraction for linear probes: `megapix extract`.

The probe feature of layer l (the paper, section 3.3): the mean over positions of layer_norm(h_l), where h_l is
the input of block l and the norm is that block's first norm (`blocks[l].norm_1`); for l = n_layer it is the
final norm (`norm_f`) of the last block's output. Several layers are concatenated in the order given.

`extract` runs the blocks only up to max(layers) and pools each requested layer as soon as its input exists, so
at no point is more than one layer's activation alive and pooling happens on the model's device.

`megapix extract` shards each split over the ranks of any launcher (torchrun, deepspeed, mpiexec, srun, plain
python = one rank). The rows are cut into fixed chunks; rank r takes a contiguous range of chunks and writes
its rows straight into a shared memory-mapped `.npy`. After a chunk's rows are flushed, the chunk is recorded
in the rank's progress file (written atomically), so a killed run restarted with the same command skips the
chunks already done, even under a different number of ranks. When every rank is done, rank 0 renames
`{split}_features.npy.partial` to `{split}_features.npy`, writes the labels and finally `manifest.json`
(with "complete": true). No pickle anywhere.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from megapix import runfolder
from megapix.checkpoint import load_model_and_palette
from megapix.cliargs import parse_command
from megapix.config import ConfigError, ExtractConfig
from megapix.data.loader import TokenData
from megapix.data.sources import SPLITS, open_source
from megapix.model import check_tokens
from megapix.parallel import dist as pdist
from megapix.parallel.launch import MPI_RANK_VARS, init_distributed
from megapix.utils import read_json

PROGRESS_DIR = ".extract_progress"
FORMAT = "megapix-features"
STOP_ENV = "MEGAPIX_EXTRACT_STOP_AFTER_CHUNKS"  # test hook: hard-exit (like SIGKILL) after this many chunks


# ----------------------------------------------------------------------------------------------------------
# the library function
# ----------------------------------------------------------------------------------------------------------
def check_layers(layers, n_layer: int) -> list[int]:
    layers = [int(x) for x in layers]
    if not layers:
        raise ConfigError("no layers requested; pass e.g. --layers 3,4,5 or --layers all")
    bad = [x for x in layers if not 0 <= x <= n_layer]
    if bad:
        raise ConfigError(f"layer index {bad[0]} is out of range; this model has layers 0..{n_layer} "
                          f"({n_layer} = after the final norm)")
    return layers


@torch.inference_mode()
def extract(model, tokens, layers, batch_size: int = 256, device=None, autocast_dtype=None,
            out_dtype=torch.float32, cp_group=None) -> torch.Tensor:
    """Pooled, normed features: float tensor [N, len(layers) * d_model] (see the module docstring).

    tokens: palette ids [N, T] (tensor or array). BERT models see the unmasked input. The result stays on
    the model's device; `batch_size` rows are processed at a time. cp_group: the model is context-parallel
    (megapix.parallel.context.apply_context_parallel over that group; every rank of it passes the same rows).
    """
    layers = check_layers(layers, model.config.n_layer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens = torch.as_tensor(tokens)
    check_tokens(tokens, model.config.n_positions)  # once for all rows, before any work
    n, d = tokens.shape[0], model.config.d_model
    out = torch.empty((n, len(layers) * d), dtype=out_dtype, device=device)
    for lo in range(0, n, batch_size):
        batch = tokens[lo:lo + batch_size].to(device, non_blocking=True).long()
        out[lo:lo + len(batch)] = _pooled(model, batch, layers, autocast_dtype, cp_group).to(out_dtype)
    return out


def _pooled(model, tokens: torch.Tensor, layers: list[int], autocast_dtype=None, cp_group=None) -> torch.Tensor:
    """[B, len(layers) * d] float32 for one batch; blocks beyond max(layers) are never run."""
    ctx = (torch.autocast(tokens.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(tokens.device.type, enabled=False))
    if cp_group is not None:  # each rank's positions' sums, all-reduced over the CP group
        from megapix.parallel.context import pooled_features

        with ctx:
            return pooled_features(model, tokens, layers, cp_group)
    with ctx:
        # no mask: the paper's features of unmasked input (BERT too); each layer is pooled as soon as it exists
        pooled = {l: x.float().mean(dim=1) for l, x in model.hidden_states(tokens, layers)}
    return torch.cat([pooled[l] for l in layers], dim=1)


# ----------------------------------------------------------------------------------------------------------
# layer specs
# ----------------------------------------------------------------------------------------------------------
def parse_layers(spec: str | None, n_layer: int, center: int | None = None, span: int | None = None) -> list[int]:
    """'3,4,5' | '2-6' (inclusive) | '2:7' (python-style, end excluded) | 'all' | center/span (e.g. 5 layers
    centred at L, clipped to the model) -> validated list of layer indices in 0..n_layer."""
    if center is not None:
        if spec not in (None, ""):
            raise ConfigError("pass either --layers or --center/--span, not both")
        span = 5 if span is None else span
        if span < 1:
            raise ConfigError(f"--span {span} must be >= 1")
        check_layers([center], n_layer)
        lo = max(0, min(center - span // 2, n_layer + 1 - span))
        return check_layers(range(lo, min(n_layer, lo + span - 1) + 1), n_layer)
    if span is not None:
        raise ConfigError("--span needs --center")
    spec = (spec or "all").replace(" ", "")
    if spec == "all":
        return list(range(n_layer + 1))
    out: list[int] = []
    try:
        for part in spec.split(","):
            if ":" in part:
                a, b = part.split(":")
                out += list(range(int(a), int(b)))
            elif "-" in part:
                a, b = part.split("-", 1)
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"cannot parse --layers {spec!r}; use '3,4,5', '2-6', '2:7' or 'all'") from None
    if not out:
        raise ConfigError(f"--layers {spec!r} selects no layer")
    if len(set(out)) != len(out):
        raise ConfigError(f"--layers {spec!r} repeats a layer")
    return check_layers(out, n_layer)


# ----------------------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """The options of `megapix extract` (flags generated from config.ExtractConfig): a validated ExtractConfig."""
    return parse_command("megapix extract", __doc__.splitlines()[0], ExtractConfig, argv, launcher=True)


def _launched() -> bool:
    env = os.environ
    return (("RANK" in env and "WORLD_SIZE" in env) or ("SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env)
            or any(v in env for v in MPI_RANK_VARS))


class Dist:
    """Rank, world and barrier: torch.distributed when launched, a world of one otherwise."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.started = False
        if _launched() and not dist.is_initialized():
            self.started = True
            init_distributed()
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def barrier(self):
        if self.on and self.world > 1:
            self.dist.barrier()


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def chunk_ranges(n_chunks: int, world: int, rank: int) -> range:
    """Rank `rank`'s contiguous range of chunk indices."""
    return range(n_chunks * rank // world, n_chunks * (rank + 1) // world)


def done_chunks(progress: str, split: str) -> set[int]:
    """Chunks recorded as complete by any rank of any earlier attempt (the world size may have changed)."""
    done: set[int] = set()
    for path in glob.glob(os.path.join(progress, f"{split}.rank*.json")):
        rec = read_json(path)  # a progress file is only ever replaced atomically; an unreadable one records nothing
        if isinstance(rec, dict) and isinstance(rec.get("done"), list):
            done.update(rec["done"])
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    dist = Dist()
    try:
        runfolder.claim(args.out, "extract", "megapix extract")  # one writer, and only into an extraction's folder
        job, error = None, None
        try:
            job = _prepare(args, dist)
        except ConfigError as e:
            error = e
        error = pdist.shared_error(error)  # one rank's bad input stops every rank, with the same line
        if error is not None:
            raise error
        return _run(job, args, dist)
    finally:
        if dist.started:
            dist.dist.destroy_process_group()


def _prepare(args, dist: Dist) -> dict:
    if not os.path.exists(args.checkpoint):
        raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist; pass a training --out folder, "
                          "a checkpoint tag folder or an HF/megapix export directory")
    splits = [s for s in args.splits.split(",") if s]
    for s in splits:
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r} in --splits; choose from {', '.join(SPLITS)}")
    cp = args.context_parallel
    if dist.world % cp:
        raise ConfigError(f"--context-parallel {cp} does not divide the {dist.world} ranks; launch a multiple of {cp} "
                          "ranks or change --context-parallel")
    model, palette, data = load_model_and_palette(args.checkpoint, args.palette, args.data)
    if cp > 1 and model.config.n_ctx % (2 * cp):
        raise ConfigError(f"--context-parallel {cp} cuts the {model.config.n_ctx} positions into 2 x {cp} chunks (a "
                          f"head and a tail per rank), which does not divide them; use a degree whose double divides "
                          f"{model.config.n_ctx}")
    layers = parse_layers(args.layers, model.config.n_layer, args.center, args.span)
    source = open_source(data, model.config.resolution, args.val_fraction, args.seed, augment=False)
    token_data = {s: TokenData(source.split(s), model.config.n_ctx, palette, f"{data} [{s}]") for s in splits}
    device = rank_device(args.device)
    model = model.to(device).eval()
    run = {"format": FORMAT, "checkpoint": os.path.abspath(args.checkpoint), "data": data, "layers": layers,
           "d_model": model.config.d_model, "dtype": args.dtype, "chunk_size": args.chunk_size,
           "seed": args.seed, "val_fraction": args.val_fraction,
           "counts": {s: len(t) for s, t in token_data.items()}}
    return {"model": model, "device": device, "layers": layers, "data": token_data, "run": run,
            "autocast": torch.bfloat16 if args.precision == "bf16" else None}


def rank_device(name: str | None) -> torch.device:
    """--device, else this rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _context_parallel(job: dict, cp: int, dist: Dist):
    """Groups of cp consecutive ranks (every rank creates every group, in order), this rank's group and its model
    made context-parallel; (group, group index, groups). cp = 1: (None, rank, world)."""
    if cp == 1:
        return None, dist.rank, dist.world
    from megapix.parallel.context import apply_context_parallel

    groups = [dist.dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(dist.world // cp)]
    mine = groups[dist.rank // cp]
    apply_context_parallel(job["model"], mine, job["model"].config.n_ctx)
    return mine, dist.rank // cp, dist.world // cp


def _run(job: dict, args, dist: Dist) -> int:
    out = os.path.abspath(args.out)
    progress = os.path.join(out, PROGRESS_DIR)
    run, layers, model = job["run"], job["layers"], job["model"]
    manifest_path = os.path.join(out, "manifest.json")
    width = len(layers) * run["d_model"]
    dtype = np.dtype(args.dtype)

    def decide() -> str:
        """Fresh or resumed ("go"), or already complete ("done"); another run's folder is refused."""
        os.makedirs(out, exist_ok=True)
        if args.overwrite:
            _clear(out, list(job["data"]))
        run_path = os.path.join(progress, "run.json")
        if os.path.isfile(manifest_path):
            old = read_json(manifest_path)
            same = (isinstance(old, dict) and old.get("complete")
                    and all(old.get(k) == run[k] for k in ("checkpoint", "data", "layers", "dtype"))
                    and all(old.get("counts", {}).get(s) == c for s, c in run["counts"].items()))
            if same:
                return "done"
            raise ConfigError(f"{out} already holds a different extraction (manifest.json); pass --overwrite or "
                              "another --out")
        if os.path.isfile(run_path) and read_json(run_path) != run:
            raise ConfigError(f"{out} holds a partial extraction with other settings ({PROGRESS_DIR}/run.json); "
                              "rerun with the same flags to resume, or pass --overwrite")
        os.makedirs(progress, exist_ok=True)
        _atomic_json(run_path, run)
        for split, td in job["data"].items():
            part = os.path.join(out, f"{split}_features.npy.partial")
            if not _usable_partial(part, (len(td), width), dtype):
                for p in glob.glob(os.path.join(progress, f"{split}.rank*.json")):
                    os.remove(p)
                with runfolder.disk_errors(part):
                    mm = np.lib.format.open_memmap(part, mode="w+", dtype=dtype, shape=(len(td), width))
                    mm.flush()
                    del mm
            # every block on disk now: a full disk is one line here, never a SIGBUS in a mapped write
            runfolder.preallocate(part)
        return "go"

    # rank 0 decides: fresh, resume, or already complete; every rank then opens the same files
    if pdist.rank0_decides(decide) == "done":
        if dist.rank == 0:
            print(f"megapix extract: {manifest_path} is already complete for these settings; nothing to do", flush=True)
        return 0

    cp_group, shard, shards = _context_parallel(job, args.context_parallel, dist)
    writer = dist.rank % args.context_parallel == 0  # one rank of each CP group writes its group's rows
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    chunks_run = 0
    t0 = time.perf_counter()
    rows_done = 0
    for split, td in job["data"].items():
        n, C = len(td), args.chunk_size
        n_chunks = -(-n // C)
        part = os.path.join(out, f"{split}_features.npy.partial")
        mine = chunk_ranges(n_chunks, shards, shard)
        done = done_chunks(progress, split)
        todo = [c for c in mine if c not in done]
        my_done = sorted(c for c in mine if c in done)
        if cp_group is not None:  # a CP group's ranks must agree on their chunks: read before any rank records more
            dist.barrier()
        prog_file = os.path.join(progress, f"{split}.rank{dist.rank}of{dist.world}.json")
        bar = tqdm(total=sum(min(C, n - c * C) for c in mine), initial=sum(min(C, n - c * C) for c in my_done),
                   desc=f"extract {split}", disable=dist.rank != 0, dynamic_ncols=True, unit="img")
        if todo:
            mm = np.lib.format.open_memmap(part, mode="r+") if writer else None
            for c in todo:
                lo, hi = c * C, min(n, (c + 1) * C)
                tokens = td.tokens(np.arange(lo, hi))
                feats = extract(model, tokens, layers, args.batch_size, job["device"], job["autocast"],
                                cp_group=cp_group)
                my_done.append(c)
                if writer:
                    mm[lo:hi] = feats.cpu().numpy().astype(dtype, copy=False)
                    mm.flush()  # the rows are on disk before the chunk is recorded
                    _atomic_json(prog_file, {"done": sorted(my_done), "rank": dist.rank, "world": dist.world})
                rows_done += hi - lo
                bar.update(hi - lo)
                chunks_run += 1
                if stop_after and chunks_run >= stop_after:
                    # every rank reaches its stop point before any dies (the launcher tears the others down)
                    dist.barrier()
                    sys.stdout.flush()
                    os._exit(17)  # the test hook: die without any cleanup, as a SIGKILL would
            del mm
        bar.close()
    dist.barrier()

    if dist.rank == 0:
        missing = {}
        for split, td in job["data"].items():
            n_chunks = -(-len(td) // args.chunk_size)
            lost = sorted(set(range(n_chunks)) - done_chunks(progress, split))
            if lost:
                missing[split] = lost
        if missing:
            raise RuntimeError(f"chunks not recorded after every rank finished: {missing}; rerun to resume")
        files = {}
        for split, td in job["data"].items():
            feat = os.path.join(out, f"{split}_features.npy")
            os.replace(feat + ".partial", feat)
            labels = td.labels
            lab = None
            if labels is not None:
                lab = os.path.join(out, f"{split}_labels.npy")
                tmp = lab + ".tmp.npy"
                np.save(tmp, np.asarray(labels, dtype=np.int64), allow_pickle=False)
                os.replace(tmp, lab)
            files[split] = {"features": os.path.basename(feat), "labels": lab and os.path.basename(lab)}
        src = next(iter(job["data"].values())).split
        manifest = {**run, "model": model_summary(model), "dims": {str(l): run["d_model"] for l in layers},
                    "width": width, "files": files, "num_classes": src.num_classes, "complete": True,
                    "layer_slices": {str(l): [i * run["d_model"], (i + 1) * run["d_model"]]
                                     for i, l in enumerate(layers)},
                    "feature": "mean over positions of blocks[l].norm_1(h_l); l = n_layer: norm_f(h_L)",
                    "world_size": dist.world, "context_parallel": args.context_parallel}
        _atomic_json(manifest_path, manifest)
        import shutil

        shutil.rmtree(progress, ignore_errors=True)
        dt = time.perf_counter() - t0
        print(f"megapix extract: {sum(run['counts'].values())} images x {width} features "
              f"(layers {layers}) -> {out} [{dt:.1f}s this attempt, rank 0 {rows_done / max(dt, 1e-9):.0f} img/s]",
              flush=True)
    dist.barrier()
    return 0


def _usable_partial(path: str, shape, dtype) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        mm = np.load(path, mmap_mode="r")
        return mm.shape == tuple(shape) and mm.dtype == dtype
    except (OSError, ValueError):
        return False


def _clear(out: str, splits) -> None:
    import shutil

    shutil.rmtree(os.path.join(out, PROGRESS_DIR), ignore_errors=True)
    for name in ["manifest.json"] + [f"{s}_{k}" for s in ("train", "val", "test")
                                     for k in ("features.npy", "features.npy.partial", "labels.npy")]:
        p = os.path.join(out, name)
        if os.path.isfile(p):
            os.remove(p)


def model_summary(model) -> dict:
    """The model fields a probe's results record."""
    c = model.config
    return {"n_layer": c.n_layer, "d_model": c.d_model, "n_head": c.n_head, "resolution": c.resolution,
            "objective": c.objective, "parameters": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    sys.exit(main())
