"""Step time per GPU: compute, elementwise traffic, the bytes of every collective and p2p message (comm_bytes) over
the device's links, the pipeline bubble, and what overlaps. The model and its constants: docs/planner.md (Time)."""
from __future__ import annotations

from dataclasses import dataclass

from megapix.config import ModelConfig
from megapix.parallel.layout import Layout
from megapix.plan.devices import COMM_EFFICIENCY, EFFICIENCY, FULL_WIDTH, LATENCY_S, ZERO3_BLOCK_OVERHEAD_S, Device
from megapix.plan.memory import stage_layers, stage_params, zero3_kept_and_regathered


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


def comm_bytes(m: ModelConfig, lay: Layout, global_batch: int, nbytes: int = 2) -> list[dict]:
    """Payload bytes each rank of every pipeline stage puts into its collectives and p2p messages in one step
    (an all-reduce's tensor, a reduce-scatter's input, an all-gather's output, each message sent or received),
    per group kind; recorded from the engine by megapix.plan.comms in tests/test_comms.py. act = b s h e:
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
        tp, tp_calls, tp_ring = _tp_bytes(m, lay, i, layers, nbytes, micro)
        sides = (i > 0) + (not last) if lay.pp > 1 else 0
        passes = micro * layers * (lay.cp - 1) * (2 + (1 if lay.checkpointing else 0))
        kv = 2 * act / (lay.tp * lay.cp)
        dp_reduce = dp_gather = 0.0
        if lay.data > 1:
            dp_reduce = nbytes * P * (micro if lay.zero_stage >= 2 else 1)
            if lay.zero_stage in (1, 2):
                dp_gather = nbytes * P
            elif lay.zero_stage == 3:
                dp_gather = nbytes * micro * (P + zero3_kept_and_regathered(m, lay.tp)[1])
        out.append(dict(tp=tp, tp_calls=tp_calls, tp_ring=tp_ring, pp=2 * sides * micro * p2p,
                        pp_sent=sides * micro * p2p, dp_reduce=dp_reduce, dp_gather=dp_gather, cp=2 * passes * kv,
                        cp_sent=passes * kv, cp_calls=passes))
    return out


def _tp_bytes(m: ModelConfig, lay: Layout, i: int, layers: int, nbytes: int, micro: int) -> tuple:
    """(tp, tp_calls, tp_ring) of comm_bytes for stage i: TP's all-reduces, or SP's gathers and scatters."""
    rows, h = lay.micro_batch * m.n_ctx, m.d_model
    act, last = nbytes * rows * h, i == lay.pp - 1
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
    return tp, tp_calls, tp_ring


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
    local = P / lay.data if lay.zero_stage >= 1 or lay.pp > 1 else P
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
        if lay.zero_stage in (0, 1):  # one ring all-reduce after backward (+ ZeRO-1's all-gather), not overlapped
            dp_comm = 2 * frac * reduce / dp_link + frac * gather / dp_link
        elif lay.zero_stage == 2:  # a reduce-scatter per micro-batch behind its backward, the all-gather after the step
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


