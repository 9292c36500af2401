"""CPU tokens/s per layout for the tiny preset at a fixed global batch: the overhead of ZeRO, TP and PP
against one rank (gloo, one OpenMP thread per rank). Each layout trains as a torchrun subprocess; the
figure is the median tokens/s over the steps after the first two (warm-up).

    python benchmarks/bench_layouts.py [--steps 8] [--global-batch 16] [--four]   (--four adds 4-rank layouts)

On a 2-core machine, 2-rank layouts share the cores with each other, so tokens/s there measures the
communication and bookkeeping overhead more than any speed-up.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from megapix.utils import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = [
    ("1 rank", 1, []),
    ("DP2 ZeRO-0", 2, ["--zero-stage", "0"]),
    ("DP2 ZeRO-1", 2, ["--zero-stage", "1"]),
    ("DP2 ZeRO-2", 2, ["--zero-stage", "2"]),
    ("DP2 ZeRO-3", 2, ["--zero-stage", "3"]),
    ("TP2", 2, ["--tensor-parallel", "2"]),
    ("PP2 (micro 4)", 2, ["--pipeline-parallel", "2", "--micro-batch", "4"]),
]
FOUR = [
    ("TP2 x PP2", 4, ["--tensor-parallel", "2", "--pipeline-parallel", "2", "--micro-batch", "4"]),
    ("PP2 x DP2 ZeRO-1", 4, ["--pipeline-parallel", "2", "--zero-stage", "1", "--micro-batch", "4"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--model", default="tiny")
    p.add_argument("--four", action="store_true", help="also the 4-rank layouts")
    p.add_argument("--palette", help="kmeans_centers.npy for digits (fitted once into the work dir otherwise)")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-layouts-")
    palette = args.palette
    if palette is None:
        from megapix.config import model_preset
        from megapix.data import fit_palette
        from megapix.data.sources import open_source

        res = model_preset(args.model).resolution
        palette = os.path.join(work, "palette.npy")
        fit_palette(open_source("digits", res, None, 0, True).split("train").images, 0).save(palette)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for name, n, extra in LAYOUTS + (FOUR if args.four else []):
        out = os.path.join(work, name.replace(" ", "_").replace("(", "").replace(")", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(free_port()), os.path.join(ROOT, "megapix", "train.py"), "--model", args.model,
               "--palette", palette, "--max-steps", str(args.steps), "--global-batch", str(args.global_batch),
               "--eval-every", "0", "--no-samples", "--out", out, *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append((name, n, None, None, f"failed ({proc.returncode})"))
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        recs = read_metrics(os.path.join(out, "metrics.jsonl"))
        tok = statistics.median(r["tokens_per_s"] for r in recs[2:] or recs)
        rows.append((name, n, tok, recs[-1]["loss"], f"{time.time() - t0:.0f}s wall"))
    base = rows[0][2]
    print(f"\nmodel {args.model}, global batch {args.global_batch}, {args.steps} steps, CPU gloo, "
          f"{os.cpu_count()} cores\n")
    print("| layout | ranks | tokens/s | vs 1 rank | final loss | note |")
    print("|---|---|---|---|---|---|")
    for name, n, tok, loss, note in rows:
        if tok is None:
            print(f"| {name} | {n} | - | - | - | {note} |")
        else:
            print(f"| {name} | {n} | {tok:,.0f} | {tok / base:.2f}x | {loss:.4f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
