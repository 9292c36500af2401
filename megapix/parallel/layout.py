"""The TP x PP x CP x DP layout of the ranks (the one Layout class, also the planner's), its rules
(layout_problems), validated before anything is allocated.

Process groups come from DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model: model-parallel
ranks adjacent, as gpt-neox arranges them), so DeepSpeed and megapix agree on every rank's role.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from megapix.config import VOCAB_SIZE, ConfigError, ModelConfig, TrainConfig


@dataclass
class Layout:
    """How the ranks split the model and the batch: TP x PP x CP x DP, the ZeRO stage and the micro-batch. The planner
    (megapix.plan) builds these without processes; build_layout adds this rank's topology and groups."""
    tp: int = 1
    pp: int = 1
    dp: int = 1  # data-parallel shards of the batch; DeepSpeed's data axis is dp x cp (see data)
    zero_stage: int = 0
    micro_batch: int = 1
    checkpointing: bool = False  # activation checkpointing of every block
    sp: bool = False  # sequence parallelism over the TP group (megapix/parallel/sequence.py)
    cp: int = 1  # context parallelism (megapix/parallel/context.py): ranks sharing each image's positions
    rank: int = 0
    cp_group: object = field(default=None, repr=False, compare=False)
    topology: object = field(default=None, repr=False, compare=False)  # deepspeed PipeModelDataParallelTopology
    # deepspeed PipelineParallelGrid: the "mpu" DeepSpeed takes for tensor parallelism
    grid: object = field(default=None, repr=False, compare=False)
    # the DeepSpeed config the engine is built with, when known before construction (the Trainer sets it):
    # under ZeRO-3, build_module partitions each parameter with it as soon as the parameter exists
    ds_config: dict | None = field(default=None, repr=False, compare=False)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def data(self) -> int:
        """DeepSpeed's data axis: the DP shards times the CP ranks of each (they hold the same images at different
        positions, so to DeepSpeed they are data-parallel replicas); ZeRO partitions over it."""
        return self.dp * self.cp

    @property
    def seq_split(self) -> int:
        """How many ranks share the positions the norms and residuals see: t under SP, cp under CP."""
        return (self.tp if self.sp else 1) * self.cp

    @property
    def coord(self):
        return self.topology.get_coord(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coord.data // self.cp

    @property
    def cp_rank(self) -> int:
        return self.coord.data % self.cp

    @property
    def tp_rank(self) -> int:
        return self.coord.model

    @property
    def pp_rank(self) -> int:
        return self.coord.pipe

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group() if self.grid is not None else None

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group() if self.grid is not None else None

    def describe(self, batch: bool = True, world: bool = False) -> str:
        """The one name of a layout: 'TP2+SP x PP1 x CP2 x DP4, ZeRO-1' (+ ', mb 2, ckpt' with batch; a 'world 16 = '
        prefix with world)."""
        name = (f"TP{self.tp}{'+SP' if self.sp else ''} x PP{self.pp}{f' x CP{self.cp}' if self.cp > 1 else ''} x "
                f"DP{self.dp}, ZeRO-{self.zero_stage}")
        if batch:
            name += f", mb {self.micro_batch}{', ckpt' if self.checkpointing else ''}"
        return f"world {self.world} = {name}" if world else name


def layout_problems(model: ModelConfig, lay: Layout, global_batch: int, gpus_per_node: int | None = None) -> list[str]:
    """Why DeepSpeed or the model cannot run this layout, one sentence per broken rule ([]: it can). check_layout
    raises the first; the planner keeps the layouts with none. gpus_per_node (the planner's): TP stays in a node."""
    tp, pp, cp, zero, sp = lay.tp, lay.pp, lay.cp, lay.zero_stage, lay.sp
    out = []
    if cp > 1:
        if model.n_ctx % (2 * cp):
            out.append(f"--context-parallel {cp} cuts the {model.n_ctx} positions into 2 x {cp} chunks (a head and a "
                       f"tail per rank), which does not divide them; use a degree whose double divides {model.n_ctx}")
        if pp > 1:
            out.append(f"--context-parallel {cp} does not run with --pipeline-parallel {pp} (DeepSpeed's pipeline "
                       "engine sends whole activations between stages); use TP x CP x DP with --pipeline-parallel 1")
        if sp:
            out.append("--context-parallel with --sequence-parallel is not supported yet; use one of them (each "
                       "splits the sequence: SP over the TP ranks, CP over its own group)")
    if pp > 1 and zero > 1:
        out.append(f"DeepSpeed's pipeline engine does not support ZeRO-{zero}; use --zero-stage 1 with "
                   f"--pipeline-parallel {pp}, or --pipeline-parallel 1 with ZeRO-{zero} "
                   f"(TP {tp} x DP {lay.world // tp})")
    if model.n_head % tp:
        out.append(f"{model.n_head} attention heads cannot be divided across TP {tp}; use a --tensor-parallel that "
                   f"divides {model.n_head}")
    if sp and tp == 1:
        out.append("--sequence-parallel splits the sequence over the TP ranks: it needs TP > 1")
    if sp and model.n_ctx % tp:
        out.append(f"--sequence-parallel splits the {model.n_ctx} positions over TP {tp}, which does not divide them; "
                   f"use a --tensor-parallel that divides {model.n_ctx} or drop --sequence-parallel")
    if VOCAB_SIZE % tp:
        out.append(f"the {VOCAB_SIZE}-way head cannot be divided across TP {tp}; use a power of two")
    if gpus_per_node is not None and (tp > gpus_per_node or gpus_per_node % tp):
        out.append(f"TP {tp} must stay inside a node of {gpus_per_node} GPUs")
    if model.n_layer < pp:
        out.append(f"{model.n_layer} layers cannot fill {pp} pipeline stages; use --pipeline-parallel <= "
                   f"{model.n_layer}")
    if global_batch % lay.dp:
        out.append(f"global batch {global_batch} is not divisible by data-parallel size {lay.dp}; use a multiple of "
                   f"{lay.dp}")
    elif (global_batch // lay.dp) % lay.micro_batch:
        out.append(f"per-rank batch {global_batch // lay.dp} is not a multiple of --micro-batch {lay.micro_batch}")
    return out


def check_layout(world: int, model: ModelConfig, train: TrainConfig, zero_stage: int) -> Layout:
    """Refuse layouts DeepSpeed or the model cannot run, naming one that would work; return the layout."""
    tp, pp, cp = train.tensor_parallel, train.pipeline_parallel, train.context_parallel
    if world % (tp * pp * cp):
        with_cp = f" x CP {cp}" if cp > 1 else ""
        raise ConfigError(f"world size {world} is not divisible by TP {tp} x PP {pp}{with_cp}; launch a multiple of "
                          f"{tp * pp * cp} ranks or change --tensor-parallel/--pipeline-parallel/--context-parallel")
    dp = world // (tp * pp * cp)
    micro = train.micro_batch or max(1, train.global_batch // dp)
    lay = Layout(tp=tp, pp=pp, dp=dp, zero_stage=zero_stage, micro_batch=micro,
                 checkpointing=train.activation_checkpointing, sp=train.sequence_parallel, cp=cp)
    problems = layout_problems(model, lay, train.global_batch)
    if problems:
        raise ConfigError(problems[0])
    return lay


def build_layout(world: int, rank: int, model: ModelConfig, train: TrainConfig, zero_stage: int) -> Layout:
    lay = check_layout(world, model, train, zero_stage)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    tp, pp, cp = train.tensor_parallel, train.pipeline_parallel, train.context_parallel
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    grid = PipelineParallelGrid(topology=topology) if world > 1 else None
    cp_group = context_parallel_group(topology, rank, cp) if cp > 1 else None
    if grid is not None:  # the Megatron-style names some DeepSpeed parts (activation checkpointing) ask the mpu for
        grid.get_tensor_model_parallel_group = grid.get_slice_parallel_group
        grid.get_tensor_model_parallel_world_size = grid.get_slice_parallel_world_size
        grid.get_tensor_model_parallel_rank = grid.get_slice_parallel_rank
    return replace(lay, rank=rank, cp_group=cp_group, topology=topology, grid=grid)


def context_parallel_group(topology, rank: int, cp: int):
    """This rank's CP group: along DeepSpeed's data axis (size dp x cp), data coordinates d with the same d // cp
    (and the same pipe and model coordinates). Every rank creates every group, in the same order."""
    import torch.distributed as dist

    mine = None
    dims = dict(zip(topology.get_axis_names(), topology.dims))
    for pipe in range(dims["pipe"]):
        for model in range(dims["model"]):
            for shard in range(dims["data"] // cp):
                members = [topology.get_rank(pipe=pipe, data=shard * cp + c, model=model) for c in range(cp)]
                group = dist.new_group(members)
                if rank in members:
                    mine = group
    return mine
