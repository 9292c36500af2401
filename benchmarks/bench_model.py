"""megapix's ImageGPT against Hugging Face transformers' ImageGPTForCausalImageModeling, same weights, CPU.

    .venv/bin/python benchmarks/bench_model.py [--preset bench] [--batch 4] [--repeats 7] [--warmup 2]
                                               [--threads N] [--optimizer] [--profile]

Both models hold identical weights (ours randomised, exported through megapix's HF converter and loaded into
HF's model, dropout 0) and are checked to give the same logits before timing. Rows: a training step
(forward + cross-entropy + backward, and an AdamW step with --optimizer, the same for both) and inference
(forward under no_grad). Each repeat times ours and HF's back to back, so load from other processes hits both
alike; the table reports medians. --profile prints torch.profiler's top operators for one training step of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from megapix.config import model_preset
from megapix.model.hf import hf_config, megapix_to_hf
from megapix.model.igpt import ImageGPT


def build(preset: str, seed: int = 0):
    config = model_preset(preset, kernels="torch")
    ours = ImageGPT(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised head would make the logits trivial
        ours.head.weight.copy_(torch.randn(ours.head.weight.shape, generator=gen) * 0.02)
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**{k: v for k, v in hf_config(config).items()
                                                          if not k.startswith("megapix_")}))
    missing, unexpected = hf.load_state_dict(megapix_to_hf(ours.state_dict(), config), strict=False)
    assert not unexpected and all(k.endswith("attn.bias") for k in missing), (missing, unexpected)
    return config, ours, hf


def our_logits(model, tokens):
    return model(tokens)


def hf_logits(model, tokens):
    sos = torch.full((tokens.shape[0], 1), 512, dtype=tokens.dtype)
    return model(torch.cat([sos, tokens[:, :-1]], 1)).logits


def train_step(model, logits_fn, tokens, opt):
    logits = logits_fn(model, tokens)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss


def infer(model, logits_fn, tokens, opt=None):
    with torch.no_grad():
        return logits_fn(model, tokens)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile(name, fn):
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"\n--- {name}: top operators by self CPU time ---")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--optimizer", action="store_true", help="include an AdamW step (foreach) in the training step")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config, ours, hf = build(args.preset)
    ours.train(), hf.train()  # dropout is 0 in both; train mode is what a training step runs
    tokens = torch.randint(0, 512, (args.batch, config.n_ctx), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (our_logits(ours, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff < 1e-4, f"the two models disagree (max |logit diff| {diff}); the comparison would be meaningless"

    opts = {}
    if args.optimizer:
        opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
                for m in (ours, hf)}
    runs = {"ours": (ours, our_logits), "hf": (hf, hf_logits)}
    rows = []
    for row, fn in (("train step" + (" (+AdamW)" if args.optimizer else ""), train_step), ("inference", infer)):
        times = {k: [] for k in runs}
        for i in range(args.warmup + args.repeats):
            for k, (model, logits_fn) in runs.items():
                t = timed(lambda: fn(model, logits_fn, tokens, opts.get(model)))
                if i >= args.warmup:
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((row, med["ours"], med["hf"], times))

    n_tok = args.batch * config.n_ctx
    print(f"megapix vs HF ImageGPT: preset {args.preset} (L{config.n_layer} d{config.d_model} H{config.n_head} "
          f"T{config.n_ctx}), batch {args.batch}, float32 CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median of {args.repeats} after {args.warmup} warm-up; max |logit diff| {diff:.1e}")
    print(f"{'':22} {'megapix ms':>11} {'HF ms':>9} {'megapix tok/s':>14} {'HF tok/s':>10} {'speedup':>8}")
    for row, a, b, _ in rows:
        print(f"{row:22} {a * 1e3:11.1f} {b * 1e3:9.1f} {n_tok / a:14.0f} {n_tok / b:10.0f} {b / a:7.2f}x")
    if args.profile:
        profile("megapix train step", lambda: train_step(ours, our_logits, tokens, None))
        profile("HF train step", lambda: train_step(hf, hf_logits, tokens, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
