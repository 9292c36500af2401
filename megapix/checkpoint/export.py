"""`megapix export --checkpoint RUN --out DIR`: a checkpoint of any layout -> a consolidated HF ImageGPT directory.

The directory (config.json + model.safetensors, HF ImageGPT layout) loads with `ImageGPT.from_pretrained` and
with transformers' ImageGPTForCausalImageModeling. ZeRO-1/2/3 checkpoints export their fp32 master weights
(through DeepSpeed's universal checkpoint), ZeRO-0 checkpoints their module weights (TP shards merged, pipeline
layer files collected; megapix.checkpoint.consolidate). The run's palette is copied beside it as palette.npy
when there is one, and megapix_export.json marks the directory as an export: only such a directory (or an empty
one) is ever replaced by a later export. Runs on one CPU process; no distributed launch needed.
"""
from __future__ import annotations

import json
import os

from megapix.checkpoint.consolidate import has_masters, state_dict
from megapix.checkpoint.load import checked, is_hf_dir, locate
from megapix.checkpoint.tags import saved_layout, saved_step
from megapix.config import ConfigError
from megapix.data.palette import Palette
from megapix.data.splits import checked_run_palette
from megapix.model.hf import save_state_dict_pretrained
from megapix.runfolder import disk_errors
from megapix.utils import atomic_path, check_output, read_json, read_metrics

MARKER = "megapix_export.json"
EXPORT_FILES = {"config.json", "model.safetensors", "palette.npy", "preprocessor_config.json", "generation_config.json",
                "README.md", "megapix.json", MARKER}


def is_export(path: str) -> bool:
    """A directory a previous `megapix export` wrote, holding nothing else: the only kind export replaces."""
    marker = read_json(os.path.join(path, MARKER))
    return isinstance(marker, dict) and marker.get("megapix_export") == 1 and set(os.listdir(path)) <= EXPORT_FILES


def _last_loss(run: str, step: int) -> float | None:
    """The train loss the run logged at `step` (metrics.jsonl), for the model card; None when not logged."""
    try:
        records = read_metrics(os.path.join(run, "metrics.jsonl"))
    except ConfigError:
        return None  # a damaged log leaves the card without a loss, not the export without a model
    return next((r.get("loss") for r in reversed(records) if isinstance(r, dict) and r.get("step") == step), None)


def export(checkpoint: str, out: str) -> str:
    check_output(out, is_export)  # before any work: never replace a directory that is not an earlier export
    if is_hf_dir(checkpoint):
        return _copy_export(checkpoint, out)
    root, tag = locate(checkpoint)
    cfg = checked(root, tag)
    sd = state_dict(root, tag, cfg)
    run = os.path.dirname(root)
    palette = checked_run_palette(run)  # the run's palette.npy, only when it still matches palette.json
    layout = saved_layout(root, tag) or {}
    card = {"data": cfg.data.source, "steps": saved_step(root, tag), "loss": _last_loss(run, saved_step(root, tag)),
            "layout": ", ".join(f"{k} {v}" for k, v in layout.items()) or None,
            "command": f"megapix export --checkpoint {checkpoint} --out {out}"}
    with disk_errors(out), atomic_path(out, is_export) as tmp:  # a refused write: one line, nothing half-written
        # HF-native: config, weights, generation config, model card, and with the run's palette the
        # preprocessor_config.json that makes ImageGPTImageProcessor give megapix's ids; megapix.json records the
        # data spec so `megapix sample --checkpoint DIR` needs no flags.
        save_state_dict_pretrained(sd, cfg.model, tmp, palette=None if palette is None else Palette.load(palette),
                                   card=card, provenance={"data": cfg.data.source, "checkpoint_tag": tag})
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"megapix_export": 1, "checkpoint": os.path.join(root, tag),
                       "weights": "fp32 masters" if has_masters(os.path.join(root, tag), cfg) else "module"},
                      f, indent=2)
    return tag


def _copy_export(source: str, out: str) -> str:
    """An HF/megapix export directory (a fine-tuning's best_model/, say) is exported as it is: its files copied,
    model.safetensors checked readable, and marked as an export. Returns the source's name."""
    import shutil

    from safetensors import safe_open

    weights = os.path.join(source, "model.safetensors")
    if not os.path.isfile(weights):
        raise ConfigError(f"{source} holds no model.safetensors (only a pickled pytorch_model.bin, which megapix never "
                          "loads from a user's path); save it with safetensors, or pass a megapix checkpoint")
    try:
        with safe_open(weights, "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a torn file
        raise ConfigError(f"{weights} is not a readable safetensors file ({e}); re-export the model") from None
    with disk_errors(out), atomic_path(out, is_export) as tmp:
        os.makedirs(tmp)
        for name in sorted(EXPORT_FILES - {MARKER}):
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"megapix_export": 1, "checkpoint": os.path.abspath(source), "weights": "copied as is"}, f,
                      indent=2)
    return os.path.basename(os.path.abspath(source))


