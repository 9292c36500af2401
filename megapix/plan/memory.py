"""Memory per GPU: parameters per rank and pipeline stage, model states, saved activations per kernel path, pipe
buffers and workspace. The formulas and their derivation: docs/planner.md (Memory)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

from megapix.config import VOCAB_SIZE, ConfigError, ModelConfig
from megapix.parallel.layout import Layout
from megapix.plan.devices import BUCKET_ELEMENTS, WORKSPACE_BYTES, ZERO3_MAX_LIVE, ZERO3_REUSE_DISTANCE


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
    (the table in docs/planner.md, Model states)."""
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
    st = state_bytes(P, lay.data, lay.zero_stage, precision, lay.pp > 1)  # ZeRO partitions over DP x CP
    if lay.zero_stage in (0, 1):
        grads_bwd = nbytes * P
    else:
        grads_bwd = nbytes * min(BUCKET_ELEMENTS, P) + (nbytes * P / lay.data if lay.zero_stage == 2 else 0.0)
    full = max(stage_activation_bytes(m, lay, global_batch, nbytes, kernels, checkpointing=False))
    ckpt = max(stage_activation_bytes(m, lay, global_batch, nbytes, kernels, checkpointing=True))
    pipe = pipe_buffer_bytes(m, lay, global_batch, nbytes)
    workspace = WORKSPACE_BYTES if precision == "bf16" else 0.0
    if lay.zero_stage in (1, 2):
        workspace += 2 * nbytes * min(BUCKET_ELEMENTS, P)
    elif lay.zero_stage == 3:  # the current and prefetched layer, or what the reuse distance keeps gathered
        workspace += nbytes * max(2 * max(layer_params(m, lay.tp)), zero3_kept_and_regathered(m, lay.tp)[0])
    return Memory(**st, grads_backward=grads_bwd, activations=ckpt if lay.checkpointing else full,
                  activations_no_ckpt=full, activations_ckpt=ckpt, pipe_buffers=pipe, workspace=workspace)


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
