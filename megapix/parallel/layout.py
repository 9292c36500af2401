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
    topology: object = None  # deepspeed PipeModelDataParallelTopology
    grid: object = None  # deepspeed PipelineParallelGrid: the "mpu" DeepSpeed takes for tensor parallelism
    # the DeepSpeed config the engine is built with, when known before construction (the Trainer sets it):
    # under ZeRO-3, build_module partitions each parameter with it as soon as the parameter exists
    ds_config: dict | None = None

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def coord(self):
        return self.topology.get_coord(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.coord.data

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
        return f"world {self.world} = TP {self.tp}{sp} x PP {self.pp} x DP {self.dp}, ZeRO-{self.zero_stage}"


def check_layout(world: int, model: ModelConfig, train: TrainConfig, zero_stage: int) -> None:
    """Refuse layouts DeepSpeed or the model cannot run, naming one that would work."""
    tp, pp = train.tensor_parallel, train.pipeline_parallel
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by TP {tp} x PP {pp}; "
                          f"launch a multiple of {tp * pp} ranks or change --tensor-parallel/--pipeline-parallel")
    dp = world // (tp * pp)
    if pp > 1 and zero_stage > 1:
        raise ConfigError(f"DeepSpeed's pipeline engine does not support ZeRO-{zero_stage}; use --zero-stage 1 with "
                          f"--pipeline-parallel {pp}, or --pipeline-parallel 1 with ZeRO-{zero_stage} "
                          f"(TP {tp} x DP {world // tp})")
    if model.n_head % tp:
        raise ConfigError(f"{model.n_head} attention heads cannot be divided across TP {tp}; "
                          f"use a --tensor-parallel that divides {model.n_head}")
    if train.sequence_parallel and model.n_ctx % tp:
        raise ConfigError(f"--sequence-parallel splits the {model.n_ctx} positions over TP {tp}, which does not "
                          f"divide them; use a --tensor-parallel that divides {model.n_ctx} or drop --sequence-parallel")
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

    tp, pp = train.tensor_parallel, train.pipeline_parallel
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    grid = PipelineParallelGrid(topology=topology) if world > 1 else None
    if grid is not None:  # the Megatron-style names some DeepSpeed parts (activation checkpointing) ask the mpu for
        grid.get_tensor_model_parallel_group = grid.get_slice_parallel_group
        grid.get_tensor_model_parallel_world_size = grid.get_slice_parallel_world_size
        grid.get_tensor_model_parallel_rank = grid.get_slice_parallel_rank
    return Layout(world=world, rank=rank, tp=tp, pp=pp, zero_stage=zero_stage, sp=train.sequence_parallel,
                  topology=topology, grid=grid)
