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
With ZeRO-1/2/3 the fp32 master weights are partitioned in the optimizer files, and in bf16 training the module
weights are bf16 copies of them: such checkpoints are read through DeepSpeed's universal checkpoint
(ds_to_universal merges the masters; megapix.checkpoint.universal), so a bf16 run exports its fp32 masters. ZeRO-0
keeps no masters: the module weights are read.
Every file is read with safe_load (weights_only and an allow-list) or checked with it before DeepSpeed's tool
opens it.
"""
from __future__ import annotations

import glob
import os
import re
import tempfile

import torch

from megapix.checkpoint import safe_load
from megapix.checkpoint.names import canonical_name
from megapix.checkpoint.universal import convert, fp32_state_dict
from megapix.config import Config, ConfigError
from megapix.errors import CheckpointError
from megapix.parallel.pipeline import canonical_prefix
from megapix.parallel.tensor import merge_shards, shard_tensor
from megapix.utils import read_record


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v.float() for k, v in sd.items() if not k.startswith("loss_fn")}


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    return safe_load.load(path)


def _merge(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: merge_shards(name, [sd[name] for sd in per_rank]) for name in per_rank[0]}


def state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The plain ImageGPT state dict (fp32) of <root>/<tag>: the fp32 masters where ZeRO kept them (through the
    universal checkpoint), the module weights otherwise."""
    folder = os.path.join(root, tag)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder} does not exist; pass a checkpoint folder with that tag")
    if has_masters(folder, cfg):
        return master_state_dict(root, tag, cfg)
    return module_state_dict(root, tag, cfg)


def zero_stage(folder: str, cfg: Config) -> int:
    """The ZeRO stage the tag was written with: layout.json records the effective one (the config's may be unset
    when the DeepSpeed JSON chose it)."""
    layout = os.path.join(folder, "layout.json")
    if os.path.isfile(layout):
        return int(read_record(layout).get("zero_stage") or 0)
    return cfg.train.zero_stage or 0


def has_masters(folder: str, cfg: Config) -> bool:
    """Whether ZeRO kept fp32 master weights in the tag's optimizer files (ZeRO-1/2/3)."""
    return zero_stage(folder, cfg) > 0 or any("optim_states" in f for f in os.listdir(folder))


def master_state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """fp32 master weights of a ZeRO-1/2/3 checkpoint of any layout, via DeepSpeed's universal conversion: the
    run's <tag>_universal when a resume already made it, else a conversion into a temporary folder (the run
    folder is only read)."""
    safe_load.check_folder(os.path.join(root, tag))  # before ds_to_universal unpickles anything
    made = os.path.join(root, f"{tag}_universal")
    if os.path.isdir(made):
        safe_load.check_folder(made)
        return fp32_state_dict(made, cfg.model)
    with tempfile.TemporaryDirectory(prefix="megapix-universal-") as tmp:
        return fp32_state_dict(convert(root, tag, os.path.join(tmp, "universal")), cfg.model)


def module_state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The module weights DeepSpeed saved (TP shards merged, pipeline layer files collected)."""
    folder = os.path.join(root, tag)
    tp, pp = cfg.train.tensor_parallel, cfg.train.pipeline_parallel
    if pp > 1:
        return _pipeline_state_dict(folder, cfg)
    if zero_stage(folder, cfg) == 3:
        raise CheckpointError(f"{folder} is a ZeRO-3 checkpoint: its weights are only in the ZeRO partitions")
    per_rank = [_strip(_load(os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt"))["module"]) for r in range(tp)]
    return _merge(per_rank) if tp > 1 else per_rank[0]


def _pipeline_state_dict(folder: str, cfg: Config) -> dict[str, torch.Tensor]:
    n_layer, tp = cfg.model.n_layer, cfg.train.tensor_parallel
    out: dict[str, torch.Tensor] = {}
    for idx in range(n_layer + 2):
        files = sorted(glob.glob(os.path.join(folder, f"layer_{idx:02d}-*model_states.pt")))
        if not files:
            raise CheckpointError(f"{folder} has no layer_{idx:02d}-*model_states.pt; the pipeline checkpoint is "
                                  "incomplete")
        by_rank = {}
        for f in files:
            m = re.search(r"model_(\d+)-model_states\.pt$", f)
            by_rank[int(m.group(1)) if m else 0] = f
        if sorted(by_rank) != list(range(tp)):
            raise CheckpointError(f"layer {idx} has TP shards {sorted(by_rank)} but the run used TP {tp}")
        prefix = canonical_prefix(idx, n_layer)
        per_rank = [{prefix + k: v.float() for k, v in safe_load.load(by_rank[r]).items()} for r in range(tp)]
        out.update(_merge(per_rank))
    return out


@torch.no_grad()
def load_into(module: torch.nn.Module, full: dict[str, torch.Tensor], is_pipeline: bool, n_layer: int, tp: int,
              tp_rank: int) -> None:
    """Copy a consolidated state dict into this rank's (TP-sharded, pipeline-local) module parameters."""
    for name, p in module.named_parameters():
        key = canonical_name(name, is_pipeline, n_layer)
        if key not in full:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}; was it written for a different model?")
        shard = shard_tensor(key, full[key], tp, tp_rank)
        if shard.shape != p.shape:
            raise CheckpointError(f"{key}: checkpoint shard {tuple(shard.shape)} does not fit {tuple(p.shape)}")
        p.copy_(shard.to(p.dtype))
