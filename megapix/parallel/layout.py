"""The TP x PP x DP layout of the ranks, validated before anything is allocated.

Process groups come from DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model: model-parallel
ranks adjacent, as gpt-neox arranges them), so DeepSpeed and megapix agree on every rank's role.
"""
from __future__ import annotations

from dataclasses import dataclass

from megapix.config import VOCAB_SIZE, ConfigError, ModelConfig, TrainConfig


@dataclass
class Layout:
    world: int
    rank: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    sp: bool = False  # sequence parallelism over the TP group (megapix/parallel/sequence.py)
    cp: int = 1  # context parallelism (megapix/parallel/context.py): part of DeepSpeed's data axis, see dp
    cp_group: object = None
    topology: object = None  # deepspeed PipeModelDataParallelTopology
    grid: object = None  # deepspeed PipelineParallelGrid: the "mpu" DeepSpeed takes for tensor parallelism
    # the DeepSpeed config the engine is built with, when known before construction (the Trainer sets it):
    # under ZeRO-3, build_module partitions each parameter with it as soon as the parameter exists
    ds_config: dict | None = None

    @property
    def dp(self) -> int:
        """Data-parallel shards of the batch. DeepSpeed's data axis is dp x cp: the CP ranks of one shard hold the
        same images (different positions) and, to DeepSpeed, are data-parallel replicas."""
        return self.world // (self.tp * self.pp * self.cp)

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

    def describe(self) -> str:
        sp = "+SP" if self.sp else ""
        cp = f" x CP {self.cp}" if self.cp > 1 else ""
        return f"world {self.world} = TP {self.tp}{sp} x PP {self.pp}{cp} x DP {self.dp}, ZeRO-{self.zero_stage}"


def check_layout(world: int, model: ModelConfig, train: TrainConfig, zero_stage: int) -> None:
    """Refuse layouts DeepSpeed or the model cannot run, naming one that would work."""
    tp, pp, cp = train.tensor_parallel, train.pipeline_parallel, train.context_parallel
    if world % (tp * pp * cp):
        with_cp = f" x CP {cp}" if cp > 1 else ""
        raise ConfigError(f"world size {world} is not divisible by TP {tp} x PP {pp}{with_cp}; launch a multiple of "
                          f"{tp * pp * cp} ranks or change --tensor-parallel/--pipeline-parallel/--context-parallel")
    dp = world // (tp * pp * cp)
    if cp > 1:
        if model.n_ctx % (2 * cp):
            raise ConfigError(f"--context-parallel {cp} cuts the {model.n_ctx} positions into 2 x {cp} chunks (a head "
                              f"and a tail per rank), which does not divide them; use a degree whose double divides "
                              f"{model.n_ctx}")
        if pp > 1:
            raise ConfigError(f"--context-parallel {cp} does not run with --pipeline-parallel {pp} (DeepSpeed's "
                              "pipeline engine sends whole activations between stages); use TP x CP x DP with "
                              "--pipeline-parallel 1")
        if train.sequence_parallel:
            raise ConfigError("--context-parallel with --sequence-parallel is not supported yet; use one of them "
                              "(each splits the sequence: SP over the TP ranks, CP over its own group)")
    if pp > 1 and zero_stage > 1:
        raise ConfigError(f"DeepSpeed's pipeline engine does not support ZeRO-{zero_stage}; use --zero-stage 1 with "
                          f"--pipeline-parallel {pp}, or --pipeline-parallel 1 with ZeRO-{zero_stage} "
                          f"(TP {tp} x DP {world // tp})")
    if model.n_head % tp:
        raise ConfigError(f"{model.n_head} attention heads cannot be divided across TP {tp}; "
                          f"use a --tensor-parallel that divides {model.n_head}")
    if train.sequence_parallel and model.n_ctx % tp:
        raise ConfigError(f"--sequence-parallel splits the {model.n_ctx} positions over TP {tp}, which does not "
                          f"divide them; use a --tensor-parallel that divides {model.n_ctx} or drop "
                          "--sequence-parallel")
    if VOCAB_SIZE % tp:
        raise ConfigError(f"the {VOCAB_SIZE}-way head cannot be divided across TP {tp}; use a power of two")
    if model.n_layer < pp:
        raise ConfigError(f"{model.n_layer} layers cannot fill {pp} pipeline stages; use --pipeline-parallel <= "
                          f"{model.n_layer}")
    if train.global_batch % dp:
        raise ConfigError(f"global batch {train.global_batch} is not divisible by data-parallel size {dp}; "
                          f"use a multiple of {dp}")
    micro = train.micro_batch or train.global_batch // dp
    if (train.global_batch // dp) % micro:
        raise ConfigError(f"per-rank batch {train.global_batch // dp} is not a multiple of --micro-batch {micro}")


def build_layout(world: int, rank: int, model: ModelConfig, train: TrainConfig, zero_stage: int) -> Layout:
    check_layout(world, model, train, zero_stage)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

    tp, pp, cp = train.tensor_parallel, train.pipeline_parallel, train.context_parallel
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    grid = PipelineParallelGrid(topology=topology) if world > 1 else None
    cp_group = context_parallel_group(topology, rank, cp) if cp > 1 else None
    if grid is not None:  # the Megatron-style names some DeepSpeed parts (activation checkpointing) ask the mpu for
        grid.get_tensor_model_parallel_group = grid.get_slice_parallel_group
        grid.get_tensor_model_parallel_world_size = grid.get_slice_parallel_world_size
        grid.get_tensor_model_parallel_rank = grid.get_slice_parallel_rank
    return Layout(world=world, rank=rank, tp=tp, pp=pp, zero_stage=zero_stage, sp=train.sequence_parallel,
                  cp=cp, cp_group=cp_group, topology=topology, grid=grid)


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
