"""GPU benchmark for kernels/ (one H100/H200-class GPU, a few minutes).

    python benchmarks/bench_kernels.py [--quick]

1. Correctness first: the Triton kernels in bf16 against fp32 PyTorch references
   (forward and all gradients); the run stops if any check fails.
2. Attention: forward and forward+backward TFLOP/s, causal and bidirectional,
   Dh 64/96/128, T 1024..4096, B*H sized so each problem has 64K query rows
   (enough blocks to fill an H200), against torch SDPA with the FLASH_ATTENTION
   and CUDNN_ATTENTION backends in the same run.
   FLOPs: fwd 4*B*H*T*T*Dh, fwd+bwd 3.5x that (2 matmuls fwd, 5 bwd), halved when causal.
3. add_norm: effective GB/s (bytes read + written once) against torch eager,
   a device-to-device copy of the same bytes (x.copy_ into a preallocated tensor:
   the practical bandwidth ceiling), and apex FusedRMSNorm when importable.

Prints a summary table last.  Exits with a clear message when no CUDA device is present.

The one-command check of a GPU machine is benchmarks/gpu_check.py: it imports the pieces here (the correctness
cases, `time_attention`, `time_add_norm`) at the iGPT-S/L shapes and adds MFU, planner memory and loss curves;
this script is the wider sweep (T up to 4096, bidirectional, apex).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device available; this benchmark needs a GPU (nothing was run).",
              file=sys.stderr)
        sys.exit(2)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels: triton is not importable; install triton to benchmark the kernels.", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels: unset TRITON_INTERPRET to benchmark compiled kernels.", file=sys.stderr)
        sys.exit(2)


def bench_ms(fn, device="cuda", warmup=10, rep=50) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA (warmup/rep in ms); on CPU (gpu_check --smoke)
    a perf_counter loop of a few calls, enough to exercise the code, not a measurement worth quoting."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    import statistics
    import time

    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|: the error relative to the reference's scale."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def abs_err(out, ref) -> float:
    return (out.float() - ref.float()).abs().max().item()


# ----------------------------------------------------------------------------- correctness

BF16_TOL = 2e-2  # max abs err / max abs ref, bf16 storage with fp32 accumulation
# (B, H, T, Dh, causal); gpu_check adds the iGPT-S/L shapes
ATTN_CASES = [(2, 4, 1, 64, True), (2, 4, 77, 96, True), (2, 3, 1000, 128, False), (1, 8, 2048, 64, True),
              (2, 2, 513, 32, False)]
# (leading shape, width, with residual)
NORM_CASES = [((8, 512), 96, True), ((4, 333), 1000, False), ((2, 1024), 1536, True), ((4096,), 3072, True)]


def attention_errors(B, H, T, D, causal, device="cuda", backend="triton", generator=None) -> tuple[dict, dict]:
    """megapix.kernels.flash_attention in bf16 (forward and dq/dk/dv) against the fp32 reference on the same
    bf16-rounded inputs: ({output: max abs err}, {output: max abs err / max abs ref})."""
    from megapix import kernels
    from megapix.kernels.reference import attention_reference

    g = generator or torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, generator=g) for _ in range(4))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    o = kernels.flash_attention(qb, kb, vb, causal=causal, backend=backend)
    o.backward(do.bfloat16())
    qf, kf, vf = (t.bfloat16().float().requires_grad_() for t in (q, k, v))
    o_ref = attention_reference(qf, kf, vf, causal=causal)
    o_ref.backward(do.bfloat16().float())
    pairs = {"o": (o, o_ref), "dq": (qb.grad, qf.grad), "dk": (kb.grad, kf.grad), "dv": (vb.grad, vf.grad)}
    absolute = {name: abs_err(a, b) for name, (a, b) in pairs.items()}
    rel = {name: rel_err(a, b) for name, (a, b) in pairs.items()}
    if T == 1:  # dq, dk are exactly zero for a single key: the absolute error is the measure
        rel["dq"], rel["dk"] = absolute["dq"], absolute["dk"]
    return absolute, rel


def add_norm_errors(lead, n, res, device="cuda", backend="triton", generator=None) -> tuple[dict, dict]:
    """megapix.kernels.add_norm (iGPT's uncentred norm fused with the residual add) in bf16 with an fp32 weight,
    forward and every gradient, against the fp32 reference on the same bf16-rounded inputs: (abs, rel errors)."""
    from megapix import kernels
    from megapix.kernels.reference import add_norm_reference

    g = generator or torch.Generator(device=device).manual_seed(0)
    shape = (*lead, n)
    x, r, dy, dres = (torch.randn(shape, device=device, generator=g) for _ in range(4))
    w = torch.rand(n, device=device, generator=g) + 0.5
    xb = x.bfloat16().requires_grad_()
    rb = r.bfloat16().requires_grad_() if res else None
    wb = w.clone().requires_grad_()  # fp32 weight, bf16 activations (mixed precision layout)
    y, h = kernels.add_norm(xb, rb, wb, backend=backend)
    torch.autograd.backward([y, h] if res else [y], [dy.bfloat16(), dres.bfloat16()] if res else [dy.bfloat16()])
    xf = xb.detach().float().requires_grad_()
    rf = rb.detach().float().requires_grad_() if res else None
    wf = w.clone().requires_grad_()
    yr, hr = add_norm_reference(xf, rf, wf)
    torch.autograd.backward([yr, hr] if res else [yr], [dy.bfloat16().float(), dres.bfloat16().float()]
                            if res else [dy.bfloat16().float()])
    pairs = {"y": (y, yr), "dx": (xb.grad, xf.grad), "dw": (wb.grad, wf.grad)}
    if res:
        pairs.update(h=(h, hr), dres=(rb.grad, rf.grad))
    return ({name: abs_err(a, b) for name, (a, b) in pairs.items()},
            {name: rel_err(a, b) for name, (a, b) in pairs.items()})


def check_correctness(device="cuda", backend="triton", attn_cases=ATTN_CASES, norm_cases=NORM_CASES,
                      tol=BF16_TOL) -> list:
    """Rows (name, relative errors, ok) for every attention and add_norm case."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for (B, H, T, D, causal) in attn_cases:
        _, errs = attention_errors(B, H, T, D, causal, device, backend, g)
        rows.append((f"attn B{B} H{H} T{T} Dh{D} {'causal' if causal else 'bidir'}", errs,
                     all(e <= tol for e in errs.values())))
    for (lead, n, res) in norm_cases:
        _, errs = add_norm_errors(lead, n, res, device, backend, g)
        rows.append((f"add_norm {(*lead, n)} residual={res}", errs, all(e <= tol for e in errs.values())))
    return rows


# ----------------------------------------------------------------------------- attention

def attention_flops(B, H, T, D, causal) -> float:
    """Forward FLOPs (2 matmuls), halved when causal; forward + backward is 3.5x (5 matmuls backward)."""
    return 4 * B * H * T * T * D * (0.5 if causal else 1.0)


def attention_impls(device="cuda") -> dict:
    """name -> f(q, k, v, causal). CUDA: megapix's Triton kernel and torch SDPA pinned to its FLASH_ATTENTION and
    CUDNN_ATTENTION backends. CPU (gpu_check --smoke): megapix's torch path and SDPA's MATH backend, which is what
    a CPU offers; labelled as such, they only exercise the code."""
    from megapix import kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def pinned(backend):
        def f(q, k, v, causal):
            with sdpa_kernel([backend]):
                return sdpa(q, k, v, is_causal=causal)
        return f

    if torch.device(device).type == "cuda":
        return {"triton": lambda q, k, v, c: kernels.flash_attention(q, k, v, causal=c, backend="triton"),
                "sdpa-flash": pinned(SDPBackend.FLASH_ATTENTION),
                "sdpa-cudnn": pinned(SDPBackend.CUDNN_ATTENTION)}
    return {"megapix-torch (CPU)": lambda q, k, v, c: kernels.flash_attention(q, k, v, causal=c, backend="torch"),
            "sdpa-math (CPU)": pinned(SDPBackend.MATH)}


def time_attention(B, H, T, D, causal, impls, device="cuda", warmup=10, rep=50) -> dict:
    """name -> (fwd TFLOP/s, fwd+bwd TFLOP/s, None) or (nan, nan, "why unavailable") for bf16 [B, H, T, D]."""
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    flops_fwd = attention_flops(B, H, T, D, causal)
    out = {}
    for name, impl in impls.items():
        def f(impl=impl):
            return impl(q, k, v, causal)

        def fb(f=f):
            o = f()
            torch.autograd.grad(o, (q, k, v), do)

        try:
            f()  # also surfaces "no kernel for this config" errors
            with torch.no_grad():
                ms_f = bench_ms(f, device, warmup, rep)
            ms_fb = bench_ms(fb, device, warmup, rep)
            out[name] = (flops_fwd / ms_f / 1e9, 3.5 * flops_fwd / ms_fb / 1e9, None)
        except Exception as e:  # e.g. cuDNN backend unavailable for a shape
            out[name] = (float("nan"), float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return out


def bench_attention(quick: bool) -> list:
    rows = []
    dev = "cuda"
    seqs = [1024, 4096] if quick else [1024, 2048, 4096]
    dims = [64, 128] if quick else [64, 96, 128]
    target_rows = 64 * 1024  # B*H*T query rows per problem: >= 512 query blocks of 128 (~4 waves on 132 SMs)
    impls = attention_impls(dev)
    for D in dims:
        for T in seqs:
            BH = max(1, target_rows // T)
            B, H = max(1, BH // 16), min(16, BH)
            for causal in (True, False):
                for name, (tf, tfb, why) in time_attention(B, H, T, D, causal, impls, dev).items():
                    rows.append((D, T, B, H, causal, name, tf, tfb))
                    if why:
                        print(f"  {name} Dh{D} T{T} causal={causal}: unavailable ({why})")
                print(f"  attention Dh{D} T{T} causal={causal}: done", flush=True)
    return rows


# ----------------------------------------------------------------------------- add_norm

def time_add_norm(n_rows, n, device="cuda", backend="triton", apex=False, warmup=10, rep=50) -> dict:
    """name -> effective GB/s of the add_norm forward on bf16 [n_rows, n] (read x and the residual, write y and h:
    4 x n_rows x n x 2 bytes) for megapix's kernel (`backend`), torch eager, and a device copy of the same bytes
    (copy_ of 2 x n_rows x n into a preallocated tensor: reads 2, writes 2, the practical bandwidth ceiling)."""
    from megapix import kernels
    from megapix.kernels.reference import add_norm_reference

    x = torch.randn(n_rows, n, device=device, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.ones(n, device=device, dtype=torch.bfloat16)
    copy_dst = torch.empty(2 * n_rows, n, device=device, dtype=torch.bfloat16)
    copy_src = torch.randn_like(copy_dst)
    moved = 4 * x.numel() * x.element_size()
    cands = {
        backend: lambda: kernels.add_norm(x, r, w, backend=backend),
        "torch-eager": lambda: add_norm_reference(x, r, w),
        "copy": lambda: copy_dst.copy_(copy_src),
    }
    if apex:
        try:
            from apex.normalization import FusedRMSNorm

            apex_norm = FusedRMSNorm(n, eps=1e-5).to(device, torch.bfloat16)
            cands["apex-FusedRMSNorm(+add)"] = lambda: (apex_norm(x + r), None)
        except Exception:
            pass
    out = {}
    for name, fn in cands.items():
        with torch.no_grad():
            out[name] = moved / bench_ms(fn, device, warmup, rep) / 1e6
    return out


def bench_add_norm(quick: bool) -> list:
    rows = []
    widths = [1536, 3072] if quick else [1000, 1536, 3072, 4096]
    for n in widths:
        for name, gbs in time_add_norm(16 * 1024, n, "cuda", "triton", apex=True).items():
            rows.append((n, "d2d-copy" if name == "copy" else name, gbs))
        print(f"  add_norm N={n}: done", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()
    _require_cuda()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

    print("== correctness (bf16 Triton vs fp32 reference) ==", flush=True)
    corr = check_correctness()
    for name, errs, ok in corr:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    if not all(ok for _, _, ok in corr):
        print("correctness check failed: not benchmarking", file=sys.stderr)
        return 1

    print("== attention ==", flush=True)
    attn = bench_attention(args.quick)
    print("== add_norm ==", flush=True)
    norm = bench_add_norm(args.quick)

    print("\n== summary ==")
    print(f"{'Dh':>4} {'T':>5} {'B':>3} {'H':>3} {'mask':>6} {'impl':>11} {'fwd TFLOP/s':>12} {'fwd+bwd TFLOP/s':>16}")
    for D, T, B, H, causal, name, tf, tfb in attn:
        print(f"{D:>4} {T:>5} {B:>3} {H:>3} {'causal' if causal else 'bidir':>6} {name:>11} "
              f"{tf:>12.1f} {tfb:>16.1f}")
    print(f"\n{'N':>5} {'impl':>24} {'GB/s (fwd, bf16)':>17}")
    for n, name, gbs in norm:
        print(f"{n:>5} {name:>24} {gbs:>17.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
