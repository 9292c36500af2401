"""MFU of igpt-s and igpt-l training steps on one GPU (written for an H200), bf16, kernels="auto".

    python benchmarks/gpu_mfu.py [--models igpt-s igpt-l] [--steps 10] [--warmup 3] [--batch-s 32] [--batch-l 8]

Each model runs through a DeepSpeed engine exactly as training does (bf16, ZeRO-0, world of one, fused AdamW),
on random palette tokens at the preset's 32x32 context. Reported: step time, tokens/s, TFLOP/s (the trainer's
FLOP count: 6 per weight per token plus attention, causal mask not discounted) and MFU against the device's
dense bf16 peak (megapix.engine.PEAK_TFLOPS, or --peak-tflops). Budget: well under 8 minutes on an H200.
Without CUDA it says so and exits 0 (nothing to measure).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def bench(name: str, batch: int, steps: int, warmup: int, peak: float | None) -> dict:
    import deepspeed
    import torch

    from megapix.config import model_preset
    from megapix.parallel import LossModel
    from megapix.model import ImageGPT, lm_loss

    cfg = model_preset(name, kernels="auto")
    model = ImageGPT(cfg, seed=0)
    engine, _, _, _ = deepspeed.initialize(
        model=LossModel(model, lm_loss),
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True),
        config={"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch,
                "gradient_accumulation_steps": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
                "steps_per_print": 10**9})
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 512, (batch, cfg.n_ctx), device="cuda", generator=g)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(tokens)
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tok_s = batch * cfg.n_ctx / dt
    tflops = tok_s * cfg.flops_per_token() / 1e12
    res = {"model": name, "params_M": cfg.num_parameters() / 1e6, "batch": batch, "step_s": dt,
           "tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / peak if peak else None,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    del engine, model
    torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["igpt-s", "igpt-l"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-s", type=int, default=32, help="micro-batch for igpt-s (and igpt-m)")
    p.add_argument("--batch-l", type=int, default=8, help="micro-batch for igpt-l and larger")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA device here; nothing to measure (run on a GPU machine, e.g. one H200)")
        return 0
    from megapix.engine import device_peak_tflops
    from megapix.parallel.launch import init_distributed

    init_distributed()
    peak = device_peak_tflops(args.peak_tflops)
    print(f"device {torch.cuda.get_device_name()}, peak {peak} TFLOP/s (bf16 dense)", flush=True)
    results = []
    for name in args.models:
        batch = args.batch_s if name in ("igpt-s", "igpt-m") else args.batch_l
        try:
            r = bench(name, batch, args.steps, args.warmup, peak)
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of memory at micro-batch {batch}; lower --batch-*", flush=True)
            continue
        results.append(r)
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a (pass --peak-tflops)"
        print(f"{name}: {r['params_M']:.0f}M params, batch {batch} x 1024 tokens, {r['step_s'] * 1e3:.1f} ms/step, "
              f"{r['tokens_per_s']:,.0f} tok/s, {r['tflops']:.1f} TFLOP/s, MFU {mfu}, peak mem "
              f"{r['peak_mem_gb']:.1f} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
