"""What is in <out>/checkpoints: the tags, which one `latest` names, its step and layout, and whether a tag is
complete (every file present and readable). Reading only; saving and resuming are in store.py."""
from __future__ import annotations

import dataclasses
import os
import re
import zipfile

from megapix.checkpoint import safe_load
from megapix.config import PRESETS, Config, ConfigError
from megapix.parallel.layout import Layout
from megapix.utils import read_record

TAG = re.compile(r"global_step(\d+)")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def read_latest(ckpt_dir: str) -> str | None:
    """The tag `latest` names, or None when there is no (or an empty) `latest`."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        tag = f.read().strip()
    return tag or None


def layout_record(layout: Layout, step: int) -> dict:
    return {"step": step, "world": layout.world, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
            "zero_stage": layout.zero_stage}


def tags(ckpt_dir: str) -> list[str]:
    """The global_step<N> folders in ckpt_dir, by step."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
             if (m := TAG.fullmatch(name)) and os.path.isdir(os.path.join(ckpt_dir, name))]
    return [name for _, name in sorted(found)]


def _expected_files(rec: dict) -> list[str]:
    """Model-state files DeepSpeed must have written for the layout in layout.json (the optimizer files vary by
    ZeRO stage and are checked by loading whatever is there)."""
    tp, pp = int(rec.get("tp", 1)), int(rec.get("pp", 1))
    if pp > 1:
        return [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp * pp)]
    if int(rec.get("zero_stage", 0)) == 3:
        return [f"zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt" for r in range(tp) for d in range(int(rec["dp"]))]
    return [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]


def problem(ckpt_dir: str, tag: str, deep: bool = False) -> str | None:
    """Why <ckpt_dir>/<tag> is not a complete checkpoint, or None. The quick check reads the JSON records and the
    zip directory of every file; deep=True also unpickles each file with the allow-list (safe_load)."""
    folder = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(folder):
        return f"{folder} does not exist"
    try:
        rec = read_record(os.path.join(folder, "layout.json"))
        read_record(os.path.join(folder, "megapix_config.json"))
        for name in _expected_files(rec):
            if not os.path.isfile(os.path.join(folder, name)):
                return f"{os.path.join(folder, name)} is missing"
        files = safe_load.checked_files(folder)
        if not files:
            return f"{folder} holds no model or optimizer state files"
        for path in files:
            if deep:
                safe_load.load(path, mmap=True)
            elif os.path.getsize(path) == 0:
                return f"{path} is empty (0 bytes)"
            elif not zipfile.is_zipfile(path):
                return f"{path} is truncated or not a torch checkpoint file"
    except ConfigError as e:
        return str(e)
    return None


def complete_tags(ckpt_dir: str) -> list[str]:
    return [t for t in tags(ckpt_dir) if problem(ckpt_dir, t) is None]


def resume_hint(ckpt_dir: str, bad: str | None, load: bool = False) -> str:
    """Where to go from a bad tag: the newest complete one (and how to use it), and the list of complete tags."""
    good = [t for t in complete_tags(ckpt_dir) if t != bad]
    if not good:
        return f"no complete checkpoint remains in {ckpt_dir}"
    if load:
        how = f"pass {os.path.join(ckpt_dir, good[-1])} to use it"
    else:
        how = f"write '{good[-1]}' into {os.path.join(ckpt_dir, 'latest')} to resume from it"
    return f"the newest complete tag is {good[-1]}: {how} (complete tags: {', '.join(good)})"


def latest_step(ckpt_dir: str) -> int | None:
    """The step of the checkpoint a --resume would continue from: `latest`'s tag, or, when `latest` is missing or
    names nothing, the newest global_step<N> folder (a run is there even if `latest` was deleted). None: no
    checkpoint at all."""
    tag = read_latest(ckpt_dir)
    if tag is not None and os.path.isdir(os.path.join(ckpt_dir, tag)):
        try:
            return saved_step(ckpt_dir, tag)
        except ConfigError:  # a torn layout.json: the run is there; the resume's own check names the good tags
            m = TAG.fullmatch(tag)
            if m:
                return int(m.group(1))
            raise
    found = tags(ckpt_dir)
    return int(TAG.fullmatch(found[-1]).group(1)) if found else None


def saved_step(ckpt_dir: str, tag: str) -> int:
    path = os.path.join(ckpt_dir, tag, "layout.json")
    if os.path.isfile(path):
        step = read_record(path).get("step")
        if isinstance(step, int):
            return step
    m = TAG.fullmatch(tag)
    if not m:
        raise ConfigError(f"cannot tell the step of checkpoint {tag} ({path} has no step)")
    return int(m.group(1))


def saved_layout(ckpt_dir: str, tag: str) -> dict | None:
    path = os.path.join(ckpt_dir, tag, "layout.json")
    if not os.path.isfile(path):
        return None
    rec = read_record(path)
    rec.pop("step", None)
    return rec


def read_config(root: str, tag: str) -> Config:
    cfg_path = os.path.join(root, tag, "megapix_config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{cfg_path} is missing; the checkpoint {tag} is incomplete")
    return Config.from_dict(read_record(cfg_path), where=cfg_path)


def describe_model(m) -> str:
    """'preset tiny (4 layers, d 128, 4 heads, 8x8, ar)' or 'a custom model (...)', for messages."""
    shape = f"{m.n_layer} layers, d {m.d_model}, {m.n_head} heads, {m.resolution}x{m.resolution}, {m.objective}"
    preset = next((name for name, p in PRESETS.items() if all(getattr(m, k) == v for k, v in p.items())), None)
    return f"preset {preset} ({shape})" if preset else f"a custom model ({shape})"


def check_same_model(ckpt_dir: str, tag: str, cfg: Config) -> Config:
    """The checkpoint's Config, after checking it was written for this run's model (the kernels setting is an
    implementation choice, not part of the model: a run may resume with other kernels)."""
    saved_cfg = read_config(ckpt_dir, tag)
    if dataclasses.replace(saved_cfg.model, kernels=cfg.model.kernels) != cfg.model:
        raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} was written for {describe_model(saved_cfg.model)}"
                          f", but this run builds {describe_model(cfg.model)}; resume with the --model (and model "
                          "settings) that wrote it")
    return saved_cfg
