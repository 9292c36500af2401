"""The ImageFolder training path: images/s at 0, 1, 2 DataLoader workers.

    .venv/bin/python benchmarks/bench_data.py [--images 96] [--size 448] [--resolution 64] [--steps 8]
                                              [--workers 0,1,2]

A temporary ImageFolder of JPEGs (--size px, smooth colour fields with noise, so they decode like photos) is
read through megapix's training path: decode, the paper's augmentation (random shorter side in [256, 384],
random 224 crop, downsample to --resolution), palette encoding (a fitted 512-colour palette, its table cached
beside the file as training has it), micro-batches from MicroBatches with data.num_workers = N. Each row times
--steps global batches after one warm-up step (worker start-up excluded), and checks the tokens equal those of
0 workers. Wall images/s, with the load average printed (a shared machine inflates wall time).

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--size", type=int, default=448, help="side of the JPEGs in pixels (ImageNet-like: ~450)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", default="0,1,2")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        make_folder(root, a.images, a.size)
        src = open_source(f"imagefolder:{root}", a.resolution, val_fraction=0.0, seed=0, augment=True)
        train = src.split("train")
        path = os.path.join(root, "palette.npy")
        fit_palette(train.images, 0, max_pixels=200_000).save(path)
        palette = Palette.load(path)
        palette.build_table()  # as a training run has it after its first batches: a cached table
        data = TokenData(train, a.resolution**2, palette, "bench")
        sched = GlobalBatches(len(data), a.global_batch, seed=0)
        print(f"{a.images} JPEGs {a.size}x{a.size} -> {a.resolution}x{a.resolution} with the paper's random "
              f"resize-crop, global batch {a.global_batch}, {a.steps} steps; cpus {os.cpu_count()}, load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'workers':>7} {'images/s':>9} {'same tokens':>11}")
        ref, rates = None, {}
        for w in [int(x) for x in a.workers.split(",")]:
            mb = MicroBatches(data, sched, 0, 1, a.global_batch // 4, None, seed=0, num_workers=w)
            mb(0)  # warm-up: workers started, first batch out
            t = time.perf_counter()
            got = [torch.cat([tok for tok, _ in mb(s)]) for s in range(1, 1 + a.steps)]
            dt = time.perf_counter() - t
            mb.close()
            ref = got if ref is None else ref
            same = all(torch.equal(x, y) for x, y in zip(ref, got))
            rates[w] = a.steps * a.global_batch / dt
            print(f"{w:>7} {rates[w]:>9.1f} {'yes' if same else 'NO':>11}", flush=True)
    # per worker: the best worker row's rate divided by its workers (0 workers: the main process alone)
    per_worker = max((r / max(w, 1) for w, r in rates.items() if w > 0), default=rates.get(0, 0.0))
    print(f"\nwhat one GPU step consumes (planner, paper batch; this machine: {per_worker:.1f} images/s per worker)")
    for row in consumption_rows(per_worker):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
