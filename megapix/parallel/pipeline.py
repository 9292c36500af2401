"""The ImageGPT as a DeepSpeed PipelineModule (1F1B schedule), optionally tensor-parallel inside each stage.

Layers, in order: Embed (wte, sos, wpe) | Block x n_layer | Head (norm_f, head); the loss runs on the last
stage. Each layer is the model's own class (an ImageGPT cut down to its embedding or its head, or a Block), so
a change to the network reaches the pipeline too. Stages are balanced by parameter count
(partition_method="parameters", counted on the meta device). Every layer is built by its stage alone: on the
meta device, cut to its TP shard there, then materialised one parameter at a time from the draw under its
canonical ImageGPT name (megapix/parallel/construct.py), so any PP x TP layout starts from exactly the
single-rank weights and no rank holds more than its layers' shards plus one parameter.

Pipeline layer index -> canonical prefix: 0 -> "" (wte, sos, wpe), 1..L -> "blocks.{i-1}.", L+1 -> "" (norm_f,
head). DeepSpeed saves each layer as layer_XX-model_YY-model_states.pt (YY: the TP rank).
"""
from __future__ import annotations

import functools

import torch

from megapix.config import Config, ModelConfig
from megapix.model.igpt import Block, ImageGPT, lm_loss
from megapix.parallel.construct import build_local, structure_only
from megapix.parallel.tensor import VocabParallelLoss, apply_sequence_parallel


def _tp_info(layout):
    """(tp group, tp size, tp rank) of this process."""
    return (layout.tp_group, layout.tp, layout.tp_rank) if layout.tp > 1 else (None, 1, 0)


def _keep_only(layer: ImageGPT, keep: tuple[str, ...], config: ModelConfig, seed: int, tp_info=(None, 1, 0),
               initial=None):
    """torchtitan's pipeline split: from the whole model built on the meta device (no memory, no init), drop
    the pieces this layer does not hold, then build this rank's share of the rest (TP shard, canonical names;
    `initial` as for construct.build_local)."""
    for name in ("wte", "sos", "wpe", "blocks", "norm_f", "head"):
        if name not in keep:
            delattr(layer, name)
    build_local(layer, config, seed, tp_info, initial=initial)


class EmbedLayer(ImageGPT):
    """Pipeline layer 0: the model with only its embedding (wte, sos, wpe); tokens (or (tokens, mask) for BERT)
    -> input embeddings [B, T, d] through the model's own `embed`."""

    def __init__(self, config: ModelConfig, seed: int, initial=None):
        with torch.device("meta"):
            super().__init__(config, seed)
        _keep_only(self, ("wte", "sos", "wpe"), config, seed, initial=initial)

    def forward(self, inputs):
        tokens, mask = inputs if isinstance(inputs, (tuple, list)) else (inputs, None)
        return self.embed(tokens, mask)


class BlockLayer(Block):
    def __init__(self, config: ModelConfig, seed: int, index: int, tp_info=(None, 1, 0), initial=None,
                 sequence_parallel=False):
        with torch.device("meta"):
            super().__init__(config)
        build_local(self, config, seed, tp_info, prefix=f"blocks.{index}.", initial=initial)
        if sequence_parallel:  # stages pass this TP rank's chunk of the positions to each other
            apply_sequence_parallel(self, tp_info[0], prefix=f"blocks.{index}.")


class HeadLayer(ImageGPT):
    """Last layer: the model with only norm_f and its (vocab-parallel under TP) head -> logits [B, T, 512 / TP].
    `extra` ({name: factory}) adds a task's own modules (fine-tuning's classifier), built on the meta device and
    materialised with the rest under canonical names "<name>.*"."""

    def __init__(self, config: ModelConfig, seed: int, tp_info=(None, 1, 0), initial=None, extra=None,
                 sequence_parallel=False):
        with torch.device("meta"):
            super().__init__(config, seed)
            for name, make in (extra or {}).items():
                setattr(self, name, make())
        _keep_only(self, ("norm_f", "head"), config, seed, tp_info, initial)
        if sequence_parallel:
            apply_sequence_parallel(self, tp_info[0])

    def forward(self, h):
        return self.head(self.norm_f(h))


class PipeLoss:
    """loss_fn(outputs, labels) for the last stage; labels are tokens, or (tokens, mask) for BERT."""

    def __init__(self, base):
        self.base = base

    def __call__(self, logits, labels):
        tokens, mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        return self.base(logits, tokens, mask)


@functools.cache
def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class MetaCountedPipelineModule(PipelineModule):
        """DeepSpeed's PipelineModule, except that partition_method="parameters" counts each layer's parameters
        on the meta device: DeepSpeed builds every layer of every stage on every rank to count them
        (`_count_layer_params`), which would draw the whole model's initial weights on each rank."""

        def _count_layer_params(self):
            with structure_only():
                return super()._count_layer_params()

    return MetaCountedPipelineModule


def canonical_prefix(layer_index: int, n_layer: int) -> str:
    return f"blocks.{layer_index - 1}." if 1 <= layer_index <= n_layer else ""


def layer_specs(cfg: Config, layout, head=None, initial=None) -> list:
    """The pipeline's layers as DeepSpeed LayerSpecs (each built only by the stage that holds it); `head` and
    `initial` as for megapix.parallel.build_module."""
    from deepspeed.pipe import LayerSpec

    m, seed = cfg.model, cfg.train.seed
    tp_info = _tp_info(layout)
    sp = layout.sp
    layers = [LayerSpec(EmbedLayer, m, seed, initial)]
    layers += [LayerSpec(BlockLayer, m, seed, i, tp_info, initial, sequence_parallel=sp) for i in range(m.n_layer)]
    layers += [head.pipeline_layer(m, seed, tp_info, initial) if head is not None
               else LayerSpec(HeadLayer, m, seed, tp_info, initial, sequence_parallel=sp)]
    return layers


def build_pipeline(cfg: Config, layout, head=None, initial=None):
    m = cfg.model
    group, tp, tp_rank = _tp_info(layout)
    lm = VocabParallelLoss(group, tp_rank, m.objective == "bert") if tp > 1 else (
        lambda logits, tokens, mask: lm_loss(logits, tokens, mask if m.objective == "bert" else None))
    ckpt = {}
    if cfg.train.activation_checkpointing:
        import deepspeed

        ckpt = dict(activation_checkpoint_interval=1, activation_checkpoint_func=deepspeed.checkpointing.checkpoint,
                    checkpointable_layers=["BlockLayer"])
    loss_fn = PipeLoss(lm) if head is None else head.pipeline_loss(lm)
    return _pipeline_module_class()(layers=layer_specs(cfg, layout, head, initial), topology=layout.topology,
                                    loss_fn=loss_fn, partition_method="parameters", **ckpt)
