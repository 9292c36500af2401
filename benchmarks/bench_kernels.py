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
"""
from __future__ import annotations

import argparse
import math
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


def _bench(fn, warmup=10, rep=50) -> float:
    """Median milliseconds per call."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- correctness

def check_correctness() -> list:
    from megapix import kernels
    from megapix.kernels.reference import add_norm_reference, attention_reference

    rows = []
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    bf16_tol = 2e-2  # max abs err / max abs ref, bf16 storage with fp32 accumulation
    for (B, H, T, D, causal) in [(2, 4, 1, 64, True), (2, 4, 77, 96, True), (2, 3, 1000, 128, False),
                                 (1, 8, 2048, 64, True), (2, 2, 513, 32, False)]:
        q, k, v, do = (torch.randn(B, H, T, D, device=dev, generator=g) for _ in range(4))
        qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
        o = kernels.flash_attention(qb, kb, vb, causal=causal, backend="triton")
        o.backward(do.bfloat16())
        qf, kf, vf = (t.bfloat16().float().requires_grad_() for t in (q, k, v))
        o_ref = attention_reference(qf, kf, vf, causal=causal)
        o_ref.backward(do.bfloat16().float())
        errs = {"o": _rel_err(o, o_ref), "dq": _rel_err(qb.grad, qf.grad), "dk": _rel_err(kb.grad, kf.grad),
                "dv": _rel_err(vb.grad, vf.grad)}
        if T == 1:  # dq, dk are exactly zero for a single key
            errs["dq"] = qb.grad.float().abs().max().item()
            errs["dk"] = kb.grad.float().abs().max().item()
        ok = all(e <= bf16_tol for e in errs.values())
        rows.append((f"attn B{B} H{H} T{T} Dh{D} {'causal' if causal else 'bidir'}", errs, ok))
    for (lead, n, res) in [((8, 512), 96, True), ((4, 333), 1000, False), ((2, 1024), 1536, True),
                           ((4096,), 3072, True)]:
        shape = (*lead, n)
        x, r, dy, dres = (torch.randn(shape, device=dev, generator=g) for _ in range(4))
        w = torch.rand(n, device=dev, generator=g) + 0.5
        xb = x.bfloat16().requires_grad_()
        rb = r.bfloat16().requires_grad_() if res else None
        wb = w.clone().requires_grad_()  # fp32 weight, bf16 activations (mixed precision layout)
        y, h = kernels.add_norm(xb, rb, wb, backend="triton")
        torch.autograd.backward([y, h] if res else [y], [dy.bfloat16(), dres.bfloat16()] if res else [dy.bfloat16()])
        xf = xb.detach().float().requires_grad_()
        rf = rb.detach().float().requires_grad_() if res else None
        wf = w.clone().requires_grad_()
        yr, hr = add_norm_reference(xf, rf, wf)
        torch.autograd.backward([yr, hr] if res else [yr], [dy.bfloat16().float(), dres.bfloat16().float()]
                                if res else [dy.bfloat16().float()])
        errs = {"y": _rel_err(y, yr), "dx": _rel_err(xb.grad, xf.grad), "dw": _rel_err(wb.grad, wf.grad)}
        if res:
            errs["h"] = _rel_err(h, hr)
            errs["dres"] = _rel_err(rb.grad, rf.grad)
        ok = all(e <= bf16_tol for e in errs.values())
        rows.append((f"add_norm {shape} residual={res}", errs, ok))
    return rows


# ----------------------------------------------------------------------------- attention

def bench_attention(quick: bool) -> list:
    from megapix import kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    rows = []
    dev = "cuda"
    seqs = [1024, 4096] if quick else [1024, 2048, 4096]
    dims = [64, 128] if quick else [64, 96, 128]
    target_rows = 64 * 1024  # B*H*T query rows per problem: >= 512 query blocks of 128 (~4 waves on 132 SMs)
    impls = {
        "triton": lambda q, k, v, c: kernels.flash_attention(q, k, v, causal=c, backend="triton"),
        "sdpa-flash": (SDPBackend.FLASH_ATTENTION, None),
        "sdpa-cudnn": (SDPBackend.CUDNN_ATTENTION, None),
    }
    for D in dims:
        for T in seqs:
            BH = max(1, target_rows // T)
            B, H = max(1, BH // 16), min(16, BH)
            for causal in (True, False):
                q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                flops_fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                for name, impl in impls.items():
                    if name == "triton":
                        def f(impl=impl):
                            return impl(q, k, v, causal)
                    else:
                        backend = impl[0]

                        def f(backend=backend):
                            with sdpa_kernel([backend]):
                                return sdpa(q, k, v, is_causal=causal)
                    try:
                        f()  # also surfaces "no kernel for this config" errors
                        with torch.no_grad():
                            ms_f = _bench(f)

                        def fb(f=f):
                            o = f()
                            torch.autograd.grad(o, (q, k, v), do)
                        ms_fb = _bench(fb)
                        rows.append((D, T, B, H, causal, name, flops_fwd / ms_f / 1e9,
                                     3.5 * flops_fwd / ms_fb / 1e9))
                    except Exception as e:  # e.g. cuDNN backend unavailable for a shape
                        rows.append((D, T, B, H, causal, name, float("nan"), float("nan")))
                        print(f"  {name} Dh{D} T{T} causal={causal}: unavailable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]})")
                print(f"  attention Dh{D} T{T} causal={causal}: done", flush=True)
                del q, k, v, do
    return rows


# ----------------------------------------------------------------------------- add_norm

def bench_add_norm(quick: bool) -> list:
    from megapix import kernels
    from megapix.kernels.reference import add_norm_reference

    try:
        from apex.normalization import FusedRMSNorm
    except Exception:
        FusedRMSNorm = None
    rows = []
    dev = "cuda"
    n_rows = 16 * 1024
    widths = [1536, 3072] if quick else [1000, 1536, 3072, 4096]
    for n in widths:
        x = torch.randn(n_rows, n, device=dev, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.ones(n, device=dev, dtype=torch.bfloat16)
        copy_dst = torch.empty(3 * n_rows, n, device=dev, dtype=torch.bfloat16)
        copy_src = torch.randn_like(copy_dst)
        moved = 4 * x.numel() * x.element_size()  # read x, r; write y, h
        cands = {
            "triton": lambda: kernels.add_norm(x, r, w, backend="triton"),
            "torch-eager": lambda: add_norm_reference(x, r, w),
            # the same number of bytes moved (read 2 tensors' worth, write 2) as a plain copy
            "d2d-copy": lambda: copy_dst[: 2 * n_rows].copy_(copy_src[: 2 * n_rows]),
        }
        if FusedRMSNorm is not None:
            apex_norm = FusedRMSNorm(n, eps=1e-5).to(dev, torch.bfloat16)
            cands["apex-FusedRMSNorm(+add)"] = lambda: (apex_norm(x + r), None)
        for name, fn in cands.items():
            with torch.no_grad():
                ms = _bench(fn)
            rows.append((n, name, moved / ms / 1e6))
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
