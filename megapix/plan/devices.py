"""Device constants, the one table of them: the planner's device models and the peak the engine's MFU divides by.

Dense bf16 peak, HBM, and per-GPU link bandwidths in GB/s (one direction, as a ring all-reduce sees it). A100 SXM
80GB: NVLink3 600 GB/s bidirectional, one HDR 200 Gb/s NIC per GPU. H100 SXM: NVLink4 900 GB/s bidirectional, one
NDR 400 Gb/s NIC per GPU (DGX H100). H200: H100's links, 141 GB of HBM3e at 4.8 TB/s. A10, L40 and V100 carry only
their peak (the engine's MFU reads it); the planner models the GPUs with links (PLANNED).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16
    hbm_gbps: float | None = None
    nvlink_gbps: float | None = None
    ib_gbps: float | None = None
    memory_gb: float | None = None


DEVICES = {
    "a100": Device("A100 SXM 80GB", 312.0, 2039.0, 300.0, 25.0, 80.0),
    "h100": Device("H100 SXM 80GB", 989.0, 3350.0, 450.0, 50.0, 80.0),
    "h200": Device("H200 SXM 141GB", 989.0, 4800.0, 450.0, 50.0, 141.0),
    "a10": Device("A10", 125.0),
    "l40": Device("L40", 181.0),
    "v100": Device("V100", 125.0),
}
PLANNED = tuple(k for k, d in DEVICES.items() if d.ib_gbps is not None)  # `megapix plan --gpu` choices
EFFICIENCY = 0.6  # achieved fraction of peak on the model's matmuls (large bf16 GEMMs reach 0.6-0.75)
COMM_EFFICIENCY = 0.8  # achieved fraction of link bandwidth by NCCL rings
LATENCY_S = {"nvlink": 10e-6, "ib": 20e-6}  # per collective / p2p message
ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance default (elements)
ZERO3_MAX_LIVE = 1e9  # stage3_max_live_parameters default
ZERO3_BLOCK_OVERHEAD_S = 2e-4  # DeepSpeed ZeRO-3 parameter fetch/release per block and pass
FULL_WIDTH = 1024  # local GEMM width from which `efficiency` holds
WORKSPACE_BYTES = int(1.5 * GiB)
BUCKET_ELEMENTS = 50_000_000  # reduce/all-gather bucket in ds_configs/zero*.json


def device_for(gpu_name: str) -> Device | None:
    """The device a GPU's name (torch.cuda.get_device_name) names: the longest key it contains (A100 before A10),
    or None."""
    name = gpu_name.lower()
    found = [k for k in DEVICES if k in name]
    return DEVICES[max(found, key=len)] if found else None
