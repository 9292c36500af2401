"""What DeepSpeed's universal loaders need from megapix beyond the conversion, so a layout change carries the fp32
masters, the Adam moments and the step between any ZeRO-1/2/3 layouts, at any TP.

- `tp_restore_meta`: DeepSpeed cuts a TP shard out of a universal tensor for a ZeRO-3 destination only when the
  parameter carries AutoTP's restore record (`ds_autotp_universal_checkpoint_meta`: partition_dim, logical_shape,
  sub_param_sizes; deepspeed/checkpoint/universal_checkpoint.py _resolve_autotp_partition), and it asks
  deepspeed.utils.groups for the TP group, which only AutoTP sets. Both are given for the one load, derived from
  the one TP table (megapix.parallel.tensor), and taken away after it (a save must not see them). ZeRO-1/2 reads
  the same record, so one cut serves both families.
- `bridge_folder`: the converted folder differs by the source's family. A ZeRO-3 source at TP 1 writes bare flat
  tensors (the loaders want {"param": tensor}); a ZeRO-3 source has no per-parameter step.pt (ZeRO-1/2 reads the
  Adam step there; without it bias correction would restart); the optimizer_state.pt of each family lacks what
  the other reads (ZeRO-3: optimizer_state_dict.state[0].step and its param_groups; ZeRO-1/2: ds_version); and
  each family's engine globs its own model-states file name (mp_rank_XX_model_states.pt against
  zero_pp_rank_0_mp_rank_XX_model_states.pt: hard links, same bytes). universal.convert runs it on the
  conversion before renaming it into place; every step is idempotent (a folder made by an older megapix is
  bridged when next resumed) and each file is written under a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil

import torch

from megapix.checkpoint import safe_load
from megapix.checkpoint.names import canonical_name
from megapix.config import ConfigError, ModelConfig
from megapix.model import ImageGPT
from megapix.parallel.tensor import kind_of

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def canonical_shapes(model_cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in ImageGPT(model_cfg).state_dict().items()}


def restore_meta(name: str, shape: torch.Size, d_model: int) -> dict | None:
    """AutoTP's restore record for the canonical parameter `name` of full `shape`, from the TP table (None for a
    replicated parameter: every rank takes the whole tensor). q|k|v are three sub-parameters of d rows, each cut
    evenly by heads, as megapix.parallel.tensor.shard_qkv does."""
    kind = kind_of(name)
    if kind == "replicated":
        return None
    meta = {"partition_dim": 1 if kind == "row" else 0, "logical_shape": tuple(shape)}
    if kind == "qkv":
        meta["sub_param_sizes"] = (d_model,) * 3
    return meta


@contextlib.contextmanager
def tp_restore_meta(module, model_cfg: ModelConfig, tp: int, tp_group, is_pipeline: bool):
    """For the duration of a universal load into `module` (the one DeepSpeed wraps) at this TP size: each TP
    parameter carries its restore record and deepspeed.utils.groups names megapix's TP group."""
    if tp == 1:
        yield
        return
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.utils import groups

    shapes = canonical_shapes(model_cfg)
    marked = []
    for name, p in module.named_parameters():
        key = canonical_name(name, is_pipeline, model_cfg.n_layer)
        meta = restore_meta(key, shapes[key], model_cfg.d_model)
        if meta is not None:
            setattr(p, DS_AUTOTP_UC_META, meta)
            marked.append(p)
    before = groups._TENSOR_MODEL_PARALLEL_GROUP  # read by stage3.load_hp_checkpoint_state only when meta is set
    groups._TENSOR_MODEL_PARALLEL_GROUP = tp_group
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = before
        for p in marked:
            delattr(p, DS_AUTOTP_UC_META)


def _save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _link(src: str, dst: str) -> None:
    """A hard link (no bytes copied), or a copy on a file system without them; renamed into place either way."""
    tmp = dst + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _step(zero: str, opt: dict):
    """The Adam step of the converted checkpoint: ZeRO-3 keeps it in optimizer_state.pt, ZeRO-1/2 per parameter."""
    inner = opt.get("optimizer_state_dict")
    if isinstance(inner, dict) and inner.get("state"):
        return inner["state"][0]["step"]
    for path in sorted(glob.glob(os.path.join(zero, "*", "step.pt"))):
        return safe_load.load(path)
    raise ConfigError(f"{zero} records no Adam step (no step.pt, no optimizer_state_dict); the universal "
                      "checkpoint is incomplete: delete the folder and resume again to convert it anew")


def bridge_folder(folder: str, model_cfg: ModelConfig) -> None:
    """Make the universal checkpoint `folder` loadable by a ZeRO-1/2 and by a ZeRO-3 engine (see the docstring)."""
    import deepspeed

    zero = os.path.join(folder, "zero")
    opt_path = os.path.join(zero, "optimizer_state.pt")
    opt = safe_load.load(opt_path)
    step = _step(zero, opt)
    shapes = canonical_shapes(model_cfg)
    for name in sorted(os.listdir(zero)):
        param_dir = os.path.join(zero, name)
        if not os.path.isdir(param_dir):
            continue
        key = canonical_name(name, not name.startswith("model."), model_cfg.n_layer)
        for state in STATES:
            path = os.path.join(param_dir, f"{state}.pt")
            entry = safe_load.load(path, mmap=True)  # the structure only: no tensor bytes read unless rewritten
            if not isinstance(entry, dict):  # a ZeRO-3 source at TP 1: the flat tensor alone
                _save({"param": entry.reshape(shapes[key])}, path)
        if not os.path.isfile(os.path.join(param_dir, "step.pt")):
            _save(step, os.path.join(param_dir, "step.pt"))
    changed = False
    if "optimizer_state_dict" not in opt:  # what ZeRO-3's restore reads: the step and the hyperparameters
        opt["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": opt["param_groups"]}
        changed = True
    if not opt.get("ds_version"):  # ZeRO-1/2's restore asserts it
        opt["ds_version"] = deepspeed.__version__
        changed = True
    if changed:
        _save(opt, opt_path)
    for path in glob.glob(os.path.join(folder, "*model_states.pt")):
        base = os.path.basename(path)
        match = re.fullmatch(r"(zero_pp_rank_0_)?(mp_rank_\d+)_model_states\.pt", base)
        if match is None:
            continue  # another data-parallel rank's ZeRO-3 file, or a pipeline layer file
        other = os.path.join(folder, f"{match.group(2)}_model_states.pt" if match.group(1)
                             else f"zero_pp_rank_0_{match.group(2)}_model_states.pt")
        if not os.path.exists(other):
            _link(path, other)
