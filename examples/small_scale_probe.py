"""Small-scale replication of the iGPT linear-probe-by-depth experiment on the embedded default (digits, 8x8,
10 classes), on CPU in about ten minutes.

    python examples/small_scale_probe.py --out runs/small_probe [--steps 500]

1. pre-trains an 8-layer, d=64 iGPT (the tiny preset, deeper and narrower) with `megapix/train.py`
   (resumes if --out already holds the run: rerunning skips finished training);
2. `megapix extract` of every layer (0..8; 8 = after the final norm) for train/val/test;
3. `megapix probe`: one L-BFGS logistic probe per layer, the 5-layer concatenation centred at the best layer
   (by val), and all layers; prints the table and writes probe_results.{json,md} and probe_accuracy.png.

Questions it answers at this scale: does probe accuracy peak in the middle of the network, as the paper reports,
and does the 5-layer concatenation beat the best single layer? A random-init control (`--control`) extracts
and probes the same architecture untrained, so the gain from generative pre-training is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"preset": "tiny", "n_layer": 8, "d_model": 64, "n_head": 4}


def sh(*cmd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/small_probe")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--control", action="store_true", help="also probe the same architecture at random init")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cfg = os.path.join(out, "config.json")
    with open(cfg, "w") as f:
        json.dump({"model": MODEL, "data": {"source": "digits"}, "train": {"global_batch": 64, "lr": 3e-3}}, f)
    py = sys.executable
    train_dir = os.path.join(out, "pretrain")
    sh(py, "megapix/train.py", "--config", cfg, "--max-steps", str(args.steps), "--out", train_dir,
       "--no-samples", "--eval-every", "100", "--resume")
    feats = os.path.join(out, "features")
    sh(py, "-m", "megapix", "extract", "--checkpoint", train_dir, "--layers", "all", "--out", feats)
    sh(py, "-m", "megapix", "probe", feats)
    if args.control:
        import torch  # noqa: F401  (a random-init export of the same architecture and palette)

        sys.path.insert(0, ROOT)
        from megapix.config import ModelConfig
        from megapix.model import ImageGPT

        rnd = os.path.join(out, "random_init")
        ImageGPT(ModelConfig(**{k: v for k, v in MODEL.items() if k != "preset"})).save_pretrained(rnd)
        import shutil

        shutil.copy(os.path.join(train_dir, "palette.npy"), os.path.join(rnd, "palette.npy"))
        sh(py, "-m", "megapix", "extract", "--checkpoint", rnd, "--data", "digits", "--out", rnd + "_features")
        sh(py, "-m", "megapix", "probe", rnd + "_features")
    with open(os.path.join(feats, "probe_results.json")) as f:
        res = json.load(f)
    singles = [r for r in res["results"] if r["name"].startswith("layer ")]
    best = max(singles, key=lambda r: r["val_acc"])
    n = len(singles) - 1
    concat5 = next((r for r in res["results"] if r["name"].startswith("concat5")), None)
    print(f"\nbest single layer by val: {best['layers'][0]} of 0..{n} (test {100 * best['test_acc']:.2f}%); "
          f"last layer test {100 * singles[-1]['test_acc']:.2f}%; "
          f"peak in the middle: {0 < best['layers'][0] < n}")
    n_test = res["counts"]["test"]
    se = 100 * (0.1 * 0.9 / max(n_test, 1)) ** 0.5
    print(f"(chance is {100 / res['num_classes']:.1f}%; one binomial standard error at chance on {n_test} test images "
          f"is {se:.1f} points: differences smaller than ~2 SE are noise)")
    if concat5:
        best_test = max(singles, key=lambda r: r["test_acc"])
        print(f"5-layer concatenation {concat5['layers']}: test {100 * concat5['test_acc']:.2f}% vs best single "
              f"layer (by val) {100 * best['test_acc']:.2f}% (best by test: layer {best_test['layers'][0]}, "
              f"{100 * best_test['test_acc']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
