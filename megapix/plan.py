"""`megapix plan`: per-GPU memory, step time, tokens/s and MFU of a layout, and every layout that fits, ranked.

All formulas live here. Notation: P = parameters this rank holds before ZeRO partitions them (after the TP
split and the pipeline partition), d = DP size, t = TP size, p = PP size, m = micro-batches per step and
pipeline, b = micro-batch, s = n_ctx (sequence), h = d_model, a = heads, L = layers on this stage, V = 512.

Parameters per rank (exact, checked against the engine in tests/test_plan.py)
  embed layer: wte V*h + sos h + wpe n_pos*h (replicated under TP)
  block: 2 norms 2h (replicated), c_attn 3h^2/t, c_proj h^2/t, c_fc 4h^2/t, c_proj 4h^2/t (+ biases when the model
         has them: 3h/t + 4h/t column-parallel, 2h replicated row-parallel)
  head layer: norm_f h + head V*h/t
  Pipeline stages are cut as DeepSpeed's partition_method="parameters" cuts them (`partition_balanced`, the linear
  partition problem over the per-layer counts), so the planner reports the largest stage.

Model states per rank, in bytes per parameter, as DeepSpeed (this version) allocates them. "At step" is what is
alive when the optimizer steps (after backward), measured by walking the engine in tests/test_plan.py:
                          params   grads at step           fp32 master   Adam (m, v)
  bf16, ZeRO-0 (no PP)    2        2 + 4 (fp32 copy)       4             8          FP16_Optimizer-style wrapper
  bf16, ZeRO-0 with PP    2        4 + 4/d                 4/d           8/d        BF16_Optimizer: fp32 accumulation
                                                                                    buffer + the partition's fp32 grad
  bf16, ZeRO-1/2          2        4/d                     4/d           8/d        DeepSpeedZeroOptimizer
  bf16, ZeRO-3            2/d      2/d + 4/d               4/d           8/d        Stage-3 flat grad buffer + fp32 grad
  fp32, ZeRO-0            4        4                       0             8          torch AdamW itself, no copy
  fp32, ZeRO-1/2          4        4/d                     4/d           8/d        DeepSpeed clones the partition even
  fp32, ZeRO-3            4/d      4/d + 4/d               4/d           8/d        in fp32 (a "master" of same dtype)
  (All rows measured on CPU, bf16 too, by tests/test_plan.py. DeepSpeed's estimator says 2 + 18/d for ZeRO-1/2:
  it adds the 2/d bf16 gradient partition, which lives during backward and is freed before the step. ZeRO-3 keeps
  its flat gradient buffer and the fp32 partition's .grad apart even in fp32.)
  During backward, before the step, gradients also occupy: ZeRO-0/1 the full-size model-dtype gradients (2P or 4P,
  freed into the partition at the step), ZeRO-2 the reduce bucket (reduce_bucket_size elements) and the 16-bit
  partition (2P/d), ZeRO-3 the bucket.

Activations: the tensors autograd saves, per kernel path (`--kernels triton|torch`; auto = Triton, as on a GPU),
counted exactly with saved_tensors_hooks in tests/test_activations.py. Per block and micro-batch (see
block_activation_bytes for the tensor list): e s b h (4 + 12/t) on the torch path, e s b h (4 + 13/t) on Triton's
(its [B, H, T, Dh] attention output beside c_proj's [B, T, h] input), + 8 s b (two fp32 rstd per row) + 4 a s b / t
(the fp32 log-sum-exp), e = 2 in bf16 and 4 in fp32: 32 / 34 sbh in bf16 at t = 1, against Korthikanti et al. 2022
("Reducing Activation Recomputation", eq. 1) 34 sbh + 5 a s^2 b with dropout, which iGPT does not have. Under TP the
two norm inputs and the two column-parallel inputs are replicated. The embedding saves the int64 ids (8 s b); the
head its input, norm_f's, and the loss's fp32 log-softmax over V/t (head_activation_bytes); the loss also holds the
model-dtype logits and their fp32 copy for a moment (loss_transient_bytes, stated). Activation checkpointing
(deepspeed.checkpointing, every block): a block keeps its input (e s b h) and one block's full activations live
during its recompute (less its input, already kept), after the head's were freed.

Sequence parallelism (--sequence-parallel) cuts the replicated part (the two norm and two column-parallel inputs,
the norms' rstd) by t; context parallelism (--context-parallel) holds s / cp positions everywhere plus the ring's
K/V and partial results (ring_block_bytes), and puts its ranks on DeepSpeed's data axis: ZeRO and the gradient
traffic span DP x CP (Layout.data). Both counted like the rest in tests/test_activations.py and test_comms.py.

Pipeline (DeepSpeed's 1F1B TrainSchedule): stage i keeps min(p - i, m) micro-batches in flight (counted in 2- and
4-stage DeepSpeed runs), each its blocks' activations, the embedding's on the first stage and the head's on the
last; the planner reports the stage with the most. Pipe buffers (stated from DeepSpeed's PipelineEngine):
max(2, min(p - i, m)) buffers of a received input and an output (1/t of it under pipe_partitioned with TP).

Workspace: a fixed 1.5 GiB (CUDA context, NCCL, cuBLAS workspace, allocator slack) plus DeepSpeed's buckets: the
ZeRO-1/2 reduce/all-gather buckets (5e7 elements each in our ds_configs) and for ZeRO-3 the gathered full
parameters: the current and the prefetched layer (2 x largest layer, 16-bit), or, when more, those DeepSpeed keeps
gathered from the forward into the backward (zero3_kept_and_regathered: the reuse-distance rule).

Peak = params + master + Adam + max(grads at step, grads in backward + activations + pipe buffers) + workspace.

Step time (per GPU). Measured on CPU: the FLOPs (FlopCounterMode, tests/test_flops.py) and the bytes of every
collective and p2p message (comm_bytes against megapix.parallel.comms, tests/test_comms.py). Stated: the device
constants they are divided by (DEVICES: peak, HBM, NVLink, IB; `efficiency`, COMM_EFFICIENCY, LATENCY_S,
ZERO3_BLOCK_OVERHEAD_S), and which communication overlaps compute.
  compute   = tokens per GPU per step x ModelConfig.flops_per_token(recompute=checkpointing, executed=True) /
              (peak x efficiency): 6 per weight + 14 L s h (the flash-style backward recomputes the scores), one
              more forward of the blocks when recomputing. MFU counts model FLOPs, flops_per_token() (12 L s h).
  elementwise = HBM traffic of norms, activation, residuals and softmax statistics: ~40 h bytes per token and
              layer (forward + backward, 16-bit) over HBM bandwidth; the Adam step reads and writes ~30 bytes per
              local parameter (grads, master, m, v, 16-bit copy).
  TP        = the TP all-reduce payload of comm_bytes (4 of b s h per block and micro-batch, 6 recomputing, plus the
              head's), ring time 2 (t-1)/t x bytes / NVLink bandwidth; TP stays inside a node; on the critical path.
  PP        = bubble: the step takes (m + p - 1) micro-batch slots of one stage: compute / p x (m + p - 1) / m;
              the busiest stage's p2p sends (b s h forward and backward per micro-batch and boundary) over IB when
              the stages of a pipeline sit on different nodes, else NVLink.
  DP        = comm_bytes' payloads over the ring: ZeRO-0/1 all-reduce 2 (d-1)/d x 2P once per step after backward (not
              overlapped), + ZeRO-1's all-gather of the updated partitions, (d-1)/d x 2P.
              ZeRO-2: reduce-scatter every micro-batch, overlapped with backward (only what exceeds the backward time
              shows) + the same all-gather after the step (not overlapped).
              ZeRO-3: per micro-batch all-gather forward and backward (prefetched: overlapped with compute) +
              reduce-scatter (overlapped with backward).
              Bandwidth: NVLink when the DP group sits in one node, else the per-GPU IB bandwidth.
  latency   = every collective and p2p message also pays LATENCY_S (NCCL small-message latency, 10 us in a node,
              20 us across nodes), and ZeRO-3 pays ZERO3_BLOCK_OVERHEAD_S per block per forward and per backward of
              each micro-batch (DeepSpeed's fetch/release hooks run on the CPU, on the critical path).
  efficiency = achieved fraction of peak on the matmuls: `efficiency` (0.6) for a local width h/t of at least 1024,
              falling with its square root below (thin GEMMs do not fill the GPU: igpt-s at h = 512 gets 0.42).
  tokens/s  = global batch x s / step time.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass

from megapix import cliargs, dsconfig
from megapix.config import PRESETS, VOCAB_SIZE, Config, ConfigError, ModelConfig, TrainConfig, model_preset
from megapix.parallel.layout import Layout as ParallelLayout

GiB = 2**30


# ---------------------------------------------------------------------------------------------------------------
# Devices: dense bf16 peak, HBM, and per-GPU link bandwidths in GB/s (one direction, as a ring all-reduce sees it).
# A100 SXM 80GB: NVLink3 600 GB/s bidirectional, one HDR 200 Gb/s NIC per GPU. H100 SXM: NVLink4 900 GB/s
# bidirectional, one NDR 400 Gb/s NIC per GPU (DGX H100). H200: H100's links, 141 GB of HBM3e at 4.8 TB/s.
@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16
    hbm_gbps: float
    nvlink_gbps: float
    ib_gbps: float
    memory_gb: float


DEVICES = {
    "a100": Device("A100 SXM 80GB", 312.0, 2039.0, 300.0, 25.0, 80.0),
    "h100": Device("H100 SXM 80GB", 989.0, 3350.0, 450.0, 50.0, 80.0),
    "h200": Device("H200 SXM 141GB", 989.0, 4800.0, 450.0, 50.0, 141.0),
}
EFFICIENCY = 0.6  # achieved fraction of peak on the model's matmuls (large bf16 GEMMs reach 0.6-0.75)
COMM_EFFICIENCY = 0.8  # achieved fraction of link bandwidth by NCCL rings
LATENCY_S = {"nvlink": 10e-6, "ib": 20e-6}  # per collective / p2p message
ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance default (elements)
ZERO3_MAX_LIVE = 1e9  # stage3_max_live_parameters default
ZERO3_BLOCK_OVERHEAD_S = 2e-4  # DeepSpeed ZeRO-3 parameter fetch/release per block and pass
FULL_WIDTH = 1024  # local GEMM width from which `efficiency` holds
WORKSPACE_BYTES = int(1.5 * GiB)
BUCKET_ELEMENTS = 50_000_000  # reduce/all-gather bucket in ds_configs/zero*.json
ASSUMPTIONS = ("checked against the engine on CPU (tests/test_plan.py, test_flops.py, test_comms.py): model states, "
               "saved activations per kernel path, FLOPs, bytes per collective; stated device constants: peak "
               "FLOP/s, matmul efficiency, HBM, NVLink and IB bandwidth, latency, ZeRO-3 hook overhead, workspace "
               "(`python -c 'import megapix.plan; help(megapix.plan)'`)")
PAPER_BATCH = {"igpt-s": 128, "igpt-m": 128, "igpt-l": 128, "igpt-xl": 64}
PAPER_ITERATIONS = {"igpt-s": 1_000_000, "igpt-m": 1_000_000, "igpt-l": 1_000_000, "igpt-xl": 2_000_000}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    micro_batch: int = 1
    checkpointing: bool = False
    sp: bool = False  # sequence parallelism over the TP group (--sequence-parallel)
    cp: int = 1  # context-parallel degree (--context-parallel): ranks sharing each image's positions

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def data(self) -> int:
        """DeepSpeed's data axis: the DP shards of the batch times the CP ranks of each (megapix.parallel.layout puts
        CP there), the group ZeRO partitions over and gradients are averaged over."""
        return self.dp * self.cp

    @property
    def seq_split(self) -> int:
        """How many ranks share the positions the norms and residuals see: t under SP, cp under CP."""
        return (self.tp if self.sp else 1) * self.cp

    def describe(self) -> str:
        return (f"TP{self.tp}{'+SP' if self.sp else ''} x PP{self.pp}{f' x CP{self.cp}' if self.cp > 1 else ''} x "
                f"DP{self.dp} ZeRO-{self.zero} mb{self.micro_batch}{' ckpt' if self.checkpointing else ''}")


# ---------------------------------------------------------------------------------------------------------------
# Parameters per rank
def layer_params(m: ModelConfig, tp: int = 1) -> list[int]:
    """Parameters of each pipeline layer (embed, blocks, head) on one TP rank, in DeepSpeed's layer order."""
    h = m.d_model
    embed = VOCAB_SIZE * h + h + m.n_positions * h
    block = 2 * h + 12 * h * h // tp + ((7 * h) // tp + 2 * h if m.bias else 0)
    head = h + VOCAB_SIZE * h // tp
    return [embed] + [block] * m.n_layer + [head]


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """Stage boundaries minimising the spread between the heaviest and lightest stage: the linear partition
    problem by dynamic programming, with DeepSpeed's tie-break (the last split point among equal costs), so the
    stages equal those of PipelineModule(partition_method="parameters"). Returns parts + 1 boundaries."""
    n = len(weights)
    if n <= parts:  # DeepSpeed's partition_uniform for this case
        base, extra = divmod(n, parts)
        bounds, at = [0], 0
        for i in range(parts):
            at += base + (1 if i < extra else 0)
            bounds.append(at)
        return bounds
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    hi = [[inf] * (parts + 1) for _ in range(n + 1)]
    lo = [[inf] * (parts + 1) for _ in range(n + 1)]
    cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    cut = [[0] * (parts + 1) for _ in range(n + 1)]
    hi[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                seg = prefix[i] - prefix[k]
                top, bottom = max(hi[k][j - 1], seg), min(lo[k][j - 1], seg)
                if cost[i][j] >= top - bottom:
                    cost[i][j], hi[i][j], lo[i][j], cut[i][j] = top - bottom, top, bottom, k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(cut[bounds[-1]][j])
    return bounds[::-1]


@functools.lru_cache(maxsize=None)
def _bounds(weights: tuple, pp: int) -> tuple:
    return tuple(partition_balanced(list(weights), pp)) if pp > 1 else (0, len(weights))


def stage_params(m: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters of every pipeline stage on one TP rank (one entry when pp == 1)."""
    w = layer_params(m, tp)
    b = _bounds(tuple(w), pp)
    return [sum(w[b[i]:b[i + 1]]) for i in range(pp)]


def stage_layers(m: ModelConfig, tp: int, pp: int) -> list[int]:
    """Transformer blocks per stage."""
    b = _bounds(tuple(layer_params(m, tp)), pp)
    return [sum(1 for i in range(b[s], b[s + 1]) if 1 <= i <= m.n_layer) for s in range(pp)]


# ---------------------------------------------------------------------------------------------------------------
# Memory
@dataclass
class Memory:
    params: float
    grads: float  # alive at the optimizer step
    master: float
    optimizer: float
    grads_backward: float  # extra gradient memory during backward (full-size grads or the reduce bucket)
    activations: float
    activations_no_ckpt: float
    activations_ckpt: float
    pipe_buffers: float
    workspace: float

    @property
    def states(self) -> float:
        """Parameters + gradients + master + optimizer at the step: what tests/test_plan.py measures."""
        return self.params + self.grads + self.master + self.optimizer

    @property
    def peak(self) -> float:
        during_backward = self.grads_backward + self.activations + self.pipe_buffers
        return self.params + self.master + self.optimizer + max(self.grads, during_backward) + self.workspace


def state_bytes(P: float, dp: int, zero: int, precision: str, pipeline: bool) -> dict:
    """Bytes of parameters, gradients at the step, fp32 master and Adam state for P local parameters
    (see the table in the module docstring)."""
    if precision == "fp32":
        if zero == 0:
            return dict(params=4 * P, grads=4 * P, master=0.0, optimizer=8 * P)
        if zero in (1, 2):
            return dict(params=4 * P, grads=4 * P / dp, master=4 * P / dp, optimizer=8 * P / dp)
        return dict(params=4 * P / dp, grads=8 * P / dp, master=4 * P / dp, optimizer=8 * P / dp)
    if zero == 0 and pipeline:  # DeepSpeed's BF16_Optimizer partitions master and Adam over DP
        return dict(params=2 * P, grads=4 * P + 4 * P / dp, master=4 * P / dp, optimizer=8 * P / dp)
    if zero == 0:
        return dict(params=2 * P, grads=6 * P, master=4 * P, optimizer=8 * P)
    if zero in (1, 2):
        return dict(params=2 * P, grads=4 * P / dp, master=4 * P / dp, optimizer=8 * P / dp)
    return dict(params=2 * P / dp, grads=6 * P / dp, master=4 * P / dp, optimizer=8 * P / dp)


KERNEL_PATHS = ("triton", "torch")


def block_activation_bytes(m: ModelConfig, b: int, tp: int = 1, kernels: str = "triton", nbytes: int = 2,
                           sp: bool = False, cp: int = 1) -> float:
    """Bytes one block saves for backward per micro-batch, tensor by tensor (what the test counts with
    saved_tensors_hooks: unique storages, parameters excluded). rows = s b, e = nbytes (2 in bf16, 4 in fp32):
      norm_1 input            rows h e      replicated under TP (the norm is replicated)
      norm_1 rstd             rows 4        fp32, one per row
      c_attn input            rows h e      replicated (the column-parallel input)
      q, k, v                 3 rows h e / t  views of the c_attn output
      attention output        rows h e / t  (Triton only: the kernel writes [B, H, T, Dh], so the [B, T, h] input of
                                             c_proj is a second copy; SDPA writes it [B, T, H, Dh]-strided and the
                                             transpose + reshape is a view of the output it saves)
      c_proj input            rows h e / t
      log-sum-exp             rows a 4 / t  fp32, per row and head
      norm_2 input (residual) rows h e, its rstd rows 4
      c_fc input              rows h e      replicated
      quick_gelu input        4 rows h e / t  (silu(1.702 x): the scale by a constant keeps nothing)
      mlp c_proj input        4 rows h e / t
    = e rows h (4 + 12/t, + 1/t on Triton) + 8 rows + 4 a rows / t: 32 sbh (torch) or 34 sbh (Triton) in bf16 at
    t = 1, against Korthikanti et al. 2022's 34 sbh with dropout (eq. 1; iGPT has no dropout masks, and the
    flash-style kernels keep the log-sum-exp instead of the s^2 probabilities).
    Sequence parallelism (sp, Korthikanti et al. section 4.2.2) cuts the four replicated tensors and the two rstd
    rows by t: e rows h (4 + 12/t) / ... becomes e rows h (4/t + 12/t). Context parallelism: ring_block_bytes."""
    if kernels not in KERNEL_PATHS:
        raise ConfigError(f"kernel path {kernels!r}: choose one of {', '.join(KERNEL_PATHS)}")
    if cp > 1:
        return ring_block_bytes(m, b, tp, cp, kernels, nbytes)
    rows, h, a = m.n_ctx * b, m.d_model, m.n_head
    sharded = 12 + (1 if kernels == "triton" else 0)
    rep = tp if sp else 1  # the replicated part: split over the TP ranks under SP
    return nbytes * rows * h * (4 / rep + sharded / tp) + 8 * rows / rep + 4 * a * rows / tp


def ring_pairs(m: ModelConfig, cp: int, rank: int) -> list[int]:
    """Partial results per query chunk of CP rank `rank` in megapix.parallel.context.ring_attention: the key chunks
    (of the 2 cp) not wholly in that query chunk's future (causal), or all of them (BERT). Rank r holds chunks r and
    2 cp - 1 - r (megapix.parallel.context.chunk_starts), and causal chunk j sees the j + 1 chunks up to itself."""
    return _ring_pairs(m.objective == "ar", cp, rank)


def _ring_pairs(causal: bool, cp: int, rank: int) -> list[int]:
    return [rank + 1, 2 * cp - rank] if causal else [2 * cp, 2 * cp]


def ring_block_bytes(m: ModelConfig, b: int, tp: int, cp: int, kernels: str = "triton", nbytes: int = 2) -> float:
    """A block's saved bytes per micro-batch on the CP rank holding the most, under ring attention
    (megapix/parallel/context.py), tensor by tensor. Everything outside attention holds rows = s b / cp positions:
    e rows h (4 + 9/t) + 8 rows (the norms, the column-parallel inputs, c_proj's input: a copy, as the ring's output
    is [B, H, L, Dh], the MLP). Attention, with c = s / (2 cp) positions a chunk, ch = b (a/t) c rows of one chunk
    and head, chd = ch x head width, k partials for a query chunk (ring_pairs), e = nbytes:
      Triton     q k v: the c_attn output (6 chd e), this rank's K/V stack and the cp - 1 received ones (4 cp chd e:
                 the whole sequence's K/V, as an all-gather would keep); per partial its o (chd e) and fp32 lse (4 ch)
      torch      the CPU reference: per partial the fp32 scores and probabilities (8 ch c) and lse (4 ch), and the
                 bool causal mask of a diagonal chunk pair (c^2); in fp32 q, k, v are views (as on Triton) and the
                 partials' o are kept by the merges; in bf16 each partial makes fp32 copies of its q, k, v (12 chd)
      merges     k - 1 per query chunk (kernels.merge_attention): the isinf mask and two fp32 weights (9 ch); the
                 k - 2 intermediate results' lse (4 ch) and, in fp32, their o (4 chd); in bf16 the fp32 copies of
                 both inputs (8 chd)"""
    return _ring_block_bytes(m.n_ctx, m.d_model, m.n_head, m.objective, b, tp, cp, kernels, nbytes)


@functools.lru_cache(maxsize=4096)
def _ring_block_bytes(n_ctx: int, h: int, n_head: int, objective: str, b: int, tp: int, cp: int, kernels: str,
                      nbytes: int) -> float:
    causal = objective == "ar"
    c = n_ctx // (2 * cp)
    ch = b * (n_head // tp) * c
    chd = b * c * h / tp
    f32, triton = nbytes == 4, kernels == "triton"
    common = nbytes * 2 * c * b * h * (4 + 9 / tp) + 8 * 2 * c * b
    worst = 0.0
    for rank in range(cp):
        att = (6 * chd * nbytes + 4 * cp * chd * nbytes) if (triton or f32) else 0.0
        for k in _ring_pairs(causal, cp, rank):
            att += 4 * ch * k
            if triton:
                att += chd * nbytes * k
            else:
                att += 8 * ch * c * k + ch * k + (c * c if causal else 0)
                att += 12 * chd * k if not f32 else (4 * chd * k if k > 1 else 0.0)
            merges, inter = max(0, k - 1), max(0, k - 2)
            att += 9 * ch * merges + 4 * ch * inter + (4 * chd * inter if f32 else 8 * chd * merges)
        worst = max(worst, att)
    return common + worst


def checkpointed_block_bytes(m: ModelConfig, b: int, nbytes: int = 2, seq_split: int = 1) -> float:
    """What a block under deepspeed.checkpointing keeps until its recompute: its input (CheckpointFunction saves
    the tensor arguments; the forward runs under no_grad), replicated under TP; this rank's positions under SP or
    CP (seq_split: Layout.seq_split)."""
    return nbytes * m.n_ctx * b * m.d_model / seq_split


def embed_activation_bytes(m: ModelConfig, b: int, cp: int = 1) -> float:
    """The embedding saves the int64 token ids (its output is the first block's saved norm_1 input); under CP it runs
    on the whole sequence, and the cut to this rank's positions keeps its int64 index (s / cp)."""
    return 8 * m.n_ctx * b + (8 * m.n_ctx / cp if cp > 1 else 0.0)


def head_activation_bytes(m: ModelConfig, b: int, tp: int = 1, nbytes: int = 2, pp: int = 1, sp: bool = False,
                          cp: int = 1) -> float:
    """norm_f input and rstd, the head's input (replicated; this rank's chunk under SP, which the vocab-parallel head
    gathers like any column-parallel input), and the loss's fp32 log-softmax over the V/t local logits. TP:
    megapix's vocab-parallel cross-entropy keeps the fp32 softmax, the int64 local targets and a bool mask per row.
    Without TP cross_entropy keeps the int64 targets: the embedding's own ids when both sit on one rank, the
    pipeline's labels or CP's own positions' targets (8 bytes a row more) otherwise. CP: rows = s b / cp."""
    rows, h = m.n_ctx * b / cp, m.d_model
    rep = tp if sp else 1
    kept = 2 * nbytes * rows * h / rep + 4 * rows / rep + 4 * rows * VOCAB_SIZE / tp
    return kept + (9 * rows if tp > 1 else 8 * rows if pp > 1 or cp > 1 else 0)


def loss_transient_bytes(m: ModelConfig, b: int, tp: int = 1, nbytes: int = 2, cp: int = 1) -> float:
    """Not saved, but alive in the loss at the forward's end beside the saved log-softmax: the model-dtype logits
    and their fp32 copy (the fp32 logit gradient and its model-dtype cast take the same room at backward's start)."""
    return (nbytes + 4) * m.n_ctx * b * VOCAB_SIZE / (tp * cp)


def in_flight(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage `stage` holds at once under DeepSpeed's 1F1B TrainSchedule: the
    forwards it runs before its first backward, min(p - i, m) (counted in a real pipeline in tests/test_plan.py)."""
    return min(pp - stage, micro_batches) if pp > 1 else 1


def stage_activation_bytes(m: ModelConfig, lay: Layout, global_batch: int, nbytes: int = 2,
                           kernels: str = "triton", checkpointing: bool | None = None,
                           loss_transient: bool = True) -> list[float]:
    """Saved activations of every pipeline stage at its peak: in-flight micro-batches x (its blocks + the
    embedding on the first stage + the head on the last), plus, with checkpointing, one block's full activations
    during its recompute (less its input, already kept), and on the last stage the loss transient
    (loss_transient=False: saved tensors only, what tests/test_activations.py counts)."""
    ckpt = lay.checkpointing if checkpointing is None else checkpointing
    b, pp = lay.micro_batch, lay.pp
    micro_batches = global_batch // (lay.dp * b)
    block = block_activation_bytes(m, b, lay.tp, kernels, nbytes, lay.sp, lay.cp)
    kept = checkpointed_block_bytes(m, b, nbytes, lay.seq_split) if ckpt else block
    out = []
    rows_h = nbytes * m.n_ctx * b * m.d_model / lay.seq_split
    for i, layers in enumerate(stage_layers(m, lay.tp, pp)):
        n = in_flight(pp, i, micro_batches)
        per_micro = layers * kept + (embed_activation_bytes(m, b, lay.cp) if i == 0 else 0.0)
        head = head_activation_bytes(m, b, lay.tp, nbytes, pp, lay.sp, lay.cp) if i == pp - 1 else 0.0
        act = n * (per_micro + head)
        if ckpt and layers:
            # the backward reaches the blocks after the head and loss freed theirs; the recompute of one block
            # saves its full activations, one of which is the input it already keeps. Counted on a DeepSpeed
            # pipeline's last stage: the norm_f and head inputs (2 rows h e) are still held then (not in a single
            # process, where the head's tensors are gone).
            held = 2 * rows_h if pp > 1 and i == pp - 1 else 0.0
            act = max(act, n * per_micro + (n - 1) * head + block - kept + held)
        transient = loss_transient and i == pp - 1
        out.append(act + (loss_transient_bytes(m, b, lay.tp, nbytes, lay.cp) if transient else 0.0))
    return out


def pipe_buffer_bytes(m: ModelConfig, lay: Layout, global_batch: int, nbytes: int = 2) -> float:
    """DeepSpeed's pipe buffers on the stage holding the most: max(2, min(p - i, m)) buffers, each a received input
    (stage i > 0; the stage runs on a clone of it) and an output kept for its backward (1/t of it under
    pipe_partitioned with TP). Under SP a stage's input and output are this TP rank's chunk (act / t) and
    megapix.dsconfig turns pipe_partitioned off (each TP rank sends its own chunk). Stated from DeepSpeed's
    PipelineEngine, not counted."""
    if lay.pp == 1:
        return 0.0
    act = nbytes * m.n_ctx * lay.micro_batch * m.d_model
    micro_batches = global_batch // (lay.dp * lay.micro_batch)
    received = act / lay.tp if lay.sp else act
    sizes = []
    for i in range(lay.pp):
        buffers = max(2, in_flight(lay.pp, i, micro_batches))
        sizes.append(buffers * ((received if i > 0 else 0.0) + (act / lay.tp if i < lay.pp - 1 else 0.0)))
    return max(sizes)


def memory(m: ModelConfig, lay: Layout, global_batch: int, precision: str = "bf16", kernels: str = "triton") -> Memory:
    nbytes = 2 if precision == "bf16" else 4
    P = max(stage_params(m, lay.tp, lay.pp))
    st = state_bytes(P, lay.data, lay.zero, precision, lay.pp > 1)  # ZeRO partitions over DP x CP
    if lay.zero in (0, 1):
        grads_bwd = nbytes * P
    else:
        grads_bwd = nbytes * min(BUCKET_ELEMENTS, P) + (nbytes * P / lay.data if lay.zero == 2 else 0.0)
    full = max(stage_activation_bytes(m, lay, global_batch, nbytes, kernels, checkpointing=False))
    ckpt = max(stage_activation_bytes(m, lay, global_batch, nbytes, kernels, checkpointing=True))
    pipe = pipe_buffer_bytes(m, lay, global_batch, nbytes)
    workspace = WORKSPACE_BYTES if precision == "bf16" else 0.0
    if lay.zero in (1, 2):
        workspace += 2 * nbytes * min(BUCKET_ELEMENTS, P)
    elif lay.zero == 3:  # the current and prefetched layer, or what the reuse distance keeps gathered
        workspace += nbytes * max(2 * max(layer_params(m, lay.tp)), zero3_kept_and_regathered(m, lay.tp)[0])
    return Memory(**st, grads_backward=grads_bwd, activations=ckpt if lay.checkpointing else full,
                  activations_no_ckpt=full, activations_ckpt=ckpt, pipe_buffers=pipe, workspace=workspace)


# ---------------------------------------------------------------------------------------------------------------
# Time
@dataclass
class Timing:
    compute: float
    elementwise: float
    optimizer: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float  # exposed (not hidden behind compute)
    step: float
    tokens_per_s: float
    mfu: float
    tflops_per_gpu: float
    cp_comm: float = 0.0  # the ring's K/V passes, on the critical path


def zero3_kept_and_regathered(m: ModelConfig, tp: int) -> tuple[float, float]:
    """(parameters ZeRO-3 keeps gathered from the forward into the backward, parameters it gathers again in the
    backward) per micro-batch, by DeepSpeed's rule: a module's parameters are not released after its forward when
    they are used again within stage3_max_reuse_distance elements (default 1e9), which for a layer is roughly the
    parameters of every later layer, fetched once forward and once backward in between; at most
    stage3_max_live_parameters (1e9) stay gathered. Counted: a tiny model (all within the distance) gathers once a
    micro-batch (tests/test_comms.py)."""
    weights = layer_params(m, tp)
    kept = regathered = 0.0
    for k, w in enumerate(weights):
        if 2 * sum(weights[k + 1:]) < ZERO3_REUSE_DISTANCE and kept + w <= ZERO3_MAX_LIVE:
            kept += w
        else:
            regathered += w
    return kept, regathered


def comm_bytes(m: ModelConfig, lay: Layout, global_batch: int, nbytes: int = 2) -> list[dict]:
    """Payload bytes each rank of every pipeline stage puts into its collectives and p2p messages in one step
    (an all-reduce's tensor, a reduce-scatter's input, an all-gather's output, each message sent or received),
    per group kind; recorded from the engine by megapix.parallel.comms in tests/test_comms.py. act = b s h e:
      tp  per micro-batch: 2 all-reduces forward (after the row-parallel projections) and 2 backward (the
          column-parallel inputs) per block, 2 more forward when recomputing; on the last stage the head's
          column-parallel input (1 backward) and the vocab-parallel loss's max, target logit and sum-exp
          (3 fp32 values a row, forward); with PP, DeepSpeed's all-gathers of the partitioned pipe tensors
      pp  per micro-batch and boundary: the activation forward and its gradient backward, each sent by one
          stage and received by the other (1/t of it under pipe_partitioned with TP, as DeepSpeed sends it)
      dp  ZeRO-0/1: the gradients all-reduced once per step (P e); ZeRO-2: reduced every micro-batch; ZeRO-3:
          reduce-scattered every micro-batch; ZeRO-1/2 then all-gather the updated parameters (P e); ZeRO-3
          gathers every parameter forward and, in the backward, those its reuse distance released
          (zero3_kept_and_regathered), every micro-batch (recorded with a persistence threshold of 0: the tiny CPU
          model's parameters are all below DeepSpeed's default one)
      sp  (TP with SP, in the tp key) per block and micro-batch: forward 2 all-gathers (before the column-parallel
          linears) + 2 reduce-scatters (after the row-parallel ones), backward the 2 reduce-scatters of the gathered
          linears' input gradients, their 2 re-gathers of the input chunk and the 2 all-gathers of the row-parallel
          outputs' gradients: 10 x act (4 more recomputing) where TP's all-reduces move 4 x act, but an all-gather
          or reduce-scatter costs half an all-reduce on a ring; plus the all-reduce of the chunk-applied
          parameters' gradients (2 norm weights, and the row-parallel biases: h each) every micro-batch; the head
          gathers forward and backward and reduce-scatters (3 x act), block 0's cut all-gathers its gradient
          (1 x act); the pipe sends this rank's chunk unpartitioned (act / t)
      cp  per block and micro-batch: cp - 1 ring passes of this rank's K/V (2 x act / (t cp)) forward, their
          gradients the other way round backward, one more forward pass recomputing; each pass one send and one
          receive (DeepSpeed's data axis, DP x CP, averages the gradients: the dp terms' group)
    Keys: tp, pp (sent + received), pp_sent, dp_reduce, dp_gather, tp_calls, tp_ring (bytes a ring moves, in units
    of an all-gather's: 2 per all-reduce byte, 1 per all-gather or reduce-scatter byte), cp (sent + received),
    cp_sent, cp_calls."""
    b, rows, h = lay.micro_batch, lay.micro_batch * m.n_ctx, m.d_model
    act = nbytes * rows * h
    micro = global_batch // (lay.dp * b)
    p2p = act / lay.tp if lay.tp > 1 else act
    out = []
    for i, (P, layers) in enumerate(zip(stage_params(m, lay.tp, lay.pp), stage_layers(m, lay.tp, lay.pp))):
        last = i == lay.pp - 1
        tp = tp_calls = tp_ring = 0.0
        if lay.tp > 1 and lay.sp:
            per_block = 10 + (4 if lay.checkpointing else 0)
            chunk_params = nbytes * h * (2 + (2 if m.bias else 0))  # norm weights (+ row-parallel biases)
            head = 3 * act + 3 * 4 * rows + nbytes * h if last else 0.0  # + the loss's scalars, norm_f's gradient
            first = act if i == 0 else 0.0
            tp = micro * (layers * (per_block * act + chunk_params) + head + first)
            tp_ring = micro * (layers * (per_block * act + 2 * chunk_params) + (head + 3 * 4 * rows + nbytes * h
                                                                                 if last else 0.0) + first)
            tp_calls = micro * (layers * (per_block + 2 + (2 if m.bias else 0)) + (7 if last else 0) + (i == 0))
        elif lay.tp > 1:
            per_block = 4 + (2 if lay.checkpointing else 0)
            # pipe_partitioned + grad_partitioned (our ds_configs and DeepSpeed's default): a stage sends 1/t of its
            # output and of its input's gradient, and all-gathers them back over the TP group: the input forward
            # (stages after the first), the output to run its backward and the received gradient (stages before
            # the last)
            gathers = ((i > 0) + 2 * (not last)) if lay.pp > 1 else 0
            tp = micro * (layers * per_block * act + ((act + 3 * 4 * rows) if last else 0.0) + gathers * act)
            tp_calls = micro * (layers * per_block + (4 if last else 0) + gathers)
            tp_ring = 2 * tp
        sides = (i > 0) + (not last) if lay.pp > 1 else 0
        passes = micro * layers * (lay.cp - 1) * (2 + (1 if lay.checkpointing else 0))
        kv = 2 * act / (lay.tp * lay.cp)
        dp_reduce = dp_gather = 0.0
        if lay.data > 1:
            dp_reduce = nbytes * P * (micro if lay.zero >= 2 else 1)
            if lay.zero in (1, 2):
                dp_gather = nbytes * P
            elif lay.zero == 3:
                dp_gather = nbytes * micro * (P + zero3_kept_and_regathered(m, lay.tp)[1])
        out.append(dict(tp=tp, tp_calls=tp_calls, tp_ring=tp_ring, pp=2 * sides * micro * p2p,
                        pp_sent=sides * micro * p2p, dp_reduce=dp_reduce, dp_gather=dp_gather, cp=2 * passes * kv,
                        cp_sent=passes * kv, cp_calls=passes))
    return out


def step_time(m: ModelConfig, lay: Layout, global_batch: int, nodes: int, gpus_per_node: int, dev: Device,
              efficiency: float = EFFICIENCY) -> Timing:
    s, h, L = m.n_ctx, m.d_model, m.n_layer
    tokens = global_batch * s
    model_flops = tokens * m.flops_per_token()  # what MFU counts
    executed = tokens * m.flops_per_token(recompute=lay.checkpointing, executed=True)  # what the GPU runs
    world = lay.world
    peak = dev.peak_tflops * 1e12
    eff = efficiency * min(1.0, h / lay.tp / FULL_WIDTH) ** 0.5
    compute = executed / world / (peak * eff)  # perfectly split over all GPUs
    elementwise = tokens * L * 40 * h / world / (dev.hbm_gbps * 1e9)
    P = max(stage_params(m, lay.tp, lay.pp))
    local = P / lay.data if lay.zero >= 1 or lay.pp > 1 else P
    opt = 30 * local / (dev.hbm_gbps * 1e9)
    nv, ib = dev.nvlink_gbps * 1e9 * COMM_EFFICIENCY, dev.ib_gbps * 1e9 * COMM_EFFICIENCY
    micro = global_batch // (lay.dp * lay.micro_batch)  # micro-batches per step per pipeline
    layers = max(stage_layers(m, lay.tp, lay.pp))
    lat_nv, lat_ib = LATENCY_S["nvlink"], LATENCY_S["ib"]
    comm = comm_bytes(m, lay, global_batch, 2)  # 16-bit
    busiest = {key: max(c[key] for c in comm) for key in comm[0]}
    tp_comm = 0.0
    if lay.tp > 1:  # ring all-reduces (SP: all-gathers and reduce-scatters) inside the node, on the critical path
        tp_comm = (lay.tp - 1) / lay.tp * busiest["tp_ring"] / nv + busiest["tp_calls"] * lat_nv
    cp_comm = 0.0
    if lay.cp > 1:  # CP ranks sit tp apart on DeepSpeed's data axis: one node while tp x cp GPUs fit in it
        cp_link, cp_lat = (ib, lat_ib) if lay.tp * lay.cp > gpus_per_node else (nv, lat_nv)
        cp_comm = busiest["cp_sent"] / cp_link + busiest["cp_calls"] * cp_lat
    # Ranks are numbered TP fastest, then DP, then PP (DeepSpeed's topology: pipe, data, model).
    cross = lay.tp * lay.dp >= gpus_per_node and nodes > 1
    pp_link, pp_lat = (ib, lat_ib) if cross else (nv, lat_nv)
    pp_comm = busiest["pp_sent"] / pp_link + 2 * micro * pp_lat if lay.pp > 1 else 0.0
    per_stage = compute + elementwise + tp_comm + cp_comm
    bubble = per_stage * (lay.pp - 1) / micro if lay.pp > 1 else 0.0
    dp_comm = 0.0
    if lay.data > 1:  # DeepSpeed's data axis: DP x CP ranks
        dp_link, dp_lat = (ib, lat_ib) if lay.tp * lay.data > gpus_per_node else (nv, lat_nv)
        frac = (lay.data - 1) / lay.data
        reduce, gather, nbytes_16 = busiest["dp_reduce"], busiest["dp_gather"], 2
        backward = 2 / 3 * compute
        if lay.zero in (0, 1):  # one ring all-reduce after backward (+ ZeRO-1's all-gather), not overlapped
            dp_comm = 2 * frac * reduce / dp_link + frac * gather / dp_link
        elif lay.zero == 2:  # a reduce-scatter per micro-batch behind its backward, the all-gather after the step
            dp_comm = micro * max(0.0, frac * reduce / micro / dp_link - backward / micro) + frac * gather / dp_link
        else:  # forward all-gather behind the forward, backward all-gather + reduce-scatter behind the backward
            fwd_gather = frac * nbytes_16 * P / dp_link
            bwd_gather = frac * gather / micro / dp_link - fwd_gather
            dp_comm = micro * (max(0.0, fwd_gather - compute / micro / 3)
                               + max(0.0, bwd_gather + frac * reduce / micro / dp_link - backward / micro))
            dp_comm += micro * layers * (2 * ZERO3_BLOCK_OVERHEAD_S + 3 * dp_lat)
    total = per_stage + bubble + pp_comm + dp_comm + opt
    tflops = model_flops / world / total / 1e12
    return Timing(compute, elementwise, opt, tp_comm, pp_comm, bubble, dp_comm, total, tokens / total,
                  tflops / dev.peak_tflops, tflops, cp_comm)


# ---------------------------------------------------------------------------------------------------------------
# Layouts
def layout_problem(m: ModelConfig, lay: Layout, global_batch: int, gpus_per_node: int) -> str | None:
    """Why DeepSpeed or the model cannot run this layout (None: it can). The rules of megapix.parallel.layout."""
    if lay.pp > 1 and lay.zero > 1:
        return f"DeepSpeed's pipeline engine takes ZeRO-0/1, not ZeRO-{lay.zero}"
    if lay.sp and lay.tp == 1:
        return "sequence parallelism splits the sequence over the TP ranks: it needs TP > 1"
    if lay.sp and m.n_ctx % lay.tp:
        return f"SP over TP {lay.tp} must divide the {m.n_ctx} positions"
    if lay.cp > 1:
        if m.n_ctx % (2 * lay.cp):
            return f"CP {lay.cp} cuts the {m.n_ctx} positions into 2 x {lay.cp} chunks (a head and a tail per rank)"
        if lay.pp > 1:
            return "CP does not run with a DeepSpeed pipeline (its stages send whole activations)"
        if lay.sp:
            return "CP with SP is not built (each splits the sequence)"
    if m.n_head % lay.tp or VOCAB_SIZE % lay.tp:
        return f"TP {lay.tp} must divide the {m.n_head} heads and the 512-way head"
    if lay.tp > gpus_per_node or gpus_per_node % lay.tp:
        return f"TP {lay.tp} must stay inside a node of {gpus_per_node} GPUs"
    if lay.pp > m.n_layer:
        return f"{m.n_layer} layers cannot fill {lay.pp} stages"
    if global_batch % (lay.dp * lay.micro_batch):
        return f"global batch {global_batch} is not a multiple of DP {lay.dp} x micro-batch {lay.micro_batch}"
    return None


def pinned_problem(m: ModelConfig, world: int, gpus_per_node: int, global_batch: int, tp=None, pp=None, zero=None,
                   micro=None, ckpt=None, sp=None, cp=None) -> str | None:
    """Why no layout at all exists with these pinned axes (None: some do, whether or not they fit in memory)."""
    if next(candidates(m, world, gpus_per_node, global_batch, tp, pp, zero, micro, ckpt, sp, cp), None) is not None:
        return None
    if tp:
        if gpus_per_node % tp:
            return (f"--tensor-parallel {tp} does not divide the {gpus_per_node} GPUs of a node (tensor parallelism "
                    f"stays inside a node); choose one of {', '.join(map(str, _divisors(gpus_per_node)))}")
        if m.n_head % tp or VOCAB_SIZE % tp:
            return (f"--tensor-parallel {tp} does not divide the model's {m.n_head} heads and the 512-way head; "
                    f"choose a common divisor")
    if pp:
        if pp > m.n_layer:
            return f"--pipeline-parallel {pp} exceeds the model's {m.n_layer} layers"
        if world % (pp * (tp or 1)):
            return (f"TP {tp or 1} x PP {pp} does not divide the {world} GPUs; choose TP x PP dividing {world}")
        if zero is not None and zero > 1:
            return f"DeepSpeed's pipeline engine takes ZeRO-0/1, not --zero-stage {zero}"
    if sp and (tp == 1 or (tp is None and not any(m.n_head % t == 0 and t > 1 and gpus_per_node % t == 0
                                                   for t in range(2, gpus_per_node + 1)))):
        return "--sequence-parallel needs --tensor-parallel > 1 (it splits the sequence over the TP ranks)"
    if cp and cp > 1:
        if m.n_ctx % (2 * cp):
            return (f"--context-parallel {cp} cuts the {m.n_ctx} positions into 2 x {cp} chunks (a head and a tail "
                    f"per rank), which does not divide them; use a degree whose double divides {m.n_ctx}")
        if pp and pp > 1:
            return (f"--context-parallel {cp} does not run with --pipeline-parallel {pp} (DeepSpeed's pipeline engine "
                    "sends whole activations between stages); use --pipeline-parallel 1")
        if sp:
            return "--context-parallel with --sequence-parallel is not supported; use one of them"
        if world % cp:
            return f"--context-parallel {cp} does not divide the {world} GPUs"
    if micro:
        return (f"--micro-batch {micro} x the data-parallel size does not divide --global-batch {global_batch} for "
                "any layout left; choose a smaller micro-batch or another global batch")
    return (f"no layout divides global batch {global_batch} over {world} GPUs with these pins; pass --global-batch, a "
            f"multiple of the data-parallel size")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class Plan:
    model: str
    layout: Layout
    memory: Memory
    timing: Timing
    fits: bool
    global_batch: int
    nodes: int
    gpus_per_node: int
    kernels: str = "triton"
    precision: str = "bf16"
    resolution: int | None = None  # the model's (None: the preset's)

    @property
    def command(self) -> str:
        return train_command(self.model, self.layout, self.global_batch, self.nodes, self.gpus_per_node, self.kernels,
                             self.resolution)

    @property
    def ds_config(self) -> dict:
        return ds_config(self.layout, self.global_batch, self.precision)

    def to_dict(self) -> dict:
        mem = {k: v / GiB for k, v in asdict(self.memory).items()}
        mem.update(states=self.memory.states / GiB, peak=self.memory.peak / GiB)
        return {"model": self.model, "resolution": self.resolution, "layout": asdict(self.layout),
                "world": self.layout.world,
                "kernels": self.kernels, "memory_gib": mem, "timing": asdict(self.timing), "fits": self.fits,
                "global_batch": self.global_batch, "command": self.command, "ds_config": self.ds_config,
                "ds_config_file": ds_config_file(self.layout)}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ds_config_file(lay: Layout) -> str | None:
    """The ds_configs/ file a row runs with. ZeRO-0 rows take none: every file there sets a stage of 1 or more,
    and the trainer refuses a JSON whose stage disagrees with --zero-stage; without a JSON DeepSpeed's pipeline
    defaults (pipe_partitioned, grad_partitioned) and megapix's own bf16/clipping settings apply."""
    if lay.zero == 0:
        return None
    # pipeline.json partitions the pipe tensors over the TP ranks, which SP's per-rank chunks cannot use
    return "ds_configs/pipeline.json" if lay.pp > 1 and not lay.sp else f"ds_configs/zero{lay.zero}.json"


@functools.lru_cache(maxsize=None)
def _user_ds_config(path: str | None) -> str:
    if path is None or not os.path.isfile(os.path.join(ROOT, path)):
        return "{}"
    return json.dumps(dsconfig.load_ds_config(os.path.join(ROOT, path)))


def ds_config(lay: Layout, global_batch: int, precision: str = "bf16") -> dict:
    """The DeepSpeed config this row's command runs with, made as the trainer makes it: its ds_config file
    through megapix.dsconfig.resolve (the same agreement checks) and make_ds_config (the one builder)."""
    path = ds_config_file(lay)
    user = dsconfig.UserDSConfig(json.loads(_user_ds_config(path)))
    user.path = path
    train = TrainConfig(global_batch=global_batch, micro_batch=lay.micro_batch, tensor_parallel=lay.tp,
                        pipeline_parallel=lay.pp, zero_stage=lay.zero, precision=precision,
                        activation_checkpointing=lay.checkpointing, sequence_parallel=lay.sp,
                        context_parallel=lay.cp)
    cfg, user = dsconfig.resolve(Config(train=train), user, world=lay.world)
    engine_layout = ParallelLayout(world=lay.world, rank=0, tp=lay.tp, pp=lay.pp, zero_stage=lay.zero, sp=lay.sp,
                                   cp=lay.cp)
    return dsconfig.make_ds_config(cfg, user, engine_layout, lay.micro_batch)


def train_command(model: str, lay: Layout, global_batch: int, nodes: int, gpus_per_node: int,
                  kernels: str = "auto", resolution: int | None = None) -> str:
    cmd = f"deepspeed --num_nodes {nodes} --num_gpus {gpus_per_node} megapix/train.py --model {model} "
    if resolution is not None and resolution != PRESETS.get(model, {}).get("resolution"):
        cmd += f"--resolution {resolution} "
    cmd += (f"--global-batch {global_batch} --micro-batch {lay.micro_batch} --tensor-parallel {lay.tp} "
            f"--pipeline-parallel {lay.pp} --zero-stage {lay.zero}")
    if lay.sp:
        cmd += " --sequence-parallel"
    if lay.cp > 1:
        cmd += f" --context-parallel {lay.cp}"
    if ds_config_file(lay):
        cmd += f" --deepspeed-config {ds_config_file(lay)}"
    if kernels == "torch":
        cmd += " --kernels torch"
    return cmd + (" --activation-checkpointing" if lay.checkpointing else "")


def plan_one(model: str, m: ModelConfig, lay: Layout, global_batch: int, nodes: int, gpus_per_node: int,
             dev: Device, memory_gb: float, efficiency: float = EFFICIENCY, precision: str = "bf16",
             kernels: str = "triton") -> Plan:
    mem = memory(m, lay, global_batch, precision, kernels)
    tim = step_time(m, lay, global_batch, nodes, gpus_per_node, dev, efficiency)
    return Plan(model, lay, mem, tim, mem.peak <= memory_gb * 1e9, global_batch, nodes, gpus_per_node, kernels,
                precision, m.resolution)


def candidates(m: ModelConfig, world: int, gpus_per_node: int, global_batch: int, tp=None, pp=None, zero=None,
               micro=None, ckpt=None, sp=None, cp=None):
    """Every layout DeepSpeed and megapix can run for this world (optionally pinned on some axes): TP x PP x CP x
    DP, SP on or off where TP > 1."""
    for t in _divisors(world):
        for p in _divisors(world // t):
            for k in _divisors(world // (t * p)):
                d = world // (t * p * k)
                if (tp and t != tp) or (pp and p != pp) or (cp and k != cp) or global_batch % d:
                    continue
                for s in (False, True) if t > 1 else (False,):
                    if sp is not None and s != sp:
                        continue
                    for z in (0, 1) if p > 1 else (0, 1, 2, 3):
                        if zero is not None and z != zero:
                            continue
                        for mb in _divisors(global_batch // d):
                            if micro and mb != micro:
                                continue
                            for c in (False, True):
                                if ckpt is not None and c != ckpt:
                                    continue
                                lay = Layout(t, p, d, z, mb, c, s, k)
                                if layout_problem(m, lay, global_batch, gpus_per_node) is None:
                                    yield lay


def search(model: str, nodes: int, gpus_per_node: int, memory_gb: float, dev: Device, global_batch: int,
           efficiency: float = EFFICIENCY, best_per_layout: bool = True, precision: str = "bf16",
           kernels: str = "triton", resolution: int | None = None, **pins) -> list[Plan]:
    """Layouts that fit, fastest first. With best_per_layout, one row per (TP, PP, CP, DP, ZeRO, SP): its fastest
    micro-batch and checkpointing choice. `resolution`: the preset at another image side."""
    m = model_preset(model, **({"resolution": resolution} if resolution else {})) if isinstance(model, str) else model
    plans = [plan_one(model, m, lay, global_batch, nodes, gpus_per_node, dev, memory_gb, efficiency, precision,
                      kernels)
             for lay in candidates(m, nodes * gpus_per_node, gpus_per_node, global_batch, **pins)]
    fitting = sorted((p for p in plans if p.fits), key=lambda p: -p.timing.tokens_per_s)
    if not best_per_layout:
        return fitting
    seen, out = set(), []
    for p in fitting:
        key = (p.layout.tp, p.layout.pp, p.layout.dp, p.layout.zero, p.layout.sp, p.layout.cp)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measured state bytes of a live DeepSpeed engine (tests/test_plan.py and the GPU check use it)
def engine_state_bytes(engine) -> dict:
    """Bytes of the tensors a DeepSpeed engine holds for parameters, gradients, fp32 master and optimizer state,
    each storage counted once. Call it when the optimizer is about to step (Adam state and gradients alive):
    module parameters (ZeRO-3: their ds_tensor partitions) and .grad; every tensor the DeepSpeed optimizer wrapper
    keeps in its attributes (ZeRO-1/2: single_partition_of_fp32_groups and its .grad; ZeRO-3:
    fp32_partitioned_groups_flat, grad_partitions_flat_buffer; BF16_Optimizer: fp32 partitions, flat fp32 grads),
    and the inner torch optimizer's state (exp_avg, exp_avg_sq). Storages, not shapes: a parameter that is a view
    of a larger tensor counts the whole storage it keeps alive (how the TP shard views were found). At micro-batch
    1, autograd leaves sos.grad a view of the [1, T, d] embedding gradient (T x its size): measure at >= 2."""
    import torch

    seen: set = set()
    out = {"params": 0, "grads": 0, "master": 0, "optimizer": 0}

    def storage_bytes(t) -> int:
        if t.device.type == "meta" or t.numel() == 0:
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    module_params = list(engine.module.parameters())
    for p in module_params:
        out["params"] += storage_bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p)
    for p in module_params:  # after all parameters: a grad must never claim a flat parameter buffer
        if p.grad is not None:
            out["grads"] += storage_bytes(p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)

    def walk(obj, kind, depth=0):
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            if obj.numel() > 1:  # scalars (step counters, norms) are not model state
                out[kind] += storage_bytes(obj)
            if obj.grad is not None:
                out["grads"] += storage_bytes(obj.grad)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, kind, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, kind, depth + 1)

    walk(list(inner.state.values()), "optimizer")
    if opt is not inner:  # a DeepSpeed wrapper: its gradient buffers, then its fp32 partitions (the master)
        attrs = {k: v for k, v in vars(opt).items() if k != "optimizer"}
        for name, value in attrs.items():
            if "grad" in name:
                walk(value, "grads")
        for name, value in attrs.items():
            if "grad" not in name:
                walk(value, "master")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Output
def fmt_gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def table(plans: list[Plan], limit: int | None = None) -> str:
    head = (f"{'#':>3} {'TP':>3} {'SP':>3} {'PP':>3} {'CP':>3} {'DP':>4} {'Z':>2} {'mb':>3} {'ckpt':>4} | "
            f"{'params':>7} {'grads':>7} "
            f"{'master':>7} {'adam':>7} {'act':>7} {'pipe':>6} {'wksp':>6} {'peak':>7} GiB | {'step s':>8} "
            f"{'tok/s':>9} {'MFU':>5}")
    rows = [head, "-" * len(head)]
    for i, p in enumerate(plans[:limit] if limit else plans, 1):
        L, M, T = p.layout, p.memory, p.timing
        rows.append(f"{i:>3} {L.tp:>3} {'yes' if L.sp else 'no':>3} {L.pp:>3} {L.cp:>3} {L.dp:>4} {L.zero:>2} "
                    f"{L.micro_batch:>3} "
                    f"{'yes' if L.checkpointing else 'no':>4} | {fmt_gib(M.params)} {fmt_gib(M.grads)} "
                    f"{fmt_gib(M.master)} {fmt_gib(M.optimizer)} {fmt_gib(M.activations)} "
                    f"{M.pipe_buffers / GiB:6.2f} {M.workspace / GiB:6.2f} {fmt_gib(M.peak)}     | "
                    f"{T.step:8.3f} {T.tokens_per_s:9.0f} {T.mfu:5.1%}")
    return "\n".join(rows)


def describe(p: Plan) -> str:
    M, T = p.memory, p.timing
    lines = [f"{p.model}: {p.layout.describe()} on {p.nodes} x {p.gpus_per_node} GPUs, global batch {p.global_batch}",
             f"  memory per GPU (GiB): params {M.params / GiB:.2f}, grads at step {M.grads / GiB:.2f}, fp32 master "
             f"{M.master / GiB:.2f}, Adam {M.optimizer / GiB:.2f}, grads in backward {M.grads_backward / GiB:.2f}, "
             f"activations {M.activations / GiB:.2f} (no ckpt {M.activations_no_ckpt / GiB:.2f}, ckpt "
             f"{M.activations_ckpt / GiB:.2f}), pipe buffers {M.pipe_buffers / GiB:.2f}, workspace "
             f"{M.workspace / GiB:.2f} -> peak {M.peak / GiB:.2f}",
             f"  step {T.step:.3f} s = compute {T.compute:.3f} + elementwise {T.elementwise:.3f} + TP "
             f"{T.tp_comm:.3f} + CP ring {T.cp_comm:.3f} + PP bubble {T.bubble:.3f} + p2p {T.pp_comm:.3f} + DP "
             f"exposed {T.dp_comm:.3f} + "
             f"Adam {T.optimizer:.3f}; {T.tokens_per_s:,.0f} tokens/s, {T.tflops_per_gpu:.0f} TFLOP/s per GPU, "
             f"MFU {T.mfu:.1%}",
             f"  run: {p.command}"]
    return "\n".join(lines)


def days_to(p: Plan, iterations: int) -> float:
    return iterations * p.timing.step / 86400


def readme_table(dev: Device, efficiency: float = EFFICIENCY, gpus=(1, 8, 64, 256)) -> str:
    """Markdown: the planner's best layout per preset and GPU count, at the paper's batch and iterations."""
    rows = [f"Planner's choice on {dev.name} ({dev.memory_gb:.0f} GB; more than 8 GPUs are nodes of 8), the paper's "
            f"batch and iterations, matmuls at {efficiency:.0%} of peak from {FULL_WIDTH} local columns up (less "
            "below), `megapix plan --table`; estimates, not measurements:", "",
            "| model | GPUs | layout | micro-batch | act. ckpt | memory/GPU (GiB) | step (s) | tokens/s | MFU "
            "| days to paper iterations |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("igpt-s", "igpt-m", "igpt-l", "igpt-xl"):
        for n in gpus:
            nodes, g = (1, n) if n <= 8 else (n // 8, 8)
            plans = search(model, nodes, g, dev.memory_gb, dev, PAPER_BATCH[model], efficiency)
            if not plans:
                rows.append(f"| {model} | {n} | does not fit | | | | | | | |")
                continue
            p = plans[0]
            L = p.layout
            rows.append(f"| {model} | {n} | TP{L.tp}{'+SP' if L.sp else ''} x PP{L.pp}"
                        f"{f' x CP{L.cp}' if L.cp > 1 else ''} x DP{L.dp}, ZeRO-{L.zero} | {L.micro_batch} | "
                        f"{'yes' if L.checkpointing else 'no'} | {p.memory.peak / GiB:.1f} | {p.timing.step:.3f} | "
                        f"{p.timing.tokens_per_s:,.0f} | {p.timing.mfu:.0%} | "
                        f"{days_to(p, PAPER_ITERATIONS[model]):.1f} |")
    return "\n".join(rows)


def layout_name(L: Layout) -> str:
    return (f"TP{L.tp}{'+SP' if L.sp else ''}{f' x CP{L.cp}' if L.cp > 1 else ''}{f' x PP{L.pp}' if L.pp > 1 else ''}"
            f" x DP{L.dp}, ZeRO-{L.zero}, mb {L.micro_batch}{', ckpt' if L.checkpointing else ''}")


def largest_resolution(model: str, gpus: int, memory_gb: float, dev: Device, efficiency: float = EFFICIENCY,
                       sp_cp: bool = True) -> Plan | None:
    """The fastest plan at the largest side in RESOLUTIONS at which some layout fits (sp_cp=False: with neither SP
    nor CP), on `gpus` GPUs (nodes of 8 beyond 8), at the paper's batch; None when none fits even at 32."""
    nodes, g = (1, gpus) if gpus <= 8 else (gpus // 8, 8)
    pins = {} if sp_cp else {"sp": False, "cp": 1}
    for r in sorted(RESOLUTIONS, reverse=True):
        plans = search(model, nodes, g, memory_gb, dev, PAPER_BATCH[model], efficiency, resolution=r, **pins)
        if plans:
            return plans[0]
    return None


def max_resolution_table(dev: Device, memory_gb: float, efficiency: float = EFFICIENCY) -> str:
    """Markdown: per preset and GPU count, the largest resolution that fits without and with SP/CP, the layout the
    planner picks there and its speed (`megapix plan --max-resolution`)."""
    rows = [f"Largest model resolution (of {', '.join(map(str, RESOLUTIONS))}) that fits on {dev.name} "
            f"({memory_gb:g} GB; nodes of 8), the paper's batch, the planner's fastest layout there; "
            "`megapix plan --max-resolution`; estimates, not measurements:", "",
            "| model | GPUs | without SP/CP: side | layout | tokens/s | with SP/CP: side | layout | tokens/s |",
            "|---|---|---|---|---|---|---|---|"]
    for model in ("igpt-s", "igpt-m", "igpt-l", "igpt-xl"):
        for n in TABLE_GPUS:
            cells = [model, str(n)]
            for sp_cp in (False, True):
                p = largest_resolution(model, n, memory_gb, dev, efficiency, sp_cp)
                cells += (["does not fit", "", ""] if p is None else
                          [f"{p.resolution}^2", layout_name(p.layout), f"{p.timing.tokens_per_s:,.0f}"])
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def check_table(models=("tiny", "small", "bench")) -> str:
    """The planner's model-state bytes next to DeepSpeed's own estimators (bf16 GPU figures, per rank)."""
    rows = ["| model | layout | planner fp32 (MiB) | planner bf16 (MiB) | DeepSpeed estimator bf16 (MiB) |",
            "|---|---|---|---|---|"]
    for name in models:
        m = model_preset(name)
        for lay in check_layouts():
            rows.append(f"| {name} | {lay.describe()} | {predicted_states(m, lay, 'fp32') / 2**20:.2f} | "
                        f"{predicted_states(m, lay, 'bf16') / 2**20:.2f} | {_mib(deepspeed_estimate(m, lay))} |")
    return "\n".join(rows)


def _mib(x):
    return "n/a" if x is None else f"{x / 2**20:.2f}"


def check_layouts() -> list[Layout]:
    """The layouts tests/test_plan.py measures: 1 rank, TP2, PP2, DP2 ZeRO-1/2/3, TP2 x PP2."""
    return [Layout(), Layout(tp=2), Layout(pp=2), Layout(dp=2, zero=1), Layout(dp=2, zero=2), Layout(dp=2, zero=3),
            Layout(tp=2, pp=2)]


def predicted_states(m: ModelConfig, lay: Layout, precision: str) -> float:
    """Planner's params + grads + master + Adam bytes on the rank with the most (the largest pipeline stage)."""
    return memory(m, lay, lay.dp * lay.micro_batch * max(1, lay.pp), precision).states


def deepspeed_estimate(m: ModelConfig, lay: Layout) -> float | None:
    """DeepSpeed's GPU estimate for the model states of this rank's share (its functions assume bf16/fp16 and
    ZeRO-2 or 3; none covers ZeRO-0). Stage 1/2: 2P + 18P/d; stage 3: 4 x largest layer + 18P/d."""
    P = max(stage_params(m, lay.tp, lay.pp))
    if lay.zero in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=lay.dp, cpu_offload=False)[1]
    if lay.zero == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        h = m.d_model  # DeepSpeed's "largest layer": the module with the most direct parameters
        largest = max(4 * h * h // lay.tp, VOCAB_SIZE * h, m.n_positions * h)
        return estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=lay.dp, cpu_offload=False)[1]
    return None


# ---------------------------------------------------------------------------------------------------------------
# The layout flags are the trainer's (TrainConfig / ModelConfig fields, generated by megapix.cliargs); for the
# planner an unset one is searched over. The old short spellings stay accepted.
LAYOUT_FIELDS = {TrainConfig: ("tensor_parallel", "pipeline_parallel", "zero_stage", "micro_batch", "global_batch",
                               "activation_checkpointing", "precision", "sequence_parallel", "context_parallel"),
                 ModelConfig: ("kernels", "resolution")}
OLD_SPELLINGS = {"--tp": "tensor_parallel", "--pp": "pipeline_parallel", "--zero": "zero_stage"}
PLANNER_DEFAULTS = {"global_batch": "the paper's: 128, 64 for igpt-xl", "precision": "bf16 (auto is bf16: GPUs)",
                    "kernels": "triton (auto is Triton: GPUs)", "resolution": "the preset's"}
RESOLUTIONS = (32, 48, 64, 96, 128)  # the --max-resolution table's sides
TABLE_GPUS = (8, 64, 256)


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.command_parser("megapix plan", "per-GPU memory, step time and MFU of training layouts; with no "
                               "layout given, every layout that fits, fastest first")
    p.add_argument("--model", default="igpt-xl", help=f"preset: {', '.join(PRESETS)} (default: igpt-xl)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(DEVICES), default="h100", help="device model (peak, HBM, links)")
    p.add_argument("--gpu-memory", type=float, help="GB per GPU (default: the device's)")
    group = p.add_argument_group("layout (the trainer's flags; each one given pins that axis, the rest are searched)")
    for cls, names in LAYOUT_FIELDS.items():
        cliargs.add_fields(group, cls, only=names)
    for action in group._group_actions:  # the trainer's default is not the planner's: say what an unset flag means
        if action.dest in LAYOUT_FIELDS[TrainConfig] + LAYOUT_FIELDS[ModelConfig] and action.help:
            default = PLANNER_DEFAULTS.get(action.dest, "searched")
            action.help = action.help[:action.help.rfind("(default:")] + f"(default: {default})"
    for flag, dest in OLD_SPELLINGS.items():
        p.add_argument(flag, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--efficiency", type=float, default=EFFICIENCY, help="achieved fraction of peak on matmuls")
    p.add_argument("--top", type=int, default=20, help="rows of the ranked table (0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--table", action="store_true", help="docs/planner.md's table: igpt-s/m/l/xl on 1, 8, 64, 256 GPUs")
    p.add_argument("--max-resolution", action="store_true",
                   help=f"docs/planner.md: the largest of {', '.join(map(str, RESOLUTIONS))} each preset fits at on "
                        f"{', '.join(map(str, TABLE_GPUS))} GPUs, with and without SP/CP, and the layout")
    p.add_argument("--check", action="store_true",
                   help="planner model-state bytes next to DeepSpeed's estimators for tiny/small/bench")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    dev = DEVICES[a.gpu]
    if a.table:
        print(readme_table(dev, a.efficiency))
        return 0
    if a.check:
        print(check_table())
        return 0
    if a.max_resolution:
        print(max_resolution_table(dev, a.gpu_memory or dev.memory_gb, a.efficiency))
        return 0
    if a.model not in PRESETS:
        raise ConfigError(f"unknown model preset {a.model!r}; choose one of {', '.join(PRESETS)}")
    pin = {name: getattr(a, name, None) for name in LAYOUT_FIELDS[TrainConfig] + LAYOUT_FIELDS[ModelConfig]}
    for name in ("nodes", "gpus_per_node", "gpu_memory", "efficiency"):
        v = getattr(a, name)
        if v is not None and v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={v} must be positive")
    for name in ("tensor_parallel", "pipeline_parallel", "micro_batch", "global_batch"):
        if pin[name] is not None and pin[name] <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={pin[name]} must be positive")
    mem_gb = a.gpu_memory or dev.memory_gb
    gb = pin["global_batch"] or PAPER_BATCH.get(a.model, 64)
    precision = "bf16" if pin["precision"] in (None, "auto") else pin["precision"]
    kernels = "triton" if pin["kernels"] in (None, "auto") else pin["kernels"]
    tp, pp, zero, micro, ckpt, sp, cp = (pin[k] for k in ("tensor_parallel", "pipeline_parallel", "zero_stage",
                                                          "micro_batch", "activation_checkpointing",
                                                          "sequence_parallel", "context_parallel"))
    if cp is not None and cp <= 0:
        raise ConfigError(f"--context-parallel={cp} must be positive")
    m = model_preset(a.model, **({"resolution": pin["resolution"]} if pin["resolution"] else {}))
    world = a.nodes * a.gpus_per_node
    if tp and pp and zero is not None:
        k = cp or 1
        if world % (tp * pp * k):
            raise ConfigError(f"{world} GPUs are not divisible by TP {tp} x PP {pp} x CP {k}; choose TP x PP x CP "
                              f"dividing {world}")
        dp = world // (tp * pp * k)
        if gb % dp:
            raise ConfigError(f"global batch {gb} is not divisible by DP {dp}; pass --global-batch, a multiple of {dp}")
        lay = Layout(tp, pp, dp, zero, micro or 1, bool(ckpt), bool(sp), k)
        why = layout_problem(m, lay, gb, a.gpus_per_node)
        if why:
            raise ConfigError(f"layout {lay.describe()} cannot run: {why}")
        p = plan_one(a.model, m, lay, gb, a.nodes, a.gpus_per_node, dev, mem_gb, a.efficiency, precision, kernels)
        if a.json:
            print(json.dumps(p.to_dict(), indent=1))
        else:
            print(describe(p))
            print(f"  fits in {mem_gb:g} GB: {'yes' if p.fits else 'NO'}; ds_config "
                  f"({ds_config_file(lay) or 'no file'} + flags): {json.dumps(p.ds_config)}")
            print(ASSUMPTIONS)
        return 0 if p.fits else 1
    why = pinned_problem(m, world, a.gpus_per_node, gb, tp, pp, zero, micro, ckpt, sp, cp)
    if why:
        raise ConfigError(why)
    plans = search(a.model, a.nodes, a.gpus_per_node, mem_gb, dev, gb, a.efficiency, precision=precision,
                   kernels=kernels, resolution=pin["resolution"], tp=tp, pp=pp, zero=zero, micro=micro, ckpt=ckpt,
                   sp=sp, cp=cp)
    if a.json:
        print(json.dumps([p.to_dict() for p in plans], indent=1))
        return 0 if plans else 1
    print(f"{a.model} ({m.num_parameters() / 1e6:.0f}M parameters, {m.n_ctx} tokens/image) on {a.nodes} x "
          f"{a.gpus_per_node} {dev.name} ({mem_gb:g} GB), global batch {gb}, {precision}, {kernels} kernels; "
          f"{len(plans)} layouts fit")
    if not plans:
        print("no layout fits in memory: add GPUs, lower --global-batch, or use a GPU with more memory",
              file=sys.stderr)
        return 1
    print(table(plans, a.top or None))
    print("\ncommands (the ds_config file, if any, is named in each; --json prints the full ds_config of every row):")
    for i, p in enumerate(plans[:a.top] if a.top else plans, 1):
        print(f"{i:>3} {p.command}")
    print()
    print("best: " + describe(plans[0]))
    print(f"  ds_config ({ds_config_file(plans[0].layout) or 'no file'} + the flags above): "
          f"{json.dumps(plans[0].ds_config)}")
    print(ASSUMPTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
