"""Pinned launch configurations.

Block sizes, warps and pipeline stages are chosen from a small deterministic
table keyed on (GPU architecture, padded head dim, dtype, causal) instead of
``triton.autotune``: autotuning times candidates at run time and different
ranks of a distributed job may pick different configs (and so produce slightly
different numerics).  A table lookup is identical on every rank.

The values are educated starting points for Hopper (sm90) and Ampere (sm80/86)
in the spirit of the Triton FlashAttention tutorial; they have NOT been tuned
on hardware yet (no GPU was available when this was written).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Under TRITON_INTERPRET=1 every program runs in Python/numpy: small blocks keep
# CPU tests fast and exercise the multi-block loops and the edge masking.
INTERPRET_ATTN = AttnConfig(16, 16, 1, 1)

# key: (arch, "fwd"|"bwd", head_dim_block, is_fp32) -> config; causal handled below
_ATTN_TABLE = {
    # Hopper (H100/H200): 228 KB smem per SM.
    ("sm90", "fwd", 32, False): AttnConfig(128, 64, 4, 3),
    ("sm90", "fwd", 64, False): AttnConfig(128, 64, 4, 3),
    ("sm90", "fwd", 128, False): AttnConfig(128, 64, 8, 3),
    ("sm90", "bwd", 32, False): AttnConfig(64, 64, 4, 3),
    ("sm90", "bwd", 64, False): AttnConfig(64, 64, 4, 3),
    ("sm90", "bwd", 128, False): AttnConfig(64, 64, 8, 2),
    ("sm90", "fwd", 32, True): AttnConfig(64, 32, 4, 2),
    ("sm90", "fwd", 64, True): AttnConfig(64, 32, 4, 2),
    ("sm90", "fwd", 128, True): AttnConfig(64, 32, 4, 2),
    ("sm90", "bwd", 32, True): AttnConfig(32, 32, 4, 2),
    ("sm90", "bwd", 64, True): AttnConfig(32, 32, 4, 2),
    ("sm90", "bwd", 128, True): AttnConfig(32, 32, 4, 1),
    # Ampere (A100 164 KB smem; sm86 ~100 KB): a bit smaller.
    ("sm80", "fwd", 32, False): AttnConfig(128, 64, 4, 3),
    ("sm80", "fwd", 64, False): AttnConfig(128, 64, 4, 3),
    ("sm80", "fwd", 128, False): AttnConfig(128, 32, 4, 2),
    ("sm80", "bwd", 32, False): AttnConfig(64, 64, 4, 2),
    ("sm80", "bwd", 64, False): AttnConfig(64, 64, 4, 2),
    ("sm80", "bwd", 128, False): AttnConfig(32, 64, 4, 2),
    ("sm80", "fwd", 32, True): AttnConfig(64, 32, 4, 2),
    ("sm80", "fwd", 64, True): AttnConfig(64, 32, 4, 2),
    ("sm80", "fwd", 128, True): AttnConfig(32, 32, 4, 2),
    ("sm80", "bwd", 32, True): AttnConfig(32, 32, 4, 2),
    ("sm80", "bwd", 64, True): AttnConfig(32, 32, 4, 2),
    ("sm80", "bwd", 128, True): AttnConfig(32, 32, 4, 1),
}

_FALLBACK_ATTN = AttnConfig(64, 32, 4, 2)


def _arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "other"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return "other"


def attention_config(
    which: str, head_dim_block: int, dtype: torch.dtype, causal: bool, device: torch.device,
    interpret: bool,
) -> AttnConfig:
    """Config for the attention forward ("fwd") or the two backward kernels ("bwd")."""
    if interpret:
        return INTERPRET_ATTN
    hd = 32 if head_dim_block <= 32 else (64 if head_dim_block <= 64 else 128)
    cfg = _ATTN_TABLE.get((_arch(device), which, hd, dtype == torch.float32), _FALLBACK_ATTN)
    # Causal attention does less work per query block; the same tiles are used
    # (the diagonal block is masked inside the kernel) so nothing changes here.
    del causal
    return cfg


@dataclass(frozen=True)
class NormConfig:
    block_n: int
    num_warps: int
    rows_per_program: int


def norm_config(n: int, element_size: int, interpret: bool) -> NormConfig:
    """One row per program in the forward; the backward uses a fixed grid."""
    import triton

    block_n = triton.next_power_of_2(n)
    if interpret:
        return NormConfig(block_n, 1, 1)
    max_fused = 65536 // max(element_size, 1)
    if block_n > max_fused:
        raise ValueError(f"add_norm: width {n} too large for the fused Triton kernel (max {max_fused})")
    num_warps = min(max(block_n * element_size // 256, 1), 16)
    num_warps = 1 << (num_warps.bit_length() - 1)  # power of two
    return NormConfig(block_n, num_warps, 1)


def norm_bwd_programs(n_rows: int, device: torch.device, interpret: bool, sms: int | None = None) -> int:
    """Number of programs of the norm backward (= rows of the dW partial buffer): two per SM. `sms`: the SM count
    (default: the device's; the compile check passes its target's)."""
    if interpret:
        return max(1, min(n_rows, 4))
    if sms is None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    if sms:
        return max(1, min(n_rows, 2 * sms))
    return max(1, min(n_rows, 8))
