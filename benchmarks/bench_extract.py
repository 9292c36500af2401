"""Feature extraction throughput: megapix.features.extract vs Hugging Face ImageGPT, same weights, CPU.

    python benchmarks/bench_extract.py [--images 32] [--batch 16] [--repeats 3] [--precision fp32,bf16]
    python benchmarks/bench_extract.py --cpu-batch [--images 512] [--repeats 2]

--cpu-batch: megapix's own batches on a CPU, capped at features.CPU_BATCH_TOKENS tokens per forward, against
256 rows per forward (extract's default before the cap), same model and images; the features must be equal.

The HF baseline is the usual recipe: ImageGPTModel(output_hidden_states=True) on [SOS] + tokens[:, :-1], then
for each wanted layer l < n_layer apply h[l].ln_1 to hidden_states[l] (the input of block l) and mean-pool;
for l = n_layer hidden_states[-1] already has ln_f applied. HF always runs every block and keeps every hidden
state; megapix runs blocks only up to max(layers), pools as it goes, and uses SDPA attention.
The weights go megapix -> save_pretrained -> HF from_pretrained. fp32 rows check max |diff| <= 1e-4 against
HF fp32. bf16 rows run both sides under the same CPU bf16 autocast (`megapix extract --precision bf16`; AMX
makes bf16 matmuls ~4x faster than fp32 on recent Xeons) and report the difference to HF's fp32 features.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from megapix.config import ModelConfig
from megapix.features import extract, parse_layers
from megapix.model import ImageGPT


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def hf_features(hf, tokens, layers, batch, precision="fp32"):
    out = []
    n_layer = hf.config.n_layer
    with torch.inference_mode(), autocast(precision):
        for lo in range(0, len(tokens), batch):
            t = tokens[lo:lo + batch]
            ids = torch.cat([torch.full((len(t), 1), 512), t[:, :-1]], 1)
            hs = hf(ids, output_hidden_states=True).hidden_states
            out.append(torch.cat([(hs[l] if l == n_layer else hf.h[l].ln_1(hs[l])).float().mean(1) for l in layers],
                                 1))
    return torch.cat(out)


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_batch_table(images: int, repeats: int) -> None:
    """The CPU cap against uncapped 256-row batches, over model widths and resolutions."""
    import megapix.features as features

    cap = features.CPU_BATCH_TOKENS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {images} images, best of {repeats}, "
          f"all layers")
    print("| model | rows per forward, 256 | s | rows per forward, capped | s | speed-up | max abs diff |\n"
          "|---|---|---|---|---|---|---|")
    for name, cfg in {"4L d64 16x16": ModelConfig(n_layer=4, d_model=64, n_head=4, resolution=16),
                      "4L d128 16x16": ModelConfig(n_layer=4, d_model=128, n_head=4, resolution=16),
                      "4L d256 16x16": ModelConfig(n_layer=4, d_model=256, n_head=8, resolution=16),
                      "4L d64 32x32": ModelConfig(n_layer=4, d_model=64, n_head=4, resolution=32)}.items():
        model = ImageGPT(cfg, seed=0).eval()
        tokens = torch.randint(0, 512, (images, cfg.n_ctx), generator=torch.Generator().manual_seed(0))
        layers = parse_layers("all", cfg.n_layer)
        try:
            features.CPU_BATCH_TOKENS = 1 << 40  # no cap: 256 rows per forward
            old = extract(model, tokens, layers, 256)
            t_old = best_time(lambda: extract(model, tokens, layers, 256), repeats)
        finally:
            features.CPU_BATCH_TOKENS = cap
        new = extract(model, tokens, layers, 256)
        t_new = best_time(lambda: extract(model, tokens, layers, 256), repeats)
        print(f"| {name} | {min(256, images)} | {t_old:.2f} | {max(1, cap // cfg.n_ctx)} | {t_new:.2f} | "
              f"{t_old / t_new:.2f}x | {float((old - new).abs().max()):.1e} |", flush=True)


def main() -> int:
    import transformers

    transformers.logging.set_verbosity_error()  # the lm_head "UNEXPECTED" load report is expected here
    transformers.logging.disable_progress_bar()

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (CPU autocast, both sides)")
    p.add_argument("--cpu-batch", action="store_true", help="the CPU batch cap against 256-row batches, no HF")
    args = p.parse_args()
    if args.cpu_batch:
        cpu_batch_table(args.images, args.repeats)
        return 0
    shapes = {  # name -> config: the CPU "bench" preset shape, and a deeper one at 16x16
        "bench 4L d256 32x32": ModelConfig(n_layer=4, d_model=256, n_head=8, resolution=32),
        "12L d256 16x16": ModelConfig(n_layer=12, d_model=256, n_head=8, resolution=16),
    }
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.images} images, batch {args.batch}, best of {args.repeats}")
    precisions = args.precision.split(",")
    print("| model | layers | precision | HF img/s | megapix img/s | speed-up | max abs diff to HF fp32 |\n"
          "|---|---|---|---|---|---|---|")
    for name, cfg in shapes.items():
        model = ImageGPT(cfg, seed=0).eval()
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = transformers.ImageGPTModel.from_pretrained(d).eval()
        tokens = torch.randint(0, 512, (args.images, cfg.n_ctx), generator=torch.Generator().manual_seed(0))
        L = cfg.n_layer
        cases = {"all": parse_layers("all", L), f"5 centred at {L // 2}": parse_layers(None, L, center=L // 2),
                 f"{L // 2}": [L // 2]}
        for label, layers in cases.items():
            ref = hf_features(hf, tokens, layers, args.batch)
            for precision in precisions:
                amp = torch.bfloat16 if precision == "bf16" else None
                ours = extract(model, tokens, layers, args.batch, autocast_dtype=amp)
                diff = float((ours - ref).abs().max())
                if precision == "fp32":
                    assert diff <= 1e-4, diff
                t_hf = best_time(lambda: hf_features(hf, tokens, layers, args.batch, precision), args.repeats)
                t_mp = best_time(lambda: extract(model, tokens, layers, args.batch, autocast_dtype=amp), args.repeats)
                print(f"| {name} | {label} | {precision} | {args.images / t_hf:.1f} | {args.images / t_mp:.1f} | "
                      f"{t_hf / t_mp:.2f}x | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
