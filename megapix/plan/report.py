"""What the planner prints: the ranked table, one plan in detail, and docs/planner.md's generated tables (the best
layout per preset and GPU count, the largest resolution, model-state bytes beside DeepSpeed's estimators)."""
from __future__ import annotations

from megapix.config import VOCAB_SIZE, ModelConfig, model_preset
from megapix.parallel.layout import Layout
from megapix.plan.devices import EFFICIENCY, FULL_WIDTH, GiB, Device
from megapix.plan.memory import memory, stage_params
from megapix.plan.search import PAPER_BATCH, PAPER_ITERATIONS, Plan, search

ASSUMPTIONS = ("checked against the engine on CPU (tests/test_plan.py, test_flops.py, test_comms.py): model states, "
               "saved activations\nper kernel path, FLOPs, bytes per collective; stated device constants: peak "
               "FLOP/s, matmul efficiency, HBM,\nNVLink and IB bandwidth, latency, ZeRO-3 hook overhead, workspace "
               "(docs/planner.md)")
RESOLUTIONS = (32, 48, 64, 96, 128)  # the --max-resolution table's sides
TABLE_GPUS = (8, 64, 256)


def table(plans: list[Plan], limit: int | None = None) -> str:
    """The ranked table: the layout, the memory per GPU (GiB) and the speed of each row."""
    head = (f"{'#':>3} {'TP':>2} {'SP':>3} {'PP':>2} {'CP':>2} {'DP':>4} {'Z':>1} {'mb':>3} {'ckpt':>4} | "
            f"{'params':>6} {'grads':>6} {'master':>6} {'adam':>6} {'act':>6} {'pipe':>5} {'wksp':>5} {'peak':>6} | "
            f"{'step s':>7} {'tok/s':>9} {'MFU':>5}")
    rows = [head, "-" * len(head)]
    for i, p in enumerate(plans[:limit] if limit else plans, 1):
        L, M, T = p.layout, p.memory, p.timing
        rows.append(f"{i:>3} {L.tp:>2} {'yes' if L.sp else 'no':>3} {L.pp:>2} {L.cp:>2} {L.dp:>4} {L.zero_stage:>1} "
                    f"{L.micro_batch:>3} {'yes' if L.checkpointing else 'no':>4} | "
                    f"{_g(M.params)} {_g(M.grads)} {_g(M.master)} {_g(M.optimizer)} {_g(M.activations)} "
                    f"{M.pipe_buffers / GiB:5.2f} {M.workspace / GiB:5.2f} {_g(M.peak)} | "
                    f"{T.step:7.3f} {T.tokens_per_s:9.0f} {T.mfu:5.1%}")
    return "\n".join(rows)


def _g(x: float) -> str:
    return f"{x / GiB:6.2f}"


def describe(p: Plan) -> str:
    """One plan in detail: memory per GPU and step time, term by term (lines of at most ~115 characters)."""
    M, T = p.memory, p.timing
    lines = [f"{p.model}: {p.layout.describe()} on {p.nodes} x {p.gpus_per_node} GPUs, global batch {p.global_batch}",
             f"  memory per GPU (GiB): params {M.params / GiB:.2f}, grads at step {M.grads / GiB:.2f}, fp32 master "
             f"{M.master / GiB:.2f}, Adam {M.optimizer / GiB:.2f}, grads in backward {M.grads_backward / GiB:.2f},",
             f"    activations {M.activations / GiB:.2f} (no ckpt {M.activations_no_ckpt / GiB:.2f}, ckpt "
             f"{M.activations_ckpt / GiB:.2f}), pipe buffers {M.pipe_buffers / GiB:.2f}, workspace "
             f"{M.workspace / GiB:.2f} -> peak {M.peak / GiB:.2f}",
             f"  step {T.step:.3f} s = compute {T.compute:.3f} + elementwise {T.elementwise:.3f} + TP "
             f"{T.tp_comm:.3f} + CP ring {T.cp_comm:.3f} + PP bubble {T.bubble:.3f} + p2p {T.pp_comm:.3f}",
             f"    + DP exposed {T.dp_comm:.3f} + Adam {T.optimizer:.3f}; {T.tokens_per_s:,.0f} tokens/s, "
             f"{T.tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {T.mfu:.1%}"]
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
            rows.append(f"| {model} | {n} | {L.describe(batch=False)} | {L.micro_batch} | "
                        f"{'yes' if L.checkpointing else 'no'} | {p.memory.peak / GiB:.1f} | {p.timing.step:.3f} | "
                        f"{p.timing.tokens_per_s:,.0f} | {p.timing.mfu:.0%} | "
                        f"{days_to(p, PAPER_ITERATIONS[model]):.1f} |")
    return "\n".join(rows)


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
                          [f"{p.resolution}^2", p.layout.describe(), f"{p.timing.tokens_per_s:,.0f}"])
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
    return [Layout(), Layout(tp=2), Layout(pp=2), Layout(dp=2, zero_stage=1), Layout(dp=2, zero_stage=2),
            Layout(dp=2, zero_stage=3),            Layout(tp=2, pp=2)]


def predicted_states(m: ModelConfig, lay: Layout, precision: str) -> float:
    """Planner's params + grads + master + Adam bytes on the rank with the most (the largest pipeline stage)."""
    return memory(m, lay, lay.dp * lay.micro_batch * max(1, lay.pp), precision).states


def deepspeed_estimate(m: ModelConfig, lay: Layout) -> float | None:
    """DeepSpeed's GPU estimate for the model states of this rank's share (its functions assume bf16/fp16 and
    ZeRO-2 or 3; none covers ZeRO-0). Stage 1/2: 2P + 18P/d; stage 3: 4 x largest layer + 18P/d."""
    P = max(stage_params(m, lay.tp, lay.pp))
    if lay.zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=lay.dp, cpu_offload=False)[1]
    if lay.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        h = m.d_model  # DeepSpeed's "largest layer": the module with the most direct parameters
        largest = max(4 * h * h // lay.tp, VOCAB_SIZE * h, m.n_positions * h)
        return estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=lay.dp, cpu_offload=False)[1]
    return None


