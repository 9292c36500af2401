"""Consolidate a DeepSpeed checkpoint of any layout into the plain ImageGPT state dict (fp32), and cut a
consolidated state dict into the shards of another layout.

Files DeepSpeed writes per layout:
- no pipeline: mp_rank_{tp:02d}_model_states.pt, ["module"] keyed "model.<canonical name>" (TP-sharded
  tensors on TP > 1); with ZeRO, the fp32 master weights are in *_optim_states.pt (read by DeepSpeed's
  zero_to_fp32 for TP 1).
- pipeline: layer_{i:02d}-model_{tp:02d}-model_states.pt, one per pipeline layer and TP rank, keyed by the
  layer's own names; layer 0 is the embedding, 1..L the blocks, L+1 norm_f + head.
TP shards are concatenated in TP-rank order (column/vocab: dim 0, row: dim 1, c_attn: q, k and v reassembled
from every rank's q_r | k_r | v_r); replicated tensors are taken from TP rank 0.
With TP or PP and ZeRO-1 in bf16 training the module weights in these files are bf16 (the fp32 masters are
partitioned in the ZeRO files); we read the module weights then. fp32 training (CPU) is exact.
"""
from __future__ import annotations

import glob
import os
import re

import torch

from megapix.config import Config, ConfigError


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v.float() for k, v in sd.items() if not k.startswith("loss_fn")}


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing; the checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=False)


def _merge(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from megapix.parallel.tensor import merge_shards

    return {name: merge_shards(name, [sd[name] for sd in per_rank]) for name in per_rank[0]}


def state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    t = cfg.train
    folder = os.path.join(root, tag)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder} does not exist; pass a checkpoint folder with that tag")
    tp, pp = t.tensor_parallel, t.pipeline_parallel
    if pp > 1:
        return _pipeline_state_dict(folder, cfg)
    if tp == 1:
        zero_files = [f for f in os.listdir(folder) if "optim_states" in f]
        if (t.zero_stage or 0) > 0 or zero_files:
            # ZeRO partitions the fp32 master weights across data-parallel ranks; DeepSpeed's tool gathers them.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return _strip(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
        return _strip(_load(os.path.join(folder, "mp_rank_00_model_states.pt"))["module"])
    per_rank = [_strip(_load(os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt"))["module"]) for r in range(tp)]
    return _merge(per_rank)


def _pipeline_state_dict(folder: str, cfg: Config) -> dict[str, torch.Tensor]:
    from megapix.parallel.pipeline import canonical_prefix

    n_layer, tp = cfg.model.n_layer, cfg.train.tensor_parallel
    out: dict[str, torch.Tensor] = {}
    for idx in range(n_layer + 2):
        files = sorted(glob.glob(os.path.join(folder, f"layer_{idx:02d}-*model_states.pt")))
        if not files:
            raise ConfigError(f"{folder} has no layer_{idx:02d}-*model_states.pt; the pipeline checkpoint is "
                              "incomplete")
        by_rank = {}
        for f in files:
            m = re.search(r"model_(\d+)-model_states\.pt$", f)
            by_rank[int(m.group(1)) if m else 0] = f
        if sorted(by_rank) != list(range(tp)):
            raise ConfigError(f"layer {idx} has TP shards {sorted(by_rank)} but the run used TP {tp}")
        prefix = canonical_prefix(idx, n_layer)
        per_rank = [{prefix + k: v.float() for k, v in torch.load(by_rank[r], map_location="cpu",
                                                                  weights_only=True).items()}
                    for r in range(tp)]
        out.update(_merge(per_rank))
    return out


def canonical_name(module_name: str, is_pipeline: bool, n_layer: int) -> str:
    """The canonical ImageGPT name of a parameter of the module DeepSpeed wraps."""
    if not is_pipeline:
        return module_name.removeprefix("model.")
    from megapix.parallel.pipeline import canonical_prefix

    idx, rest = module_name.split(".", 1)
    return canonical_prefix(int(idx), n_layer) + rest


@torch.no_grad()
def load_into(module: torch.nn.Module, full: dict[str, torch.Tensor], is_pipeline: bool, n_layer: int, tp: int,
              tp_rank: int) -> None:
    """Copy a consolidated state dict into this rank's (TP-sharded, pipeline-local) module parameters."""
    from megapix.parallel.tensor import shard_tensor

    for name, p in module.named_parameters():
        key = canonical_name(name, is_pipeline, n_layer)
        if key not in full:
            raise ConfigError(f"the checkpoint has no tensor {key!r}; was it written for a different model?")
        shard = shard_tensor(key, full[key], tp, tp_rank)
        if shard.shape != p.shape:
            raise ConfigError(f"{key}: checkpoint shard {tuple(shard.shape)} does not fit {tuple(p.shape)}")
        p.copy_(shard.to(p.dtype))


def module_name(canonical: str, is_pipeline: bool, n_layer: int) -> str:
    """Inverse of canonical_name: the name of a canonical ImageGPT parameter in the module DeepSpeed wraps
    (LossModel: "model.<name>"; PipelineModule: "<layer index>.<name within the layer>")."""
    if not is_pipeline:
        return "model." + canonical
    if canonical.startswith("blocks."):
        _, index, rest = canonical.split(".", 2)
        return f"{int(index) + 1}.{rest}"
    first = canonical.split(".", 1)[0]
    return f"0.{canonical}" if first in ("wte", "wpe", "sos") else f"{n_layer + 1}.{canonical}"
