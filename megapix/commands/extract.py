"""`megapix extract --checkpoint RUN --out DIR`: the pooled features of several layers (megapix.features.extract),
for every row of each split, into a folder a probe reads.

Each split is sharded over the ranks of any launcher (torchrun, deepspeed, mpiexec, srun; plain python = one
rank). The rows are cut into fixed chunks; rank r takes a contiguous range of chunks and writes its rows straight
into a shared memory-mapped `.npy`. After a chunk's rows are flushed, the chunk is recorded in the rank's progress
file (written atomically), so a killed run restarted with the same command skips the chunks already done, even
under a different number of ranks. When every rank is done, rank 0 renames `{split}_features.npy.partial` to
`{split}_features.npy`, writes the labels and finally `manifest.json` (with "complete": true). No pickle anywhere.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from megapix import runfolder
from megapix.checkpoint import load_model_and_palette
from megapix.cliargs import parse_command
from megapix.commands.options import ExtractConfig
from megapix.commands.runner import out_flag, run
from megapix.config import ConfigError
from megapix.data.loader import TokenData
from megapix.data.sources import SPLITS, open_source
from megapix.features import extract, model_summary, parse_layers, rank_device
from megapix.model.compile import compile_blocks
from megapix.parallel import dist as pdist
from megapix.parallel.dist import World
from megapix.utils import read_json, write_json

PROGRESS_DIR = ".extract_progress"
FORMAT = "megapix-features"
STOP_ENV = "MEGAPIX_EXTRACT_STOP_AFTER_CHUNKS"  # test hook: hard-exit (like SIGKILL) after this many chunks
FEATURE = "mean over positions of blocks[l].norm_1(h_l); l = n_layer: norm_f(h_L)"


def main(argv=None) -> int:
    return run("megapix extract", lambda: _extract(argv), out_flag(argv))


def parse_args(argv=None) -> ExtractConfig:
    return parse_command("megapix extract", "Offline feature extraction for linear probes: `megapix extract`.",
                         ExtractConfig, argv, launcher=True)


def _extract(argv) -> int:
    args = parse_args(argv)
    world = World()
    try:
        runfolder.claim(args.out, "extract", "megapix extract")  # one writer, and only into an extraction's folder
        job, error = None, None
        try:
            job = _job(args, world)
        except ConfigError as e:
            error = e
        error = pdist.shared_error(error)  # one rank's bad input stops every rank, with the same line
        if error is not None:
            raise error
        out = os.path.abspath(args.out)
        # rank 0 decides: fresh, resume, or already complete; every rank then opens the same files
        if pdist.rank0_decides(lambda: _decide(job, args, out)) == "done":
            if world.rank == 0:
                print(f"megapix extract: {os.path.join(out, 'manifest.json')} is already complete for these "
                      "settings; nothing to do", flush=True)
            return 0
        t0, rows = time.perf_counter(), _extract_chunks(job, args, world, out)
        world.barrier()
        if world.rank == 0:
            _finish(job, args, world, out, time.perf_counter() - t0, rows)
        world.barrier()
        return 0
    finally:
        world.close()


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


def _job(args, world: World) -> dict:
    """The model on this rank's device, the layers, the splits' tokens and the run's record; every input check."""
    if not os.path.exists(args.checkpoint):
        raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist; pass a training --out folder, "
                          "a checkpoint tag folder or an HF/megapix export directory")
    splits = [s for s in args.splits.split(",") if s]
    for s in splits:
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r} in --splits; choose from {', '.join(SPLITS)}")
    cp = args.context_parallel
    if world.world % cp:
        raise ConfigError(f"--context-parallel {cp} does not divide the {world.world} ranks; launch a multiple of "
                          f"{cp} ranks or change --context-parallel")
    model, palette, data = load_model_and_palette(args.checkpoint, args.palette, args.data)
    if cp > 1 and model.config.n_ctx % (2 * cp):
        raise ConfigError(f"--context-parallel {cp} cuts the {model.config.n_ctx} positions into 2 x {cp} chunks (a "
                          f"head and a tail per rank), which does not divide them; use a degree whose double divides "
                          f"{model.config.n_ctx}")
    layers = parse_layers(args.layers, model.config.n_layer, args.center, args.span)
    source = open_source(data, model.config.resolution, args.val_fraction, args.seed, augment=False,
                         skip_corrupt=args.skip_corrupt)
    token_data = {s: TokenData(source.split(s), model.config.n_ctx, palette, f"{data} [{s}]") for s in splits}
    device = rank_device(args.device)
    model = model.to(device).eval()
    note = compile_blocks(model, args.compile, device)
    if note is not None and world.rank == 0:
        print(f"megapix extract: {note}", flush=True)
    record = {"format": FORMAT, "checkpoint": os.path.abspath(args.checkpoint), "data": data, "layers": layers,
              "d_model": model.config.d_model, "dtype": args.dtype, "chunk_size": args.chunk_size,
              "seed": args.seed, "val_fraction": args.val_fraction,
              "counts": {s: len(t) for s, t in token_data.items()}}
    return {"model": model, "device": device, "layers": layers, "data": token_data, "run": record,
            "autocast": torch.bfloat16 if args.precision == "bf16" else None}


def _decide(job: dict, args, out: str) -> str:
    """Fresh or resumed ("go"), or already complete ("done"); another run's folder is refused. Rank 0 only."""
    progress, record = os.path.join(out, PROGRESS_DIR), job["run"]
    width, dtype = len(job["layers"]) * record["d_model"], np.dtype(args.dtype)
    os.makedirs(out, exist_ok=True)
    if args.overwrite:
        _clear(out)
    run_path, manifest_path = os.path.join(progress, "run.json"), os.path.join(out, "manifest.json")
    if os.path.isfile(manifest_path):
        old = read_json(manifest_path)
        same = (isinstance(old, dict) and old.get("complete")
                and all(old.get(k) == record[k] for k in ("checkpoint", "data", "layers", "dtype"))
                and all(old.get("counts", {}).get(s) == c for s, c in record["counts"].items()))
        if same:
            return "done"
        raise ConfigError(f"{out} already holds a different extraction (manifest.json); pass --overwrite or "
                          "another --out")
    if os.path.isfile(run_path) and read_json(run_path) != record:
        raise ConfigError(f"{out} holds a partial extraction with other settings ({PROGRESS_DIR}/run.json); "
                          "rerun with the same flags to resume, or pass --overwrite")
    os.makedirs(progress, exist_ok=True)
    write_json(run_path, record)
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


def _context_parallel(job: dict, cp: int, world: World):
    """Groups of cp consecutive ranks (every rank creates every group, in order), this rank's group and its model
    made context-parallel; (group, group index, groups). cp = 1: (None, rank, world)."""
    if cp == 1:
        return None, world.rank, world.world
    from megapix.parallel.context import apply_context_parallel

    groups = [world.dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(world.world // cp)]
    mine = groups[world.rank // cp]
    apply_context_parallel(job["model"], mine, job["model"].config.n_ctx)
    return mine, world.rank // cp, world.world // cp


def _extract_chunks(job: dict, args, world: World, out: str) -> int:
    """This rank's chunks of every split not yet recorded: extracted, written, recorded. Returns rows done."""
    progress = os.path.join(out, PROGRESS_DIR)
    cp_group, shard, shards = _context_parallel(job, args.context_parallel, world)
    writer = world.rank % args.context_parallel == 0  # one rank of each CP group writes its group's rows
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    chunks_run = rows_done = 0
    for split, td in job["data"].items():
        n, C = len(td), args.chunk_size
        mine = chunk_ranges(-(-n // C), shards, shard)
        done = done_chunks(progress, split)
        todo, my_done = [c for c in mine if c not in done], sorted(c for c in mine if c in done)
        if cp_group is not None:  # a CP group's ranks must agree on their chunks: read before any rank records more
            world.barrier()
        prog_file = os.path.join(progress, f"{split}.rank{world.rank}of{world.world}.json")
        bar = tqdm(total=sum(min(C, n - c * C) for c in mine), initial=sum(min(C, n - c * C) for c in my_done),
                   desc=f"extract {split}", disable=world.rank != 0, dynamic_ncols=True, unit="img")
        mm = np.lib.format.open_memmap(os.path.join(out, f"{split}_features.npy.partial"), mode="r+") \
            if todo and writer else None
        for c in todo:
            lo, hi = c * C, min(n, (c + 1) * C)
            feats = extract(job["model"], td.tokens(np.arange(lo, hi)), job["layers"], args.batch_size,
                            job["device"], job["autocast"], cp_group=cp_group)
            my_done.append(c)
            if writer:
                mm[lo:hi] = feats.cpu().numpy().astype(np.dtype(args.dtype), copy=False)
                mm.flush()  # the rows are on disk before the chunk is recorded
                write_json(prog_file, {"done": sorted(my_done), "rank": world.rank, "world": world.world})
            rows_done += hi - lo
            bar.update(hi - lo)
            chunks_run += 1
            if stop_after and chunks_run >= stop_after:
                # every rank reaches its stop point before any dies (the launcher tears the others down)
                world.barrier()
                sys.stdout.flush()
                os._exit(17)  # the test hook: die without any cleanup, as a SIGKILL would
        del mm
        bar.close()
    return rows_done


def _finish(job: dict, args, world: World, out: str, seconds: float, rows_done: int) -> None:
    """Rank 0, after every rank is done: every chunk recorded, the features renamed into place, the labels and
    then the manifest written, the progress folder removed."""
    progress, record, layers = os.path.join(out, PROGRESS_DIR), job["run"], job["layers"]
    missing = {split: lost for split, td in job["data"].items()
               if (lost := sorted(set(range(-(-len(td) // args.chunk_size))) - done_chunks(progress, split)))}
    if missing:
        raise RuntimeError(f"chunks not recorded after every rank finished: {missing}; rerun to resume")
    files = {}
    for split, td in job["data"].items():
        feat = os.path.join(out, f"{split}_features.npy")
        os.replace(feat + ".partial", feat)
        lab = None
        if td.labels is not None:
            lab = os.path.join(out, f"{split}_labels.npy")
            tmp = lab + ".tmp.npy"
            np.save(tmp, np.asarray(td.labels, dtype=np.int64), allow_pickle=False)
            os.replace(tmp, lab)
        files[split] = {"features": os.path.basename(feat), "labels": lab and os.path.basename(lab)}
    d, width = record["d_model"], len(layers) * record["d_model"]
    manifest = {**record, "model": model_summary(job["model"]), "dims": {str(l): d for l in layers},
                "width": width, "files": files, "num_classes": next(iter(job["data"].values())).split.num_classes,
                "complete": True, "layer_slices": {str(l): [i * d, (i + 1) * d] for i, l in enumerate(layers)},
                "feature": FEATURE, "world_size": world.world, "context_parallel": args.context_parallel}
    write_json(os.path.join(out, "manifest.json"), manifest)
    shutil.rmtree(progress, ignore_errors=True)
    print(f"megapix extract: {sum(record['counts'].values())} images x {width} features (layers {layers}) -> {out} "
          f"[{seconds:.1f}s this attempt, rank 0 {rows_done / max(seconds, 1e-9):.0f} img/s]", flush=True)


def _usable_partial(path: str, shape, dtype) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        mm = np.load(path, mmap_mode="r")
        return mm.shape == tuple(shape) and mm.dtype == dtype
    except (OSError, ValueError):
        return False


def _clear(out: str) -> None:
    shutil.rmtree(os.path.join(out, PROGRESS_DIR), ignore_errors=True)
    for name in ["manifest.json"] + [f"{s}_{k}" for s in ("train", "val", "test")
                                     for k in ("features.npy", "features.npy.partial", "labels.npy")]:
        p = os.path.join(out, name)
        if os.path.isfile(p):
            os.remove(p)


if __name__ == "__main__":
    sys.exit(main())
