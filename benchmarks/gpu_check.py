"""The GPU check: one command, one report, on one H100/H200 in under 8 minutes.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 450] [--batch-s 32] [--batch-l 8] [--smoke]

Sections (each records its own error and wall time; a failure never loses the rest of the report):
  1 kernels_correct   megapix's Triton attention (forward, dq/dk/dv) and fused add + iGPT norm (y, h and every
                      gradient) in bf16 against the fp32 PyTorch references, iGPT-S/L head dims (64, 96) and widths
                      (512, 1536) among other shapes; max abs and max rel error (rel = max |err| / max |ref|), pass
                      at rel <= 2e-2 (bench_kernels.BF16_TOL).
  2 attention_tflops  causal bf16 attention forward + backward TFLOP/s at the iGPT-S and iGPT-L shapes (T = 1024 =
                      32x32, heads and head dim from the presets, the batch of section 4): Triton vs torch SDPA
                      pinned to FLASH_ATTENTION and to CUDNN_ATTENTION; goal: Triton >= 1.0x flash.
  3 add_norm_gbps     add_norm forward GB/s at the iGPT-S/L activations vs a device copy (Tensor.copy_) of the same
                      bytes; goal >= 85% of the copy. The backward (dx, dresidual, dweight) is timed beside it.
  4 mfu               igpt-s and igpt-l through megapix.engine.Trainer.fit (DeepSpeed, bf16, ZeRO-0, world of one,
                      synthetic images at the preset's 32x32), kernels auto vs torch; MFU = tokens/s x
                      ModelConfig.flops_per_token / the planner's device peak (megapix.plan.DEVICES).
  5 planner_memory    megapix.plan.memory for exactly those runs (TP1 PP1 DP1 ZeRO-0, their micro-batch) vs
                      torch.cuda.max_memory_allocated; goal: within 10%.
  6 training_curves   30 bf16 steps of igpt-s (batch 8, seed 0, synthetic data) with kernels=triton and
                      kernels=torch; both loss curves and the max relative difference; pass at <= 2e-2.
The report: benchmarks/results/gpu_check-<device>-<date>T<HHMM>.json and .md (or --out DIR), header with the GPU, torch,
triton, DeepSpeed, CUDA and cuDNN versions, the date and every section's wall time; a short table on stdout.
Time: each section has its own budget (scaled by --budget-s); an item that would overrun it is skipped with the
reason written in the report. The wider kernel sweep (T up to 4096, bidirectional, apex) is bench_kernels.py,
whose functions sections 1-3 import; section 4 replaces the former gpu_mfu.py.

Exit status: 1 only for a crash or a wrong number (a section that raised; kernels outside tolerance; curves of the two
kernel paths apart), else 0; the speed and planner goals (sections 2, 3, 5) are reported as "goal met" / "goal
missed" in the table and under "goals" in the JSON, never as an exit status (the report is written either way).
Without CUDA (and without --smoke) it prints one line and exits 0, writing nothing. --smoke runs every section's code
on CPU, in seconds, for CI (tests/test_gpu_check.py): the tiny preset instead of igpt-s/l, megapix's torch kernel
path instead of Triton, SDPA's math backend instead of flash/cuDNN, "n/a on CPU" for max_memory_allocated and for
MFU (no peak for a CPU); every substitution is labelled in the report, and the report goes to a temporary folder unless
--out is given. Its numbers say the code runs, nothing about speed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback

import torch

import bench_kernels as bk  # benchmarks/ is the script's folder, so on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
NA_CPU = "n/a on CPU"
TRAIN_TOL = 2e-2
MEM_TOL = 0.10
# seconds per section at --budget-s 450 (scaled with it); planner_memory only reads section 4's measurements
SHARES = {"kernels_correct": 70, "attention_tflops": 45, "add_norm_gbps": 20, "mfu": 200, "planner_memory": 5,
          "training_curves": 110}
SECTIONS = list(SHARES)
# Sections whose pass/fail is a speed or model goal: reported as "goal met" / "goal missed", never an exit status.
# The others check numbers (kernels against references, the two kernel paths' curves): "fail" there exits 1.
GOAL_SECTIONS = {"attention_tflops", "add_norm_gbps", "planner_memory"}
GOAL_STATUS = {"pass": "goal met", "fail": "goal missed"}
TUNING = ("Block configs to tune: attention tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per (arch, fwd|bwd, "
          "head-dim block, fp32) in `_ATTN_TABLE`, kernels/configs.py (sm90 = H100/H200; a missing key falls back "
          "to `_FALLBACK_ATTN`); the norm's BLOCK_N/num_warps in `norm_config` and the backward grid in "
          "`norm_bwd_programs`, same file. The configs each attention row used are in its `config` column.")


class Budget:
    """A section's time: `allows(est)` is False when an item estimated at est seconds would overrun it."""

    def __init__(self, seconds: float, deadline: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds
        self.deadline = deadline  # the whole run's

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return min(self.seconds - self.used(), self.deadline - time.perf_counter())

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate

    def skip_reason(self, estimate: float) -> str:
        return (f"skipped: estimated {estimate:.0f} s, {max(0.0, self.left()):.0f} s left of the section's "
                f"{self.seconds:.0f} s budget")


class Ctx:
    def __init__(self, args):
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        self.cuda = self.device == "cuda"
        # the kernel path under test: what "auto" resolves to here (torch on CPU, or on a GPU without triton)
        from megapix.kernels import resolve_backend

        self.backend = resolve_backend("auto", torch.empty(0, device=self.device))
        self.args = args
        self.work = tempfile.mkdtemp(prefix="gpu_check-work-")
        self.runs: dict = {}  # section 4's measurements, read by section 5
        self.dist_ready = False
        self.item_errors: list = []  # tracebacks of the current section's failed items (run() reports them)

    def item_error(self, e: BaseException) -> str:
        """Record a failed item (one shape, one run) of a section; the section goes on with the next item."""
        self.item_errors.append(traceback.format_exc(limit=6))
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"

    def models(self) -> list:
        """(preset, micro-batch) of sections 2-5: igpt-s and igpt-l; the tiny preset in --smoke."""
        if self.smoke:
            return [("tiny", 2)]
        return [("igpt-s", self.args.batch_s), ("igpt-l", self.args.batch_l)]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _model(name: str, kernels: str = "auto"):
    from megapix.config import model_preset

    return model_preset(name, kernels=kernels)


# ----------------------------------------------------------------------------- 1 kernels_correct

def sec_kernels_correct(ctx: Ctx, budget: Budget) -> dict:
    if ctx.smoke:
        attn = [(1, 2, 16, 16, True), (1, 2, 9, 32, False), (1, 2, 1, 16, True)]
        norm = [((2, 8), 64, True), ((3, 5), 40, False)]
    else:
        s, l = _model("igpt-s"), _model("igpt-l")
        attn = [(2, s.n_head, s.n_ctx, s.head_dim, True), (1, l.n_head, l.n_ctx, l.head_dim, True),
                (2, 4, 77, 96, True), (2, 3, 1000, 128, False), (2, 4, 1, 64, True), (2, 2, 513, 32, False)]
        norm = [((4, 1024), s.d_model, True), ((2, 1024), l.d_model, True), ((4, 333), 1000, False),
                ((8, 512), 96, True), ((4096,), 3072, True)]
    rows, est = [], 0.0
    g = torch.Generator(device=ctx.device).manual_seed(0)
    items = [("attention", c) for c in attn] + [("add_norm", c) for c in norm]
    for kind, case in items:
        if kind == "attention":
            B, H, T, D, causal = case
            name = f"attention B{B} H{H} T{T} Dh{D} {'causal' if causal else 'bidir'}"
        else:
            lead, n, res = case
            name = f"add_norm {(*lead, n)} residual={res}"
        if not budget.allows(est):
            rows.append({"case": name, "skipped": budget.skip_reason(est)})
            continue
        t0 = time.perf_counter()
        fn = bk.attention_errors if kind == "attention" else bk.add_norm_errors
        try:
            absolute, rel = fn(*case, device=ctx.device, backend=ctx.backend, generator=g)
        except Exception as e:
            rows.append({"case": name, "error": ctx.item_error(e)})
            est = time.perf_counter() - t0
            continue
        ok = all(v <= bk.BF16_TOL for v in rel.values())
        rows.append({"case": name, "max_abs": absolute, "max_rel": rel, "worst_rel": max(rel.values()), "ok": ok})
        est = time.perf_counter() - t0
    done = [r for r in rows if "ok" in r]
    return {"rows": rows, "impl": "triton" if ctx.cuda else "megapix torch path (CPU smoke: no Triton on CPU)",
            "goal": f"max rel error <= {bk.BF16_TOL:g} (bf16 storage, fp32 accumulation) on every output",
            "status": ("pass" if all(r["ok"] for r in done) else "fail") if done else "skipped",
            "summary": f"{sum(r['ok'] for r in done)}/{len(done)} ok, worst rel "
                       f"{max((r['worst_rel'] for r in done), default=float('nan')):.2e}"}


# ----------------------------------------------------------------------------- 2 attention_tflops

def _attn_config(D: int, ctx: Ctx) -> str:
    if not ctx.cuda:
        return "n/a (no Triton launch on CPU)"
    from megapix.kernels._triton_attention import _head_dim_block
    from megapix.kernels.configs import attention_config

    bd = _head_dim_block(D)
    cfgs = {w: attention_config(w, bd, torch.bfloat16, True, torch.device("cuda"), False) for w in ("fwd", "bwd")}
    return "; ".join(f"{w} M{c.block_m} N{c.block_n} w{c.num_warps} s{c.num_stages}" for w, c in cfgs.items())


def sec_attention_tflops(ctx: Ctx, budget: Budget) -> dict:
    impls = bk.attention_impls(ctx.device)
    names = list(impls)
    ours, peer = names[0], names[1]
    rows, est = [], 0.0
    reps = dict(warmup=10, rep=50) if ctx.cuda else dict(warmup=0, rep=0)
    for preset, batch in ctx.models():
        m = _model(preset)
        B, H, T, D = batch, m.n_head, m.n_ctx, m.head_dim
        shape = f"{preset}: B{B} H{H} T{T} Dh{D} causal"
        if not budget.allows(est):
            rows.append({"shape": shape, "skipped": budget.skip_reason(est)})
            continue
        t0 = time.perf_counter()
        try:
            res = bk.time_attention(B, H, T, D, True, impls, ctx.device, **reps)
        except Exception as e:
            rows.append({"shape": shape, "error": ctx.item_error(e)})
            continue
        row = {"shape": shape, "config": _attn_config(D, ctx)}
        for name, (tf, tfb, why) in res.items():
            row[name] = {"fwd_tflops": tf, "fwd_bwd_tflops": tfb, **({"unavailable": why} if why else {})}
        a, b = res[ours][1], res[peer][1]
        row["ratio_vs_" + peer] = a / b if b == b and b > 0 and a == a else None
        rows.append(row)
        est = time.perf_counter() - t0
    ratios = [r["ratio_vs_" + peer] for r in rows if r.get("ratio_vs_" + peer) is not None]
    measured = [r for r in rows if "config" in r]
    if not measured:
        status = "skipped"
    elif not ctx.cuda:
        status = "n/a (smoke)"
    else:
        status = "pass" if ratios and len(ratios) == len(measured) and min(ratios) >= 1.0 else "fail"
    return {"rows": rows, "impls": names, "ours": ours, "peer": peer, "status": status,
            "goal": f"{ours} fwd+bwd TFLOP/s >= 1.0x {peer}" + ("" if ctx.cuda else " (GPU only; CPU smoke times "
                                                                            "the torch path against SDPA math)"),
            "flops": "fwd 4*B*H*T*T*Dh/2 (causal), fwd+bwd 3.5x that",
            "summary": "ratio vs " + peer + ": " + (", ".join(f"{x:.2f}x" for x in ratios) or "none")}


# ----------------------------------------------------------------------------- 3 add_norm_gbps

def _norm_config(n: int, ctx: Ctx) -> str:
    if not ctx.cuda:
        return "n/a (no Triton launch on CPU)"
    from megapix.kernels.configs import norm_config

    c = norm_config(n, 2, False)
    return f"fwd BLOCK_N {c.block_n} w{c.num_warps}, rows/program {c.rows_per_program}"


def time_add_norm_backward(n_rows, n, device, backend, warmup=10, rep=50) -> dict:
    """name -> effective GB/s of the add_norm backward (dx, dresidual, dweight) on bf16 [n_rows, n], timed beside the
    forward: megapix's `backend` and the torch reference (the lean autograd.Function)."""
    from megapix import kernels
    from megapix.kernels.reference import add_norm_reference

    moved = 4 * n_rows * n * 2
    impls = {backend: lambda x, r, w: kernels.add_norm(x, r, w, backend=backend)}
    if backend != "torch":  # the torch backend is the reference itself
        impls["torch-reference"] = add_norm_reference
    out = {}
    for name, fn in impls.items():
        x = torch.randn(n_rows, n, device=device, dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True)
        w = torch.ones(n, device=device, dtype=torch.bfloat16, requires_grad=True)
        y, h = fn(x, r, w)
        dy, dh = torch.randn_like(y), torch.randn_like(h)
        step = lambda: torch.autograd.grad((y, h), (x, r, w), (dy, dh), retain_graph=True)  # noqa: E731
        out[name] = moved / bk.bench_ms(step, device, warmup, rep) / 1e6
    return out


def sec_add_norm_gbps(ctx: Ctx, budget: Budget) -> dict:
    rows, est = [], 0.0
    reps = dict(warmup=10, rep=50) if ctx.cuda else dict(warmup=0, rep=0)
    for preset, batch in ctx.models():
        m = _model(preset)
        n_rows, n = batch * m.n_ctx, m.d_model
        shape = f"{preset}: [{n_rows}, {n}] bf16"
        if not budget.allows(est):
            rows.append({"shape": shape, "skipped": budget.skip_reason(est)})
            continue
        t0 = time.perf_counter()
        try:
            res = bk.time_add_norm(n_rows, n, ctx.device, ctx.backend, **reps)
        except Exception as e:
            rows.append({"shape": shape, "error": ctx.item_error(e)})
            continue
        try:
            backward = time_add_norm_backward(n_rows, n, ctx.device, ctx.backend, **reps)
        except Exception as e:
            backward = {"error": ctx.item_error(e)}
        rows.append({"shape": shape, "gbps": res, "fraction_of_copy": res[ctx.backend] / res["copy"],
                     "backward_gbps": backward, "config": _norm_config(n, ctx)})
        est = time.perf_counter() - t0
    done = [r for r in rows if "gbps" in r]
    fr = [r["fraction_of_copy"] for r in done]
    status = "skipped" if not done else ("n/a (smoke)" if not ctx.cuda else
                                         ("pass" if min(fr) >= 0.85 else "fail"))
    return {"rows": rows, "impl": ctx.backend, "status": status,
            "goal": ">= 85% of the copy's GB/s" + ("" if ctx.cuda else " (GPU only)"),
            "bytes": "read x and residual, write y and h: 4 x rows x width x 2 bytes; the copy moves the same. "
                     "Backward (not in the goal): read dy, h and the residual's gradient, write dx: the same 4 x rows "
                     "x width x 2 bytes (the fp32 rstd and the [programs, width] dW partials are small)",
            "summary": "of copy: " + (", ".join(f"{x:.0%}" for x in fr) or "none")}


# ----------------------------------------------------------------------------- 4 mfu (and 5's measurements)

def _palette(ctx: Ctx) -> str:
    import numpy as np

    path = os.path.join(ctx.work, "palette.npy")
    if not os.path.exists(path):
        np.save(path, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    return path


def _ensure_dist(ctx: Ctx) -> None:
    if not ctx.dist_ready:
        from megapix.parallel.launch import init_distributed

        init_distributed()
        ctx.dist_ready = True


def train_run(ctx: Ctx, preset: str, kernels: str, batch: int, steps: int, lr: float, tag: str,
              compile: str = "off") -> dict:
    """`steps` steps of Trainer.fit (the training loop itself: DeepSpeed engine, bf16, its metrics records) on
    synthetic images at the preset's resolution; no checkpoint is written (checkpoints=False, as a sweep)."""
    from megapix.config import Config, DataConfig, TrainConfig
    from megapix.engine import Trainer
    from megapix.runlog import RunLog
    from megapix.utils import read_metrics

    _ensure_dist(ctx)
    out = os.path.join(ctx.work, tag)
    os.makedirs(out, exist_ok=True)
    cfg = Config(model=_model(preset, kernels),
                 data=DataConfig(source=f"synthetic:{max(16, 2 * batch)}", palette=_palette(ctx)),
                 train=TrainConfig(global_batch=batch, micro_batch=batch, max_steps=steps, lr=lr, eval_every=0,
                                   precision="bf16", seed=0, log_every=10**9, out=out, compile=compile))
    metrics = os.path.join(out, "metrics.jsonl")
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    log = RunLog(out, True, plot=False)
    log.continue_from(None)
    tr = Trainer(cfg, run_log=log, checkpoints=False)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tr.fit(desc=tag)
    ctx.sync()
    run_s = time.perf_counter() - t1
    res = {"preset": preset, "kernels": kernels, "kernel_path": "torch" if kernels == "torch" else ctx.backend,
           "micro_batch": tr.micro_batch, "layout": tr.layout.describe(batch=False, world=True),
           "zero_stage": tr.layout.zero_stage, "records": read_metrics(metrics), "build_s": build_s, "run_s": run_s}
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info()
        res.update(max_allocated=torch.cuda.max_memory_allocated() - base, baseline_allocated=base,
                   max_reserved=torch.cuda.max_memory_reserved(), device_used=total - free)
    del tr
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return res


def device_model(ctx: Ctx):
    """The planner's model of this GPU (megapix.plan.devices, matched by name as the engine's MFU matches it), or
    None (a CPU, a GPU the planner does not model)."""
    dev = _device(ctx)
    return dev if dev is not None and dev.ib_gbps is not None else None


def _device(ctx: Ctx):
    from megapix.plan.devices import device_for

    return device_for(torch.cuda.get_device_name()) if ctx.cuda else None


def device_peak(ctx: Ctx):
    """(where the peak comes from, peak bf16 TFLOP/s) for this GPU, or (None, None)."""
    if ctx.args.peak_tflops:
        return "--peak-tflops", ctx.args.peak_tflops
    dev = _device(ctx)
    return (dev.name, dev.peak_tflops) if dev else (None, None)


def sec_mfu(ctx: Ctx, budget: Budget) -> dict:
    from megapix.plan import Layout, step_time

    steps, warmup = (2, 1) if ctx.smoke else (ctx.args.steps, ctx.args.warmup)
    dev_name, peak = device_peak(ctx)
    rows, last = [], {}
    for preset, batch in ctx.models():
        m = _model(preset)
        for kernels, compile in (("auto", "off"), ("torch", "off"), ("auto", "on")):  # on: --compile's blocks
            tag = f"mfu-{preset}-{kernels}" + ("-compiled" if compile == "on" else "")
            est = _estimate(last, preset, m, batch)
            if not budget.allows(est):
                rows.append({"model": preset, "kernels": kernels, "compile": compile,
                             "skipped": budget.skip_reason(est)})
                continue
            try:
                r = train_run(ctx, preset, kernels, batch, warmup + steps, 1e-4, tag, compile)
            except Exception as e:  # e.g. out of memory at this micro-batch: the other runs still go
                rows.append({"model": preset, "kernels": kernels, "compile": compile, "micro_batch": batch,
                             "error": ctx.item_error(e)})
                continue
            if compile == "off":
                ctx.runs[(preset, kernels)] = r
            last = {"preset": preset, "params": m.num_parameters(), "flops": batch * m.n_ctx * m.flops_per_token(),
                    "build_s": r["build_s"], "run_s": r["run_s"]}
            times = [rec["step_time_s"] for rec in r["records"][warmup:]]
            dt = statistics.median(times)
            tok_s = batch * m.n_ctx / dt
            tflops = tok_s * m.flops_per_token() / 1e12
            dev = device_model(ctx)
            planned = (step_time(m, Layout(zero=r["zero_stage"], micro_batch=batch), batch, 1, 1, dev).step
                       if dev else NA_CPU)
            rows.append({"model": preset, "kernels": kernels, "compile": compile, "kernel_path": r["kernel_path"],
                         "compile_s": sum(rec.get("compile_s", 0.0) for rec in r["records"]),
                         "params_M": m.num_parameters() / 1e6,
                         "micro_batch": batch, "step_s": dt, "planner_step_s": planned,
                         "tokens_per_s": tok_s, "tflops": tflops,
                         "mfu": tflops / peak if peak else NA_CPU,
                         "trainer_mfu": r["records"][-1].get("mfu"), "loss_last": r["records"][-1]["loss"],
                         "steps_timed": len(times), "build_s": r["build_s"]})
    done = [r for r in rows if "tflops" in r]
    return {"rows": rows, "device_model": dev_name, "peak_tflops": peak,
            "status": "skipped" if not done else "info",
            "goal": "none set; MFU = tokens/s x flops_per_token (6 per weight + 12 L T d, causal not discounted) / "
                    "peak" + ("" if ctx.cuda else "; CPU smoke: no peak, MFU n/a"),
            "note": f"median step of {steps} after {warmup} warm-up steps, Trainer.fit step times (data and "
                    "host work included, as in training); kernels=auto is Triton on CUDA; planner_step_s: "
                    "megapix.plan.step_time for this layout on the device model (matmuls at 60% of peak, less "
                    "below 1024 columns)"
                    + ("" if ctx.cuda else "; on CPU auto resolves to the torch path"),
            "summary": ", ".join(f"{r['model']}/{r['kernels']}{'+compile' if r['compile'] == 'on' else ''} "
                                 + (f"{r['mfu']:.1%}" if isinstance(r['mfu'], float)
                                                                   else f"{r['tflops']:.3g} TFLOP/s")
                                 for r in done) or "none"}


def _estimate(last: dict, preset: str, m, batch: int) -> float:
    """Seconds for the next run: the previous one's; when the model changes, its steps scaled by FLOPs per step and
    its build by the square root of the parameter ratio (a build is part fixed cost: DeepSpeed, data, palette; part
    per parameter: init, copies, fp32 masters). 0 for the first run (always tried)."""
    if not last:
        return 0.0
    if last["preset"] == preset:
        return last["build_s"] + last["run_s"]
    return (last["build_s"] * (m.num_parameters() / last["params"]) ** 0.5
            + last["run_s"] * batch * m.n_ctx * m.flops_per_token() / last["flops"])


# ----------------------------------------------------------------------------- 5 planner_memory

def sec_planner_memory(ctx: Ctx, budget: Budget) -> dict:
    from megapix.plan import WORKSPACE_BYTES, Layout, memory

    GiB = 2**30
    rows = []
    for preset, _batch in ctx.models():
        m = _model(preset)
        for kernels in ("auto", "torch"):
            r = ctx.runs.get((preset, kernels))
            if r is None:
                rows.append({"model": preset, "kernels": kernels,
                             "skipped": "no measurement: section mfu did not run this model (see its row)"})
                continue
            lay = Layout(tp=1, pp=1, dp=1, zero_stage=r["zero_stage"], micro_batch=r["micro_batch"])
            mem = memory(m, lay, r["micro_batch"], "bf16", kernels=r["kernel_path"])
            pred = mem.peak - WORKSPACE_BYTES  # ZeRO buckets stay in; the fixed context/slack goes
            row = {"model": preset, "kernels": kernels, "layout": lay.describe(),
                   "planner_peak_gib": mem.peak / GiB,
                   "planner_allocator_gib": pred / GiB,
                   "planner_parts_gib": {k: getattr(mem, k) / GiB for k in
                                         ("params", "grads", "master", "optimizer", "grads_backward",
                                          "activations", "workspace")}}
            if ctx.cuda:
                row.update(measured_max_allocated_gib=r["max_allocated"] / GiB,
                           ratio=pred / r["max_allocated"],
                           device_used_gib=r["device_used"] / GiB, ratio_with_workspace=mem.peak / r["device_used"],
                           max_reserved_gib=r["max_reserved"] / GiB)
            else:
                row.update(measured_max_allocated_gib=NA_CPU, ratio=NA_CPU)
            rows.append(row)
    done = [r for r in rows if "planner_peak_gib" in r]
    ratios = [r["ratio"] for r in done if isinstance(r.get("ratio"), float)]
    if not done:
        status = "skipped"
    elif not ctx.cuda:
        status = "n/a (smoke)"
    else:
        status = "pass" if all(abs(x - 1) <= MEM_TOL for x in ratios) else "fail"
    return {"rows": rows, "status": status,
            "goal": f"planner / measured within {MEM_TOL:.0%}",
            "note": "ratio = planner peak without its fixed 1.5 GiB workspace (CUDA context, NCCL, cuBLAS, allocator "
                    "slack: memory the caching allocator does not count) / torch.cuda.max_memory_allocated over "
                    "the run (construction included, minus what was allocated before it); ratio_with_workspace = "
                    "the full planner peak / device memory in use (cudaMemGetInfo) at the end",
            "summary": "ratios " + (", ".join(f"{x:.2f}" for x in ratios) or NA_CPU)}


# ----------------------------------------------------------------------------- 6 training_curves

def sec_training_curves(ctx: Ctx, budget: Budget) -> dict:
    preset, steps, batch = ("tiny", 4, 4) if ctx.smoke else ("igpt-s", 30, 8)
    pair = ("auto", "torch") if ctx.smoke else ("triton", "torch")
    curves, rows, est = {}, [], 0.0
    for kernels in pair:
        if not budget.allows(est):
            rows.append({"kernels": kernels, "skipped": budget.skip_reason(est)})
            continue
        t0 = time.perf_counter()
        try:
            r = train_run(ctx, preset, kernels, batch, steps, 1e-3, f"curve-{preset}-{kernels}")
        except Exception as e:
            rows.append({"kernels": kernels, "error": ctx.item_error(e)})
            est = time.perf_counter() - t0
            continue
        curves[kernels] = [rec["loss"] for rec in r["records"]]
        rows.append({"kernels": kernels, "steps": len(curves[kernels]), "first_loss": curves[kernels][0],
                     "last_loss": curves[kernels][-1]})
        est = time.perf_counter() - t0
    out = {"model": preset, "micro_batch": batch, "steps": steps, "seed": 0, "lr": 1e-3, "data": "synthetic",
           "rows": rows, "curves": curves,
           "goal": f"max over steps |loss_a - loss_b| / |loss_b| <= {TRAIN_TOL:g}: bf16 rounds to 2^-8 (0.4%) "
                   "relative, compounded over 30 optimizer steps of two different kernel orderings",
           "note": "" if ctx.cuda else "CPU smoke: kernels=auto resolves to the torch path on CPU, so both curves "
                                       "run the same code; this checks the plumbing, not the kernels"}
    if len(curves) == 2:
        a, b = (curves[k] for k in pair)
        diffs = [abs(x - y) / abs(y) for x, y in zip(a, b)]
        out["max_rel_diff"] = max(diffs)
        out["first_step_rel_diff"] = diffs[0]
        out["status"] = "pass" if len(a) == len(b) == steps and max(diffs) <= TRAIN_TOL else "fail"
        out["summary"] = f"max rel diff {max(diffs):.2e} over {len(diffs)} steps"
    else:
        out["status"], out["summary"] = "skipped", "one curve or none"
    return out


FUNCS = {"kernels_correct": sec_kernels_correct, "attention_tflops": sec_attention_tflops,
         "add_norm_gbps": sec_add_norm_gbps, "mfu": sec_mfu, "planner_memory": sec_planner_memory,
         "training_curves": sec_training_curves}


# ----------------------------------------------------------------------------- the report

def header(ctx: Ctx) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception as e:
            return f"not importable ({type(e).__name__})"

    h = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
         "mode": "smoke (CPU)" if ctx.smoke else "gpu", "gpu": torch.cuda.get_device_name() if ctx.cuda else "none",
         "torch": torch.__version__, "triton": version("triton"), "deepspeed": version("deepspeed"),
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if ctx.cuda else None,
         "python": platform.python_version(), "kernel_path": ctx.backend}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        h.update(sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30)
    return h


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else (f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}")
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def _table(rows: list) -> list:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")).replace("|", "/") for k in keys) + " |")
    return lines


def markdown(report: dict) -> str:
    h = report["header"]
    out = [f"# megapix GPU check: {h['gpu']} ({h['mode']}), {h['date']}", "",
           "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in h.items()] + \
          [f"| total wall (s) | {report['wall_s']:.1f} |", ""]
    out += ["| section | status | wall (s) | result |", "|---|---|---|---|"]
    for name, s in report["sections"].items():
        out.append(f"| {name} | {s['status']} | {s.get('wall_s', 0):.1f} | {_first_line(s)} |")
    for name, s in report["sections"].items():
        out += ["", f"## {name}: {s['status']}", "", f"wall {s.get('wall_s', 0):.1f} s of a {s['budget_s']:.0f} s "
                f"budget. Goal: {s.get('goal', '-')}"]
        for key in ("impl", "flops", "bytes", "note", "device_model", "peak_tflops"):
            if s.get(key):
                out.append(f"{key}: {s[key]}  ")
        if s.get("error"):
            out += ["", "```", s["error"].rstrip(), "```"]
        if s.get("rows"):
            out += [""] + _table(s["rows"])
        if s.get("curves"):
            ks = list(s["curves"])
            n = max(len(c) for c in s["curves"].values())
            out += ["", "| step | " + " | ".join(f"loss ({k})" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for i in range(n):
                out.append(f"| {i + 1} | " + " | ".join(f"{s['curves'][k][i]:.5f}" if i < len(s["curves"][k])
                                                        else "" for k in ks) + " |")
    out += ["", "---", TUNING, ""]
    return "\n".join(out)


def _first_line(s: dict) -> str:
    text = (s.get("summary") or s.get("error") or "").strip()
    return text.splitlines()[0].replace("|", "/") if text else ""


def stdout_table(report: dict) -> str:
    lines = [f"{'section':<18} {'status':<12} {'wall s':>7}  result"]
    for name, s in report["sections"].items():
        lines.append(f"{name:<18} {s['status']:<12} {s.get('wall_s', 0):>7.1f}  {_first_line(s)[:100]}")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "device"


def run(args) -> dict:
    ctx = Ctx(args)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    scale = args.budget_s / 450.0
    report = {"header": header(ctx), "sections": {}}
    wanted = args.sections or SECTIONS
    for name in SECTIONS:
        share = SHARES[name] * scale
        if name not in wanted:
            report["sections"][name] = {"status": "skipped", "budget_s": share, "wall_s": 0.0,
                                        "summary": "not selected (--sections)"}
            continue
        print(f"gpu_check: {name} ...", flush=True)
        budget = Budget(share, deadline)
        ctx.item_errors = []
        t0 = time.perf_counter()
        try:
            if budget.left() <= 0:
                sec = {"status": "skipped", "summary": "skipped: the run's time budget is spent"}
            else:
                sec = FUNCS[name](ctx, budget)
        except Exception as e:  # one section's failure never loses the report
            sec = {"status": "error", "error": traceback.format_exc(limit=6),
                   "summary": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            if ctx.cuda:
                gc.collect()
                torch.cuda.empty_cache()
        if ctx.item_errors:  # items that raised: the section reports them, with what the others measured
            sec["status"] = "error"
            sec["error"] = "\n".join(ctx.item_errors + ([sec["error"]] if sec.get("error") else []))
            sec["summary"] = f"{len(ctx.item_errors)} item(s) raised (see rows); " + sec.get("summary", "")
        if name in GOAL_SECTIONS:
            sec["status"] = GOAL_STATUS.get(sec["status"], sec["status"])
        sec["wall_s"] = time.perf_counter() - t0
        sec["budget_s"] = share
        report["sections"][name] = sec
    report["goals"] = {name: report["sections"][name]["status"] for name in GOAL_SECTIONS if name in report["sections"]}
    report["wall_s"] = time.perf_counter() - t_start
    report["tuning"] = TUNING
    import shutil

    shutil.rmtree(ctx.work, ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder of the report (default benchmarks/results/; --smoke: a new temporary folder)")
    p.add_argument("--smoke", action="store_true", help="run every section's code on CPU at tiny sizes (CI)")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time; section budgets scale with it")
    p.add_argument("--batch-s", type=int, default=32, help="igpt-s micro-batch (sections 2-5)")
    p.add_argument("--batch-l", type=int, default=8, help="igpt-l micro-batch (sections 2-5)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per MFU run")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per MFU run (not timed)")
    p.add_argument("--peak-tflops", type=float, help="device bf16 peak for MFU (default: the planner's device model)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these (default: all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.smoke:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; nothing measured, no report written (run it on a GPU machine; "
                  "--smoke runs its code on CPU)")
            return 0
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("gpu_check: TRITON_INTERPRET=1 is set; unset it to measure the compiled kernels", file=sys.stderr)
            return 2
    report = run(args)
    h = report["header"]
    out = args.out or (tempfile.mkdtemp(prefix="gpu_check-smoke-") if args.smoke else os.path.join(HERE, "results"))
    os.makedirs(out, exist_ok=True)
    # date and time in the name: a second run never replaces an earlier report; written to a temporary name
    # and renamed, so an interrupted write leaves no torn report
    when = h["date"][:16].replace(" ", "T").replace(":", "")
    stem = os.path.join(out, f"gpu_check-{_slug(h['gpu'] if not args.smoke else 'cpu-smoke')}-{when}")
    for ext, text in ((".json", json.dumps(report, indent=1, default=str)), (".md", markdown(report))):
        with open(stem + ext + ".tmp", "w") as f:
            f.write(text)
        os.replace(stem + ext + ".tmp", stem + ext)
    print()
    print(stdout_table(report))
    bad = [n for n, sec in report["sections"].items() if sec["status"] in ("fail", "error")]
    missed = [n for n, status in report["goals"].items() if status == "goal missed"]
    print(f"\ngpu_check: {report['wall_s']:.0f} s; report {stem}.json and {stem}.md"
          + (f"; failed or errored: {', '.join(bad)}" if bad else "")
          + (f"; goals missed (not an error): {', '.join(missed)}" if missed else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
