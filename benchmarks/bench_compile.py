"""Training steps of megapix's ImageGPT eager against --compile (each block through torch.compile), one process.

    .venv/bin/python benchmarks/bench_compile.py [--rows tiny,small,igpt-s-block] [--batch 8] [--repeats 5]
                                                 [--threads N] [--json FILE] [--profile] [--optimizer]
                                                 [--attention]

Rows: the tiny and small presets, and one block of igpt-s's width (d512, 8 heads) at 32x32 (a slice of the real
model's step: the width decides how much fusion can save). A step is forward + cross-entropy + backward + AdamW,
as the trainer's (without DeepSpeed). The two models hold the same weights; the steps are timed in runs of three, eager
and compiled in ABBA order (load drift hits both alike), and the table reports medians. The compile
column is the time torch.compile spent (dynamo's own timer) in the first compiled step.

--profile adds, for one small-preset step eager and compiled, torch.profiler's split of the step: time in GEMMs
(aten::mm/addmm/bmm and the like), in SDPA's fused attention kernels and everything else, and the GEMMs' achieved
TFLOP/s against the matmul peak this process measures at start-up (megapix.runlog.measured_matmul_tflops, what the
trainer's CPU MFU uses). Compiling calls the same GEMMs and attention kernels, so eager step / (GEMMs + attention)
is the ceiling of compiled / eager, printed beside it.

--attention adds one small-preset layer's causal attention, forward and backward: SDPA's fused CPU kernel (what the
model calls) against the same attention written out as matmul, masked softmax and matmul, eager and compiled.

--optimizer adds the AdamW update alone for each row's parameters: torch's foreach implementation (what the trainer
used on CPU before) against the fused one (megapix.engine.adamw, what it uses now), same gradients, ABBA runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megapix.config import model_preset
from megapix.engine import adamw
from megapix.model.compile import compile_blocks, compile_seconds
from megapix.model.igpt import ImageGPT, lm_loss
from megapix.runlog import measured_matmul_tflops

ROWS = {"tiny": dict(preset="tiny"), "small": dict(preset="small"),
        "igpt-s-block": dict(preset="igpt-s", n_layer=1)}


def make(row: str, seed: int = 0):
    spec = dict(ROWS[row])
    config = model_preset(spec.pop("preset"), kernels="torch", **spec)
    model = ImageGPT(config, seed=seed)
    return model, adamw(list(model.parameters()), lr=1e-4)  # the trainer's AdamW


def step(model, opt, tokens) -> float:
    t0 = time.perf_counter()
    loss = lm_loss(model(tokens), tokens)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(row: str, batch: int, repeats: int) -> dict:
    eager, e_opt = make(row)
    compiled, c_opt = make(row)
    assert compile_blocks(compiled, "require", "cpu") is None
    n_ctx = eager.config.n_ctx
    tokens = torch.randint(0, 512, (batch, n_ctx), generator=torch.Generator().manual_seed(0))
    before = compile_seconds()
    first = step(compiled, c_opt, tokens)
    compile_s = compile_seconds() - before
    step(eager, e_opt, tokens)  # warm-up: thread pools, allocator
    e_times, c_times = [], []
    # in runs of a few steps, eager then compiled then compiled then eager (drift in the machine's load hits both
    # alike): not alternating every step, since each mode's OpenMP threads spin a while after their last loop and
    # would slow the other mode's next step
    runs = {"e": (eager, e_opt, e_times), "c": (compiled, c_opt, c_times)}
    for mode in "ecce" * max(1, -(-repeats // 6)):  # repeats rounded up to a multiple of 6 per mode
        model, opt, times = runs[mode]
        times += [step(model, opt, tokens) for _ in range(3)]
    e, c = statistics.median(e_times), statistics.median(c_times)
    tokens_n = batch * n_ctx
    return {"row": row, "params_m": sum(p.numel() for p in eager.parameters()) / 1e6, "batch": batch,
            "n_ctx": n_ctx, "eager_tok_s": tokens_n / e, "compiled_tok_s": tokens_n / c, "speedup": e / c,
            "compile_s": compile_s, "first_compiled_step_s": first}


def optimizer_row(row: str, repeats: int) -> dict:
    """The AdamW update alone over `row`'s parameters, foreach against fused, the same gradients."""
    model, _ = make(row)
    grads = [torch.randn_like(p) for p in model.parameters()]
    opts = {}
    for kind in ("foreach", "fused"):
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opts[kind] = torch.optim.AdamW(params, lr=1e-4, **{kind: True})
        opts[kind].step()  # warm-up: the moments allocated
    times = {"foreach": [], "fused": []}
    for kind in ("foreach", "fused", "fused", "foreach") * max(1, -(-repeats // 6)):
        for _ in range(3):
            t0 = time.perf_counter()
            opts[kind].step()
            times[kind].append(time.perf_counter() - t0)
    f, u = statistics.median(times["foreach"]), statistics.median(times["fused"])
    return {"row": row, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "foreach_ms": 1e3 * f,
            "fused_ms": 1e3 * u, "speedup": f / u}


GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")
ATTENTION = "aten::_scaled_dot_product_"


def profile_step(row: str, batch: int) -> list[dict]:
    """One step of `row`, eager and compiled (after a step that compiles), under torch.profiler: the GEMMs' share
    of the step and their achieved TFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for mode in ("eager", "compiled"):
        model, opt = make(row)
        if mode == "compiled":
            compile_blocks(model, "require", "cpu")
        tokens = torch.randint(0, 512, (batch, model.config.n_ctx), generator=torch.Generator().manual_seed(0))
        step(model, opt, tokens)
        step(model, opt, tokens)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            total = step(model, opt, tokens)
        averages = prof.key_averages()
        events = [e for e in averages if e.key in GEMMS]
        # self time: a linear's time is its addmm's, counted once
        gemm_s = sum(e.self_cpu_time_total for e in events) / 1e6
        flops = sum(e.flops for e in events)
        # SDPA's fused CPU kernels, forward and backward: the same ATen calls eager and compiled
        attention_s = sum(e.self_cpu_time_total for e in averages if e.key.startswith(ATTENTION)) / 1e6
        out.append({"row": row, "mode": mode, "step_s": total, "gemm_s": gemm_s, "gemm_share": gemm_s / total,
                    "gemm_tflops": flops / max(gemm_s, 1e-9) / 1e12, "attention_s": attention_s,
                    "rest_s": total - gemm_s - attention_s})
    return out


def attention_row(batch: int, repeats: int) -> dict:
    """One small-preset layer's causal attention, forward and backward (ms, median): SDPA's fused CPU kernel against
    the same attention written out (matmul, masked softmax, matmul), eager and compiled."""
    import math

    config = model_preset("small", kernels="torch")
    heads, t = config.n_head, config.n_ctx
    dh = config.d_model // heads
    visible = torch.ones(t, t, dtype=torch.bool).tril()

    def written_out(q, k, v):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v

    ways = {"sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            "written_out": written_out, "written_out_compiled": torch.compile(written_out)}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, t, dh, generator=g, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, t, dh, generator=g)
    out = {"batch": batch, "heads": heads, "n_ctx": t, "head_dim": dh}
    for name, f in ways.items():
        for _ in range(3):  # warm-up (and the compile)
            f(q, k, v).backward(grad)
        times = []
        for _ in range(max(repeats, 6)):
            t0 = time.perf_counter()
            f(q, k, v).backward(grad)
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1e3 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--profile", action="store_true", help="also the GEMM split of one small-preset step")
    ap.add_argument("--optimizer", action="store_true", help="also AdamW alone, foreach against fused, per row")
    ap.add_argument("--attention", action="store_true",
                    help="also one small-preset layer's attention: SDPA's kernel against it written out")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(r, a.batch, a.repeats) for r in a.rows.split(",")]
    n = 6 * max(1, -(-a.repeats // 6))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, median of {n} steps each")
    print("| row | params | tokens/step | eager tok/s | compiled tok/s | compiled / eager | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['params_m']:.2f}M | {r['batch'] * r['n_ctx']} | {r['eager_tok_s']:.0f} | "
              f"{r['compiled_tok_s']:.0f} | {r['speedup']:.2f}x | {r['compile_s']:.1f} |")
    report = {"rows": rows}
    if a.profile:
        peak = measured_matmul_tflops(torch.float32)
        report["profile"] = prof = profile_step("small", a.batch)
        print(f"\none small-preset step under torch.profiler; matmul peak measured here: {peak:.3f} TFLOP/s")
        print("| mode | step s | in GEMMs | GEMM share | GEMM TFLOP/s | of the peak | in SDPA's kernels | the rest |")
        print("|---|---|---|---|---|---|---|---|")
        for r in prof:
            print(f"| {r['mode']} | {r['step_s']:.3f} | {r['gemm_s']:.3f} | {100 * r['gemm_share']:.0f}% | "
                  f"{r['gemm_tflops']:.3f} | {100 * r['gemm_tflops'] / peak:.0f}% | {r['attention_s']:.3f} | "
                  f"{r['rest_s']:.3f} |")
        eager = prof[0]
        # compilation leaves the GEMMs and SDPA's kernels as they are (the same ATen calls): the most it could give
        # is the step without everything else
        report["compile_ceiling"] = ceiling = eager["step_s"] / (eager["gemm_s"] + eager["attention_s"])
        print(f"the most compiling can give, were the rest of the eager step gone: {ceiling:.2f}x; this profile: "
              f"{eager['step_s'] / prof[1]['step_s']:.2f}x")
        report["matmul_peak_tflops"] = peak
    if a.optimizer:
        report["optimizer"] = opt_rows = [optimizer_row(r, a.repeats) for r in a.rows.split(",")]
        print("\nthe AdamW update alone (median ms per step)")
        print("| row | params | foreach ms | fused ms | fused / foreach speed |")
        print("|---|---|---|---|---|")
        for r in opt_rows:
            print(f"| {r['row']} | {r['params_m']:.2f}M | {r['foreach_ms']:.1f} | {r['fused_ms']:.1f} | "
                  f"{r['speedup']:.1f}x |")
    if a.attention:
        report["attention"] = r = attention_row(a.batch, a.repeats)
        print(f"\none small-preset layer's causal attention, forward + backward, batch {r['batch']} x {r['heads']} "
              f"heads x {r['n_ctx']} positions x {r['head_dim']} dims (median ms)")
        print("| SDPA's CPU kernel | written out, eager | written out, compiled |")
        print("|---|---|---|")
        print(f"| {r['sdpa_ms']:.1f} | {r['written_out_ms']:.1f} | {r['written_out_compiled_ms']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
