"""Palette encoding: megapix's lookup-table encoder against Hugging Face's ImageGPTImageProcessor.

    .venv/bin/python benchmarks/bench_palette.py [--n 512] [--resolution 32] [--repeats 3]

Both encode the same uint8 images with the same 512 clusters (HF: do_resize=False). Rows: uniformly random
images (almost every pixel a new colour: the worst case for a table) and CIFAR-like images (smooth gradients,
blobs, mild noise: far fewer distinct colours). Columns: seconds for HF, megapix cold (a fresh Palette, its
table empty: every distinct colour is quantised once by the pruned exact search), megapix warm (the table
filled, as after the first batches of training); whether the ids are identical; the speed-ups. Then the whole
2^24 table: built, saved beside a palette file, and loaded by a fresh Palette.load (cold encoding with a cache).
Times are wall seconds with CPU seconds of this process in brackets (the CPU figure is what a shared, loaded
machine cannot inflate).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from megapix.data.palette import Palette


def random_images(n, res, rng):
    return rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def natural_images(n, res, rng):
    """Smooth colour gradients with a few soft blobs and sparse +-2 noise: fewer distinct colours."""
    yy, xx = np.mgrid[0:res, 0:res] / (res - 1)
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        base = rng.uniform(30, 220, 3)
        img = base + rng.uniform(-60, 60, 3) * xx[..., None] + rng.uniform(-60, 60, 3) * yy[..., None]
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - w) + rng.uniform(0, 255, 3) * w
        img += rng.integers(-2, 3, img.shape) * (rng.random(img.shape[:2]) < 0.25)[..., None]
        out[i] = np.clip(np.rint(img), 0, 255)
    return out


def hf_encode(images, centres, batch):
    """HF in batches of `batch` images (one call on thousands of images builds a [pixels, 512] distance
    matrix of gigabytes and is slower: batches are its best case)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import ImageGPTImageProcessor

        proc = ImageGPTImageProcessor(clusters=centres, do_resize=False)
        return np.concatenate([np.asarray(proc(list(images[s:s + batch]), return_tensors="np")["input_ids"])
                               for s in range(0, len(images), batch)])


def timed(fn, repeats=1):
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return best, cpu, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="warm timings: best of this many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch", type=int, default=64, help="images per HF processor call")
    p.add_argument("--fit-images", type=int, default=64, help="CIFAR-like images the palette is fitted on")
    a = p.parse_args(argv)
    import tempfile

    import torch

    rng = np.random.default_rng(a.seed)
    sets = {"random": random_images(a.n, a.resolution, rng), "cifar-like": natural_images(a.n, a.resolution, rng)}
    pal = Palette.fit(sets["cifar-like"][:a.fit_images], k=512, seed=a.seed)  # one palette for both rows
    centres = pal.centres
    print(f"{a.n} images {a.resolution}x{a.resolution}, 512 clusters, HF batches of {a.hf_batch}, torch threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    head = f"{'images':<11} {'distinct':>9} {'HF s':>14} {'cold s':>13} {'warm s':>13} " \
           f"{'identical':>9} {'cold x':>7} {'warm x':>7}"
    print(head)
    print("-" * len(head))
    ok, refs, hf_random = True, {}, None
    hf_encode(sets["random"][:2], centres, a.hf_batch)  # HF's first call pays ~6 s of one-off set-up: not timed
    fmt = lambda t, c: f"{t:.3f} [{c:.3f}]"  # noqa: E731
    for name, imgs in sets.items():
        distinct = len(np.unique(imgs.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1])))
        t_hf, c_hf, ref = timed(lambda: hf_encode(imgs, centres, a.hf_batch))
        fresh = Palette(centres)
        t_cold, c_cold, cold = timed(lambda: fresh.encode(imgs))
        t_warm, c_warm, warm = timed(lambda: fresh.encode(imgs), a.repeats)
        same = np.array_equal(ref, cold) and np.array_equal(ref, warm)
        refs[name] = ref
        hf_random = t_hf if name == "random" else hf_random
        ok &= same
        print(f"{name:<11} {distinct:>9} {fmt(t_hf, c_hf):>14} {fmt(t_cold, c_cold):>13} {fmt(t_warm, c_warm):>13} "
              f"{'yes' if same else 'NO':>9} {t_hf / t_cold:>6.1f}x {t_hf / t_warm:>6.1f}x")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kmeans_centers.npy")
        pal.save(path)
        t_build, c_build, table = timed(lambda: Palette.load(path).build_table())
        t_load, c_load, cached = timed(lambda: Palette.load(path).encode(sets["random"]))
        ok &= np.array_equal(cached, refs["random"])
        print(f"whole 2^24 table: built and cached in {fmt(t_build, c_build)} s "
              f"({os.path.getsize(os.path.splitext(path)[0] + '.lut.npz') / 2**20:.0f} MiB); a fresh Palette.load "
              f"encodes the random set from the cache in {fmt(t_load, c_load)} s ({hf_random / t_load:.1f}x HF), "
              f"ids identical: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
