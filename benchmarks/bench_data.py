"""The data path from JPEGs, side by side for an ImageFolder tree, WebDataset tar shards and Parquet files of the
same JPEG bytes: the training loader's images/s at 0, 1, 2 DataLoader workers, and `megapix prepare`'s images/s
per worker process and in total at 1 and 2 workers.

    .venv/bin/python benchmarks/bench_data.py [--images 96] [--size 448] [--resolution 64] [--steps 8]
                                              [--workers 0,1,2] [--prepare-images 600] [--prepare-workers 1,2]

A temporary ImageFolder of JPEGs (--size px, smooth colour fields with noise, so they decode like photos) is
read through megapix's training path: decode, the paper's augmentation (random shorter side in [256, 384],
random 224 crop, downsample to --resolution), palette encoding (a fitted 512-colour palette, its table cached
beside the file as training has it), micro-batches from MicroBatches with data.num_workers = N. Each row times
--steps global batches after one warm-up step (worker start-up excluded), and checks the tokens equal those of
0 workers. Wall images/s, with the load average printed (a shared machine inflates wall time).

The tar shards are written with webdataset's TarWriter and the Parquet files with pyarrow (an `image` struct of
bytes and a `label` column, as Hugging Face datasets store images), 32 images per shard or file. Every row checks
that its tokens equal the ImageFolder's with 0 workers (training) or the ImageFolder's prepared shards (prepare).
prepare's rows time the whole call (indexing, worker start-up, the colour table, decode, encode, write) on
--prepare-images JPEGs, and its margin: the second half of those images over the time they add to a run on the
first half alone (hard links of the folder's first files, brace patterns over the first shards). The margin
cancels the fixed costs, as a run over a real dataset amortises them.

Then what a GPU step would consume: for igpt-s (32x32) on 1 node and igpt-xl (64x64) on 8 nodes of 8 H200, the
planner's first layout (megapix.plan.search, the paper's batch) gives a step time; every rank loads its DP
shard (TP and PP peers of one DP rank load the same images), so one loading process must deliver
global_batch / DP images per step time. Beside it: how many workers at this machine's measured per-worker
rate that takes (the planner's step times are estimates until benchmarks/gpu_check.py runs on a GPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from megapix.data.loader import GlobalBatches, MicroBatches, TokenData
from megapix.data.palette import Palette
from megapix.data.splits import fit_palette
from megapix.data.sources import open_source
from megapix.plan import DEVICES, PAPER_BATCH, search

# (model, nodes of 8 H200): iGPT-S's paper setting fits one node; iGPT-XL is the multi-node case
CONSUMERS = (("igpt-s", 1), ("igpt-xl", 8))


def consumption_rows(per_worker: float) -> list[str]:
    """Images/s one loading rank must deliver for the planner's H200 layouts, and the workers that takes."""
    import math

    rows = [f"{'model':<8} {'cluster':<10} {'planner layout':<32} {'step s':>7} {'img/s/rank':>10} "
            f"{'img/s/node':>10} {'workers/rank':>12}"]
    for model, nodes in CONSUMERS:
        best = search(model, nodes, 8, DEVICES["h200"].memory_gb, DEVICES["h200"], PAPER_BATCH[model])[0]
        lay, step = best.layout, best.timing.step
        per_rank = PAPER_BATCH[model] / lay.dp / step
        need = math.ceil(per_rank / per_worker) if per_worker > 0 else "?"
        rows.append(f"{model:<8} {f'{nodes}x8 H200':<10} {lay.describe():<32} {step:>7.3f} {per_rank:>10.1f} "
                    f"{per_rank * 8:>10.1f} {need:>12}")
    return rows


def make_folder(root: str, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        d = os.path.join(root, "train", f"c{i % 4}")
        os.makedirs(d, exist_ok=True)
        img = rng.uniform(0, 255, 3) + rng.uniform(-90, 90, 3) * xx[..., None] + rng.uniform(-90, 90, 3) * yy[..., None]
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i}.jpg"), quality=90)


SHARD_IMAGES = 32  # images per tar shard or Parquet file


def write_shards(root: str) -> dict:
    """The folder's JPEG bytes as tar shards and Parquet files, in the folder's order; -> source spec per kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    src = open_source(f"imagefolder:{root}", 8, val_fraction=0.0)  # its file order and labels
    files, labels = src.split("train").images.files, src.split("train").labels
    os.makedirs(os.path.join(root, "wds"))
    os.makedirs(os.path.join(root, "pq"))
    for s, start in enumerate(range(0, len(files), SHARD_IMAGES)):
        part = range(start, min(start + SHARD_IMAGES, len(files)))
        data = [open(files[i], "rb").read() for i in part]
        with wds.TarWriter(os.path.join(root, "wds", f"train-{s:05d}.tar")) as sink:
            for i, b in zip(part, data):
                sink.write({"__key__": f"{i:08d}", "jpg": b, "cls": int(labels[i])})
        pq.write_table(pa.table({"image": pa.array([{"bytes": b} for b in data]),
                                 "label": pa.array([int(labels[i]) for i in part], pa.int64())}),
                       os.path.join(root, "pq", f"train-{s:05d}.parquet"), row_group_size=SHARD_IMAGES)
    return {"imagefolder": f"imagefolder:{root}", "wds": f"wds:{root}/wds/train-*.tar",
            "parquet": f"parquet:{root}/pq/train-*.parquet"}


def half_specs(root: str, specs: dict) -> dict:
    """The first half of the same images, per source: hard links of the folder's first files, and brace patterns over
    the first half of the shards (write_shards keeps the folder's order)."""
    files = open_source(specs["imagefolder"], 8, val_fraction=0.0).split("train").images.files
    shards = len(files) // 2 // SHARD_IMAGES
    half = os.path.join(root, "half")
    for f in files[:shards * SHARD_IMAGES]:
        dst = os.path.join(half, os.path.relpath(f, root))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(f, dst)
    last = shards - 1
    return {"imagefolder": f"imagefolder:{half}", "wds": f"wds:{root}/wds/train-{{00000..{last:05d}}}.tar",
            "parquet": f"parquet:{root}/pq/train-{{00000..{last:05d}}}.parquet"}


def prepare_rows(root: str, specs: dict, resolution: int, palette: str, workers: list[int]) -> list[str]:
    """`megapix prepare` (the library call the command makes) per source and worker count: images/s of the whole
    call, and at the margin: the second half of the images over the time they add to a run of the first half
    alone, which cancels the fixed costs (worker start-up, the colour table), as a long run amortises them."""
    import warnings

    from megapix.data.prepare import prepare

    halves = half_specs(root, specs)
    rows = [f"{'source':<12} {'workers':>7} {'images/s':>9} {'per worker':>10} {'marginal':>9} {'per worker':>10} "
            f"{'same tokens':>11}"]
    ref = {}

    def timed(kind, spec, w, tag):
        out = os.path.join(root, f"prep-{kind}-{w}-{tag}")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no test split: the holdout stands in, as the source warns
            m = prepare(spec, out, resolution=resolution, palette=palette, shard_size=SHARD_IMAGES * 4,
                        workers=w, val_fraction=0.0, progress=False)
        dt = time.perf_counter() - t
        tokens = np.asarray(open_source(f"shards:{out}", resolution).split("train").tokens)
        same = np.array_equal(ref.setdefault(tag, tokens), tokens)
        return m["splits"]["train"]["count"], dt, same

    for kind, spec in specs.items():
        for w in workers:
            n_half, t_half, same_half = timed(kind, halves[kind], w, "half")
            n, t, same = timed(kind, spec, w, "all")
            rate, marginal = n / t, (n - n_half) / max(t - t_half, 1e-9)
            rows.append(f"{kind:<12} {w:>7} {rate:>9.1f} {rate / w:>10.1f} {marginal:>9.1f} {marginal / w:>10.1f} "
                        f"{'yes' if same and same_half else 'NO':>11}")
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--size", type=int, default=448, help="side of the JPEGs in pixels (ImageNet-like: ~450)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--prepare-images", type=int, default=600, help="JPEGs for the prepare rows (0: none)")
    p.add_argument("--prepare-workers", default="1,2")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message=".*the test split is the held-out validation split")  # no test set
    with tempfile.TemporaryDirectory() as root:
        make_folder(root, a.images, a.size)
        specs = write_shards(root)
        path = os.path.join(root, "palette.npy")
        fit_palette(open_source(specs["imagefolder"], a.resolution, val_fraction=0.0).split("train").images, 0,
                    max_pixels=200_000).save(path)
        print(f"{a.images} JPEGs {a.size}x{a.size} -> {a.resolution}x{a.resolution} with the paper's random "
              f"resize-crop, global batch {a.global_batch}, {a.steps} steps; cpus {os.cpu_count()}, load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'source':<12} {'workers':>7} {'images/s':>9} {'same tokens':>11}")
        ref, rates = None, {}
        for kind, spec in specs.items():
            train = open_source(spec, a.resolution, val_fraction=0.0, seed=0, augment=True).split("train")
            palette = Palette.load(path)
            palette.build_table()  # as a training run has it after its first batches: a cached table
            data = TokenData(train, a.resolution**2, palette, "bench")
            sched = GlobalBatches(len(data), a.global_batch, seed=0)
            for w in [int(x) for x in a.workers.split(",")]:
                mb = MicroBatches(data, sched, 0, 1, a.global_batch // 4, None, seed=0, num_workers=w)
                mb(0)  # warm-up: workers started, first batch out
                t = time.perf_counter()
                got = [torch.cat([tok for tok, _ in mb(s)]) for s in range(1, 1 + a.steps)]
                dt = time.perf_counter() - t
                mb.close()
                ref = got if ref is None else ref
                same = all(torch.equal(x, y) for x, y in zip(ref, got))
                rates[kind, w] = a.steps * a.global_batch / dt
                print(f"{kind:<12} {w:>7} {rates[kind, w]:>9.1f} {'yes' if same else 'NO':>11}", flush=True)
    if a.prepare_images:
        with tempfile.TemporaryDirectory() as root:
            make_folder(root, a.prepare_images, a.size, seed=1)
            specs = write_shards(root)
            path = os.path.join(root, "palette.npy")
            fit_palette(open_source(specs["imagefolder"], a.resolution, val_fraction=0.0).split("train").images, 0,
                        max_pixels=200_000).save(path)
            print(f"\nmegapix prepare: {a.prepare_images} JPEGs {a.size}x{a.size} -> {a.resolution}x{a.resolution} "
                  f"tokens (evaluation view), load average {os.getloadavg()[0]:.1f}")
            prepare_rows(root, specs, a.resolution, path, [int(x) for x in a.prepare_workers.split(",")])
    # per worker: the best worker row's rate divided by its workers (0 workers: the main process alone)
    per_worker = max((r / max(w, 1) for (_, w), r in rates.items() if w > 0),
                     default=max(rates.values(), default=0.0))
    print(f"\nwhat one GPU step consumes (planner, paper batch; this machine: {per_worker:.1f} images/s per worker)")
    for row in consumption_rows(per_worker):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
