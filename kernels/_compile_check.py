"""Ahead-of-time compile check for the Triton kernels, no GPU needed.

Compiles every kernel with the pinned configs of ``configs.py`` to a cubin for
Hopper (sm90) and Ampere (sm80) with triton's bundled ptxas, and checks the
shared memory each kernel needs against the per-block limit of the target
(sm90: 227 KB, sm80: 163 KB).  It catches type errors in the compiled (non
interpreter) code path and configs that cannot launch; it says nothing about speed.

    python -m megapix.kernels._compile_check           # full matrix (a few minutes on 2 cores)
    python -m megapix.kernels._compile_check --quick   # the subset the tests run

Must run WITHOUT TRITON_INTERPRET=1 (it needs triton's compiled standard library).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

import torch

SMEM_LIMIT = {90: 232448, 80: 166912}
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _signature(fn, ptrs, consts, floats):
    sig = {}
    for name in inspect.signature(fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(lazy, ptrs, consts, floats, cap, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=triton.jit(lazy.fn), signature=_signature(lazy.fn, ptrs, consts, floats),
                                    constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    smem = k.metadata.shared
    if smem > SMEM_LIMIT[cap]:
        raise RuntimeError(f"{lazy.__name__}: needs {smem} B shared memory > sm{cap} limit {SMEM_LIMIT[cap]}")
    return smem


def check_attention(cap, dtype, head_dim, causal):
    from . import _triton_attention as A
    from . import configs

    arch = "sm90" if cap >= 90 else "sm80"
    bd = A._head_dim_block(head_dim)
    hd = 32 if bd <= 32 else (64 if bd <= 64 else 128)
    fwd = configs._ATTN_TABLE.get((arch, "fwd", hd, dtype == torch.float32), configs._FALLBACK_ATTN)
    bwd = configs._ATTN_TABLE.get((arch, "bwd", hd, dtype == torch.float32), configs._FALLBACK_ATTN)
    dt = _DT[dtype]
    ptrs = {n: "*" + dt for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update(LSE="*fp32", DELTA="*fp32")
    prec = A._prec(dtype)
    out = {}
    c = dict(CAUSAL=causal, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BLOCK_D=bd, PREC=prec)
    out["fwd"] = _compile(A._attn_fwd, ptrs, c, ("qk_scale",), cap, fwd.num_warps, fwd.num_stages)
    c = dict(CAUSAL=causal, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n, BLOCK_D=bd, PREC=prec)
    out["dkdv"] = _compile(A._attn_bwd_dkdv, ptrs, c, ("qk_scale", "sm_scale"), cap, bwd.num_warps, bwd.num_stages)
    out["dq"] = _compile(A._attn_bwd_dq, ptrs, c, ("qk_scale", "sm_scale"), cap, bwd.num_warps, bwd.num_stages)
    out["pre"] = _compile(A._attn_bwd_preprocess, ptrs, dict(BLOCK_M=64, BLOCK_D=bd), (), cap, 4, 1)
    return out


def check_norm(cap, dtype, n, with_res):
    from . import _triton_norm as N
    from .configs import norm_config

    dt = _DT[dtype]
    cfg = norm_config(n, torch.empty((), dtype=dtype).element_size(), interpret=False)
    ptrs = dict(X="*" + dt, R="*fp32", W="*fp32", Y="*" + dt, HOUT="*fp32", RSTD="*fp32",
                DY="*" + dt, H="*fp32", DHOUT="*fp32", DX="*" + dt, DW_PART="*fp32")
    return {
        "fwd": _compile(N._add_norm_fwd, ptrs, dict(HAS_RES=with_res, BLOCK_N=cfg.block_n), ("eps",), cap,
                        cfg.num_warps, 1),
        "bwd": _compile(N._add_norm_bwd, ptrs, dict(HAS_DHOUT=with_res, BLOCK_N=cfg.block_n), (), cap,
                        cfg.num_warps, 1),
    }


def main(argv=None) -> int:
    import triton

    if triton.knobs.runtime.interpret:
        print("unset TRITON_INTERPRET to run the compile check", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        attn = [(90, torch.bfloat16, 96, True), (80, torch.float16, 64, False)]
        norm = [(90, torch.bfloat16, 1000, True), (80, torch.float32, 3072, False)]
    else:
        attn = [(cap, dt, d, c) for cap in (90, 80) for dt in _DT for d in (32, 64, 96, 128) for c in (True, False)]
        norm = [(cap, dt, n, r) for cap in (90, 80) for dt in _DT for n in (96, 1000, 1536, 3072, 8192)
                for r in (True, False)]
    failed = 0
    for case in attn:
        t = time.time()
        try:
            smem = check_attention(*case)
            print(f"attention sm{case[0]} {_DT[case[1]]} Dh={case[2]} causal={case[3]}: ok smem={smem} "
                  f"({time.time() - t:.1f}s)", flush=True)
        except Exception as e:  # report all failures
            failed += 1
            print(f"attention {case}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    for case in norm:
        try:
            smem = check_norm(*case)
            print(f"add_norm sm{case[0]} {_DT[case[1]]} N={case[2]} residual={case[3]}: ok smem={smem}", flush=True)
        except Exception as e:
            failed += 1
            print(f"add_norm {case}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    print("compile check:", "FAILED" if failed else "all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
