"""DeepSpeed's universal checkpoint for megapix: the `universal_checkpoint_info` client state that
deepspeed/checkpoint/ds_to_universal.py reads to merge TP shards (as Megatron-DeepSpeed publishes it), and the
layout-changing resume through it (convert, rename, load with load_universal).

Patterns are regexes over parameter names, applied with re.match (anchored at the start of the name, so each
begins with ".*"); they match both the non-pipeline names ("model.blocks.3.attn...") and the pipeline layer
names ("4.attn...").

Which layout changes go through it: every change between ZeRO-1, 2 and 3 layouts (any TP x PP x CP x DP, SP on or
off, ZeRO-1/2 <-> ZeRO-3 included): megapix.checkpoint.universal_bridge gives DeepSpeed's loaders what the
conversion leaves out (the TP cut for ZeRO-3 destinations, the other family's file names and fields). A ZeRO-0
checkpoint or run (see unsupported_reason) has no ZeRO optimizer files: it falls back to megapix.checkpoint.reshard,
which keeps weights and schedule but restarts the Adam moments, and only with --reset-optimizer.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil

import torch

from megapix.checkpoint import safe_load
from megapix.checkpoint.names import canonical_name, module_name
from megapix.checkpoint.tags import check_same_model, saved_layout
from megapix.checkpoint.universal_bridge import bridge_folder, tp_restore_meta
from megapix.config import VOCAB_SIZE, Config, ConfigError, ModelConfig
from megapix.model import ImageGPT
from megapix.parallel import dist
from megapix.parallel.layout import Layout
from megapix.parallel.tensor import TP_SPLIT


def universal_checkpoint_info(cfg: Config) -> dict:
    from deepspeed.checkpoint import constants as C  # DeepSpeed costs seconds to import; only savers need it

    d = cfg.model.d_model
    # Derived from the one TP table (megapix.parallel.tensor.TP_SPLIT). ds_to_universal refuses (strict mode) a
    # pattern that matches no parameter: bias patterns only when the model has biases.
    leaves = ("weight", "bias") if cfg.model.bias else ("weight",)

    def pattern(module: str, leaf: str) -> str:  # "model.blocks.3.<m>.<leaf>" and pipeline "4.<m>.<leaf>"
        return r"(.*\.)?" + re.escape(f"{module}.{leaf}") + "$"

    by_kind: dict[str, list[str]] = {}
    for module, kind in TP_SPLIT:
        for leaf in leaves:
            if kind == "vocab" and leaf == "bias":
                continue  # the 512-way head never has a bias (the original's), whatever model.bias says
            by_kind.setdefault("replicated" if kind == "row" and leaf == "bias" else kind, []).append(
                pattern(module, leaf))
    replicated = [pattern(m, "weight") for m in ("norm_1", "norm_2", "norm_f", "wte", "wpe")] + [r"(.*\.)?sos$"]
    info = {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2,
        C.ORIGINAL_VOCAB_SIZE: VOCAB_SIZE,
        C.PADDED_VOCAB_SIZE: VOCAB_SIZE,
        C.TP_REPLICATED_PARAMETER_PATTERNS: replicated + by_kind.get("replicated", []),
        C.PARAMETER_TO_AVERAGE_PATTERNS: [],
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: by_kind["row"],
        # column-parallel tensors are DeepSpeed's default (dim 0); the head is its vocabulary parameter
        C.VOCABULARY_PARAMETER_PATTERNS: by_kind["vocab"],
        # c_attn is [q | k | v] along dim 0, each TP-sliced by heads: three sub-parameters of d rows.
        C.PARAMETER_WITH_SUB_PARAMS: [{"patterns": by_kind["qkv"], "shape": [(d, d, d), -1], "partition_dim": 0}],
    }
    return {C.UNIVERSAL_CHECKPOINT_INFO: info}


def unsupported_reason(saved: dict, zero_stage: int) -> str | None:
    """Why DeepSpeed's universal checkpoint cannot carry `saved` (a layout.json record) into a run with this ZeRO
    stage, or None when it can (each case below was run with megapix checkpoints, DeepSpeed 0.19.8).
    - ZeRO-0 source: ds_to_universal reads ZeRO's partitioned fp32 masters and moments; ZeRO-0 has none.
    - ZeRO-0 destination: load_universal is implemented by the ZeRO optimizers."""
    if saved.get("zero_stage") == 0:
        return "the checkpoint was written with ZeRO-0; the conversion needs ZeRO's partitioned optimizer files"
    if zero_stage == 0:
        return "this run uses ZeRO-0; loading a universal checkpoint needs a ZeRO optimizer"
    return None


def convert(ckpt_dir: str, tag: str, out: str | None = None, model_cfg: ModelConfig | None = None) -> str:
    """Run DeepSpeed's ds_to_universal on <ckpt_dir>/<tag> into `out` (default: the sibling <tag>_universal, made
    once and reused). Call on one rank, after safe_load has checked the tag: the tool unpickles with
    weights_only=False. A folder made earlier is checked the same way before it is reused. It writes to <out>.tmp
    and renames, so a crash never leaves a half folder that a later resume would trust; with `model_cfg` the folder
    is bridged for both ZeRO families (universal_bridge) before the rename. One worker each: forking a process pool
    inside a distributed job is not safe."""
    from deepspeed.checkpoint import ds_to_universal

    default = out is None
    out = out or os.path.join(ckpt_dir, f"{tag}_universal")
    if os.path.isdir(out):
        safe_load.check_folder(out)
        return out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp,
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=False))
    if model_cfg is not None:
        bridge_folder(tmp, model_cfg)
    os.replace(tmp, out)
    if default:  # the tool pointed it at the .tmp name
        with open(os.path.join(ckpt_dir, "latest_universal"), "w") as f:
            f.write(os.path.basename(out))
    return out


def rename_params(folder: str, is_pipeline: bool, n_layer: int) -> None:
    """Rename <folder>/zero/<param> to the parameter names of the module about to load it. DeepSpeed names each
    parameter folder after the *saving* module (ZeRO's param_names): "model.blocks.0.attn.c_attn.weight" without
    a pipeline, "1.attn.c_attn.weight" with one (layer index first), and the loader looks the *loading* module's
    names up. Both map to the canonical ImageGPT name, so a pipeline <-> no-pipeline change is a rename."""
    zero = os.path.join(folder, "zero")
    for name in os.listdir(zero):
        if not os.path.isdir(os.path.join(zero, name)):
            continue  # optimizer_state.pt
        saved_by_pipeline = not name.startswith("model.")
        target = module_name(canonical_name(name, saved_by_pipeline, n_layer), is_pipeline, n_layer)
        if target != name:
            os.rename(os.path.join(zero, name), os.path.join(zero, target))


def fp32_state_dict(folder: str, model_cfg: ModelConfig) -> dict:
    """The canonical ImageGPT state dict from a universal checkpoint folder: zero/<param>/fp32.pt holds each
    parameter's fp32 master, TP shards already merged by ds_to_universal (flattened for a ZeRO-3 source: reshaped
    here to the model's shapes)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ImageGPT(model_cfg).state_dict().items()}
    zero = os.path.join(folder, "zero")
    out = {}
    for name in sorted(os.listdir(zero)):
        if not os.path.isdir(os.path.join(zero, name)):
            continue  # optimizer_state.pt
        path = os.path.join(zero, name, "fp32.pt")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing; the universal checkpoint {folder} is incomplete")
        entry = safe_load.load(path)
        tensor = entry["param"] if isinstance(entry, dict) else entry
        key = canonical_name(name, not name.startswith("model."), model_cfg.n_layer)
        if key not in shapes or tensor.numel() != shapes[key].numel():
            raise ConfigError(f"{path}: {tuple(tensor.shape)} does not fit the model's {key} "
                              f"{tuple(shapes[key]) if key in shapes else '(no such parameter)'}")
        out[key] = tensor.float().reshape(shapes[key])
    return out


def resume_universal(engine, ckpt_dir: str, tag: str, cfg: Config, layout: Layout, is_pipeline: bool) -> int:
    """Resume <tag> in this (different) layout through DeepSpeed's universal checkpoint: rank 0 converts (once)
    and renames the parameter folders for this module, then every rank loads with load_universal. fp32 masters,
    Adam moments and step, the lr schedule and the client state all carry over."""
    check_same_model(ckpt_dir, tag, cfg)
    error = None
    if dist.is_rank0():
        try:
            folder = convert(ckpt_dir, tag, model_cfg=cfg.model)
            rename_params(folder, is_pipeline, cfg.model.n_layer)
            bridge_folder(folder, cfg.model)  # a no-op unless an older megapix made the folder
        except Exception as e:  # every rank must hear of it, or the others wait in the barrier forever
            error = e
    dist.broadcast_error(error)
    dist.barrier()
    # DeepSpeed reads "checkpoint": {"load_universal": true} only inside load_checkpoint, so it is switched on for
    # this one load (a config flag would also send every later same-layout resume to latest_universal).
    ds_cfg = engine._config
    ds_cfg.load_universal_checkpoint = True
    try:
        with tp_restore_meta(engine.module, cfg.model, layout.tp, layout.tp_group, is_pipeline):
            path, client = engine.load_checkpoint(ckpt_dir, tag=f"{tag}_universal")
    finally:
        ds_cfg.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {tag}_universal")
    step = int(client["step"])
    if dist.is_rank0():
        print(f"megapix: resumed {tag} written as {saved_layout(ckpt_dir, tag)} in "
              f"{layout.describe(batch=False, world=True)} through DeepSpeed's universal checkpoint "
              f"({tag}_universal): weights, Adam moments and schedule at step {step}",
              flush=True)
    return step
