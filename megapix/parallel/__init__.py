"""Everything about ranks. The model never imports this package: parallelism is applied from outside."""
from __future__ import annotations

import torch

from megapix.config import Config
from megapix.model import ImageGPT, lm_loss
from megapix.model.compile import compile_blocks
from megapix.parallel import dist as pdist
from megapix.parallel.construct import Zero3Partitioner, build_local, is_structure_only, param_dtype
from megapix.parallel.layout import Layout
from megapix.parallel.pipeline import build_pipeline
from megapix.parallel.context import ContextParallelLoss, apply_context_parallel
from megapix.parallel.tensor import VocabParallelLoss, apply_sequence_parallel


class LossModel(torch.nn.Module):
    """The plain model plus its loss, as one module DeepSpeed can wrap: forward(tokens, mask) -> loss."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, tokens, mask=None):
        logits = self.model(tokens, mask)
        return self.loss_fn(logits, tokens, mask)


def configure_activation_checkpointing(layout: Layout) -> None:
    """deepspeed.checkpointing with the TP RNG tracker (the grid is the mpu), as Megatron-DeepSpeed sets it up."""
    import deepspeed

    deepspeed.checkpointing.configure(layout.grid, partition_activations=False, contiguous_checkpointing=False,
                                      checkpoint_in_cpu=False, synchronize=False, profile=False)
    if torch.cuda.is_available() and layout.grid is not None:
        deepspeed.checkpointing.model_parallel_cuda_manual_seed(1234)


def checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward (deepspeed.checkpointing.checkpoint per block)."""
    import deepspeed

    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, _f=forward: deepspeed.checkpointing.checkpoint(_f, x)


def build_module(cfg: Config, layout: Layout, head=None, initial=None):
    """The module DeepSpeed wraps for this layout, and whether it is a PipelineModule.

    No rank materialises more than its share: the model is built on the meta device, cut to this rank's TP
    shard there, and then allocated one parameter at a time (megapix/parallel/construct.py); under ZeRO-3
    (layout.ds_config set, as the Trainer does) each parameter is partitioned over the data-parallel group as
    soon as it exists.

    Pre-training's module is the model plus its loss (LossModel; the pipeline's last layer is HeadLayer). A task
    with a head of its own (fine-tuning's classifier) passes `head`, the hook that puts it on top, built the same
    way:
        head.module(model, layout) -> the module around the materialised model, its own submodules created on
                                      the meta device (they are materialised here, canonical names "<part>.*")
        head.parts                 -> the names of those submodules
        head.pipeline_layer(model_config, seed, tp_info, initial) -> the LayerSpec of the last pipeline layer
        head.pipeline_loss(lm)     -> the last stage's loss_fn, given the LM loss lm(logits, tokens, mask)
    `initial(name, full_shape)` gives each parameter's starting value by canonical name (default: the
    initialisation; fine-tuning: its pre-trained weights, and its head's own)."""
    if cfg.train.activation_checkpointing:
        configure_activation_checkpointing(layout)
    if layout.pp > 1:
        module = build_pipeline(cfg, layout, head, initial)
        _compile(module, cfg)
        return module, True
    with torch.device("meta"):
        model = ImageGPT(cfg.model, seed=cfg.train.seed)
    tp_info = (layout.tp_group, layout.tp, layout.tp_rank) if layout.tp > 1 else (None, 1, 0)
    partition, dtype = None, None
    if layout.zero_stage == 3 and layout.ds_config is not None and not is_structure_only():
        # the group and mpu the engine partitions over (Trainer passes the grid as mpu only under TP)
        mpu = layout.grid if layout.tp > 1 else None
        partition = Zero3Partitioner(layout.ds_config, layout.dp_group if mpu is not None else None, mpu)
        dtype = param_dtype(layout.ds_config)

    def build(part, prefix=""):
        return build_local(part, cfg.model, cfg.train.seed, tp_info, prefix=prefix, dtype=dtype,
                           partition=partition, initial=initial)

    build(model)
    if layout.sp:
        apply_sequence_parallel(model, layout.tp_group)
    if layout.cp > 1:
        apply_context_parallel(model, layout.cp_group, cfg.model.n_ctx)
    if head is None:
        loss = lm_loss
        if layout.tp > 1:
            loss = VocabParallelLoss(layout.tp_group, layout.tp_rank, cfg.model.objective == "bert")
        if layout.cp > 1:
            loss = ContextParallelLoss(loss, layout.cp_group, cfg.model.n_ctx, cfg.model.objective == "bert")
        module = LossModel(model, loss)
    else:
        with torch.device("meta"):
            module = head.module(model, layout)
        for name in head.parts:
            build(getattr(module, name), f"{name}.")
    _compile(model, cfg)  # before checkpointing, which then wraps the compiled forward
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model)
    return module, False


def _compile(module, cfg: Config) -> None:
    """--compile: each block's forward compiled (megapix.model.compile); where it cannot be, one line (rank 0)."""
    note = compile_blocks(module, cfg.train.compile, "cuda" if torch.cuda.is_available() else "cpu")
    if note is not None and pdist.is_rank0():
        print(f"megapix: {note}", flush=True)
