"""The ImageFolder training path: images/s at 0, 1, 2 DataLoader workers.

    .venv/bin/python benchmarks/bench_data.py [--images 96] [--size 448] [--resolution 64] [--steps 8]
                                              [--workers 0,1,2]

A temporary ImageFolder of JPEGs (--size px, smooth colour fields with noise, so they decode like photos) is
read through megapix's training path: decode, the paper's augmentation (random shorter side in [256, 384],
random 224 crop, downsample to --resolution), palette encoding (a fitted 512-colour palette, its table cached
beside the file as training has it), micro-batches from MicroBatches with data.num_workers = N. Each row times
--steps global batches after one warm-up step (worker start-up excluded), and checks the tokens equal those of
0 workers. Wall images/s, with the load average printed (a shared machine inflates wall time).
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
from megapix.data.setup import fit_palette
from megapix.data.sources import open_source


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
        ref = None
        for w in [int(x) for x in a.workers.split(",")]:
            mb = MicroBatches(data, sched, 0, 1, a.global_batch // 4, None, seed=0, num_workers=w)
            mb(0)  # warm-up: workers started, first batch out
            t = time.perf_counter()
            got = [torch.cat([tok for tok, _ in mb(s)]) for s in range(1, 1 + a.steps)]
            dt = time.perf_counter() - t
            mb.close()
            ref = got if ref is None else ref
            same = all(torch.equal(x, y) for x, y in zip(ref, got))
            print(f"{w:>7} {a.steps * a.global_batch / dt:>9.1f} {'yes' if same else 'NO':>11}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
