"""What a run pays before its first step, old way against new way, side by side in one run.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--threads 1]

Rows:
- palette fit on the embedded digits (what every run without --palette does first, on rank 0 while the other ranks
  wait): k-means with the nearest-centre search in 65536-row blocks (megapix before) against 256-row blocks (now);
  the centres must be identical;
- the digits arrays in a fresh interpreter that has imported megapix, as a run has: scikit-learn's load_digits()
  (its import included) against megapix.data.embedded.load_digits(), which reads the same file; the arrays must be
  identical.
Each cell is the best of --repeats, wall seconds with this process's CPU seconds in brackets.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

from megapix.data import palette as pal
from megapix.data.sources import digits_source


def timed(fn, repeats: int):
    best, out = None, None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        cell = (time.perf_counter() - w, time.process_time() - c)
        best = cell if best is None or cell[0] < best[0] else best
    return best, out


def fit_with_block(images: np.ndarray, rows: int) -> np.ndarray:
    search = pal._nearest
    pal._nearest = lambda x, c, chunk=rows: search(x, c, chunk)
    try:
        return pal.Palette.fit(images).centres
    finally:
        pal._nearest = search


LOADERS = {
    "scikit-learn load_digits()": "from sklearn.datasets import load_digits; d = load_digits(); "
                                  "x, y = d.images, d.target",
    "megapix.data.embedded.load_digits()": "from megapix.data.embedded import load_digits; x, y = load_digits()",
}


def fresh_load(code: str) -> tuple[float, str]:
    """(seconds to load them, digest of the arrays) in a fresh interpreter."""
    # megapix (and torch) imported first, as in a run: only the load and what it imports are timed
    digest = "import hashlib; print(time.perf_counter() - t0, hashlib.sha256(np.ascontiguousarray(x).tobytes() + " \
             "np.asarray(y, dtype=np.int64).tobytes()).hexdigest())"
    setup = "import time, numpy as np, megapix.data.embedded; t0 = time.perf_counter()"
    proc = subprocess.run([sys.executable, "-c", f"{setup}; {code}; {digest}"], capture_output=True, text=True,
                          check=True)
    seconds, sha = proc.stdout.split()[-2:]
    return float(seconds), sha


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a run's ranks get 1 each under tests)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = np.asarray(digits_source(8).split("train").images)
    print(f"{os.cpu_count()} cpus, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}, "
          f"best of {args.repeats}\n")
    print("| step | before | now | same result | speed-up |\n|---|---|---|---|---|")
    (old, old_c), before = timed(lambda: fit_with_block(images, 65536), args.repeats)
    (new, new_c), after = timed(lambda: fit_with_block(images, 256), args.repeats)
    print(f"| palette fit, digits ({len(images)} images), nearest-centre blocks 65536 -> 256 rows | {old:.2f} s "
          f"({old_c:.2f}) | {new:.2f} s ({new_c:.2f}) | {np.array_equal(before, after)} | {old / new:.1f}x |")
    runs = {name: [fresh_load(code) for _ in range(args.repeats)] for name, code in LOADERS.items()}
    (a_name, a), (b_name, b) = runs.items()
    same = len({digest for rows in runs.values() for _, digest in rows}) == 1
    ta, tb = min(t for t, _ in a), min(t for t, _ in b)
    print(f"| digits arrays in a fresh interpreter: {a_name} -> {b_name} | {ta:.2f} s | {tb:.2f} s | {same} | "
          f"{ta / tb:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
