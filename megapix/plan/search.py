"""The search: every layout DeepSpeed and megapix can run on a cluster (pinned on any axes), planned and ranked
fastest first, each with the command and the ds_config the trainer would run it with."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass

from megapix import dsconfig
from megapix.config import PRESETS, VOCAB_SIZE, Config, ModelConfig, TrainConfig, model_preset
from megapix.parallel.layout import Layout, layout_problems
from megapix.plan.devices import EFFICIENCY, GiB, Device
from megapix.plan.memory import Memory, memory
from megapix.plan.timing import Timing, step_time

PAPER_BATCH = {"igpt-s": 128, "igpt-m": 128, "igpt-l": 128, "igpt-xl": 64}
PAPER_ITERATIONS = {"igpt-s": 1_000_000, "igpt-m": 1_000_000, "igpt-l": 1_000_000, "igpt-xl": 2_000_000}
LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage", "micro_batch", "checkpointing", "sp", "cp")  # --json
MAX_GPUS = 2**20  # the largest cluster searched (GPUs per node x nodes); the search walks the divisors of it


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
    """The divisors of n, ascending, in O(sqrt n)."""
    small = [k for k in range(1, int(n ** 0.5) + 1) if n % k == 0]
    return small + [n // k for k in reversed(small) if k * k != n]


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
        layout = {k: getattr(self.layout, k) for k in LAYOUT_KEYS}
        return {"model": self.model, "resolution": self.resolution, "layout": layout,
                "world": self.layout.world,
                "kernels": self.kernels, "memory_gib": mem, "timing": asdict(self.timing), "fits": self.fits,
                "global_batch": self.global_batch, "command": self.command, "ds_config": self.ds_config,
                "ds_config_file": ds_config_file(self.layout)}


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ds_config_file(lay: Layout) -> str | None:
    """The ds_configs/ file a row runs with. ZeRO-0 rows take none: every file there sets a stage of 1 or more,
    and the trainer refuses a JSON whose stage disagrees with --zero-stage; without a JSON DeepSpeed's pipeline
    defaults (pipe_partitioned, grad_partitioned) and megapix's own bf16/clipping settings apply."""
    if lay.zero_stage == 0:
        return None
    # pipeline.json partitions the pipe tensors over the TP ranks, which SP's per-rank chunks cannot use
    return "ds_configs/pipeline.json" if lay.pp > 1 and not lay.sp else f"ds_configs/zero{lay.zero_stage}.json"


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
                        pipeline_parallel=lay.pp, zero_stage=lay.zero_stage, precision=precision,
                        activation_checkpointing=lay.checkpointing, sequence_parallel=lay.sp,
                        context_parallel=lay.cp)
    cfg, user = dsconfig.resolve(Config(train=train), user, world=lay.world)
    return dsconfig.make_ds_config(cfg, user, lay, lay.micro_batch)


def train_command(model: str, lay: Layout, global_batch: int, nodes: int, gpus_per_node: int,
                  kernels: str = "auto", resolution: int | None = None) -> str:
    cmd = f"deepspeed --num_nodes {nodes} --num_gpus {gpus_per_node} megapix/train.py --model {model} "
    if resolution is not None and resolution != PRESETS.get(model, {}).get("resolution"):
        cmd += f"--resolution {resolution} "
    cmd += (f"--global-batch {global_batch} --micro-batch {lay.micro_batch} --tensor-parallel {lay.tp} "
            f"--pipeline-parallel {lay.pp} --zero-stage {lay.zero_stage}")
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
                                if not layout_problems(m, lay, global_batch, gpus_per_node):
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
        key = (p.layout.tp, p.layout.pp, p.layout.dp, p.layout.zero_stage, p.layout.sp, p.layout.cp)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


