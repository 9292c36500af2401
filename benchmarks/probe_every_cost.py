"""What `--probe-every` costs: the same training run with and without linear probes during training, CPU.

    python benchmarks/probe_every_cost.py [--steps 300] [--probe-every 50] [--json FILE] [-- extra train flags]

The run is `make train`'s (the tiny preset at 10x10 on the embedded digits-shifted, global batch 64, a validation
loss every 50 steps), once without and once with `--probe-every N` at the probe's defaults (--probe-rows, the
layers, the L2 grid). Both runs use one palette, fitted here first, so neither pays for a fit. Reported: each run's
wall time (process start to exit), the probe's own time (the sum of metrics.jsonl's probe_time_s: consolidating
the weights, extraction and the fits), its share of the probed run, and one probe in training steps of the same
process (its mean time over the median step time) with the share K / (N + K) that gives at --probe-every N. On a
shared, loaded machine the two wall times move with the load; the probe's own share and K, measured in one process,
are the steadier numbers. The report is printed as a table and written as JSON (--json, default
benchmarks/results/probe_every_cost.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from megapix.utils import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out: str, palette: str, steps: int, extra: list[str]) -> tuple[float, list[dict]]:
    """(wall seconds, metrics.jsonl records) of one `megapix/train.py` run."""
    cmd = [sys.executable, os.path.join(ROOT, "megapix", "train.py"), "--palette", palette, "--max-steps",
           str(steps), "--no-samples", "--out", out, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, read_metrics(os.path.join(out, "metrics.jsonl"))


def measure(steps: int, every: int, extra: list[str], work: str) -> dict:
    from megapix.config import DEFAULT_RUN
    from megapix.data import fit_palette
    from megapix.data.sources import open_source

    palette = os.path.join(work, "palette.npy")
    source = open_source(DEFAULT_RUN["data"]["source"], DEFAULT_RUN["model"]["resolution"], None, 0, True)
    fit_palette(source.split("train").images, 0).save(palette)
    plain_s, plain = train(os.path.join(work, "plain"), palette, steps, extra)
    probed_s, probed = train(os.path.join(work, "probed"), palette, steps, ["--probe-every", str(every), *extra])
    probe_s = sum(r.get("probe_time_s", 0.0) for r in probed)
    probes = sum("probe_time_s" in r for r in probed)
    step_s = statistics.median(r["step_time_s"] for r in probed)
    accs = {k: v for k, v in probed[-1].items() if k.startswith("probe_acc/")}
    # a probe in training steps of the same process (load-proof), and its share of the loop at this N
    k = probe_s / max(probes, 1) / step_s
    return {"steps": steps, "probe_every": every, "extra": extra, "probes": probes,
            "plain_wall_s": plain_s, "probed_wall_s": probed_s, "probe_s": probe_s, "median_step_s": step_s,
            "probe_in_steps": k, "probe_share_of_steps": k / (every + k),
            "probe_share_of_probed_run": probe_s / probed_s, "wall_ratio": probed_s / plain_s,
            "same_curve": [r["loss"] for r in plain] == [r["loss"] for r in probed],
            "last_probe_acc": accs, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--probe-every", type=int, default=50)
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "probe_every_cost.json"))
    p.add_argument("extra", nargs="*", help="more flags for both runs (after --)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-probe-every-") as work:
        r = measure(args.steps, args.probe_every, args.extra, work)
    print(f"\n`make train`'s run, {r['steps']} steps, --probe-every {r['probe_every']} ({r['probes']} probes), "
          f"{r['cpu_count']} cores, load average {r['load_avg'][0]:.1f} at the end\n")
    print("| run | wall s | probe s | probe share of the run | one probe, in training steps | share of steps + "
          "probes |\n|---|---|---|---|---|---|")
    print(f"| without | {r['plain_wall_s']:.1f} | | | | |")
    print(f"| --probe-every {r['probe_every']} | {r['probed_wall_s']:.1f} | {r['probe_s']:.1f} | "
          f"{100 * r['probe_share_of_probed_run']:.1f}% | {r['probe_in_steps']:.2f} (step "
          f"{1000 * r['median_step_s']:.0f} ms) | {100 * r['probe_share_of_steps']:.1f}% |")
    print(f"\nwall time with / without: {r['wall_ratio']:.3f}; same loss curve: {r['same_curve']}; last probe: "
          + ", ".join(f"{k.removeprefix('probe_acc/')} {100 * v:.1f}%" for k, v in r["last_probe_acc"].items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(r, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
