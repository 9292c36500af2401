"""Find and read megapix checkpoints: a training --out folder, its checkpoints/ folder, one tag folder,
or an HF/megapix export directory. Everything here returns a plain, single-rank ImageGPT."""
from __future__ import annotations

import os

import torch

from megapix.checkpoint.consolidate import state_dict
from megapix.checkpoint.tags import problem, read_config, read_latest, resume_hint
from megapix.config import Config, ConfigError
from megapix.errors import CheckpointError
from megapix.data.palette import Palette
from megapix.data.splits import checked_run_palette
from megapix.model import ImageGPT
from megapix.model.hf import read_provenance


def locate(path: str) -> tuple[str, str]:
    """(checkpoint root holding `latest`, tag) for an --out folder, a checkpoints/ folder or a tag folder."""
    path = os.path.abspath(path)
    for root in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            tag = read_latest(root)
            if tag is None:
                raise CheckpointError(f"{latest} is empty; {resume_hint(root, None, load=True)}")
            if not os.path.isdir(os.path.join(root, tag)):
                raise CheckpointError(f"{latest} names {tag!r}, which does not exist; "
                                      f"{resume_hint(root, tag, load=True)}")
            return root, tag
    if os.path.isfile(os.path.join(path, "megapix_config.json")):
        return os.path.dirname(path), os.path.basename(path)
    raise CheckpointError(f"{path} holds no megapix checkpoint (no checkpoints/latest, latest, or "
                          "megapix_config.json); pass a training --out folder, a checkpoint tag folder, or an export "
                          "directory")


def checked(root: str, tag: str) -> Config:
    """The tag's Config, after checking every file of the tag is complete and loads under the allow-list."""
    why = problem(root, tag, deep=True)
    if why is not None:
        raise CheckpointError(f"cannot read checkpoint {tag}: {why}; {resume_hint(root, tag, load=True)}")
    return read_config(root, tag)


def consolidated_state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The plain ImageGPT state dict (fp32) from a DeepSpeed checkpoint of any layout (fp32 masters where ZeRO
    kept them)."""
    return state_dict(root, tag, cfg)


def is_hf_dir(path: str) -> bool:
    """An HF ImageGPT directory or a megapix export: config.json beside the weights."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, w)) for w in ("model.safetensors", "pytorch_model.bin"))


def load_model(path: str):
    """An ImageGPT from an export directory (config.json + weights) or a megapix DeepSpeed checkpoint. A training
    --out folder also holds a config.json (the run record), so weights decide which it is."""
    if is_hf_dir(path):
        return ImageGPT.from_pretrained(path), None
    root, tag = locate(path)
    cfg = checked(root, tag)
    with torch.device("meta"):
        model = ImageGPT(cfg.model)
    model.load_state_dict(consolidated_state_dict(root, tag, cfg), assign=True, strict=True)
    return model.float(), cfg


def load_model_and_palette(path: str, palette: str | None = None, data: str | None = None):
    """(model, palette or None, data spec) for sampling/extraction. The palette defaults to the run's
    palette.npy (next to checkpoints/) and the data to the run's source."""
    model, cfg = load_model(path)
    provenance = read_provenance(path) if cfg is None else None  # an export records its data spec
    if palette is None:
        candidates = [] if cfg is not None else [os.path.join(path, "palette.npy")]  # an export's own copy
        if cfg is not None:
            root, _ = locate(path)
            # the run's palette, checked against its record palette.json (a swapped file is refused)
            candidates.append(checked_run_palette(os.path.dirname(root)))
            if cfg.data.palette:
                candidates.append(cfg.data.palette)
        palette = next((c for c in candidates if c is not None and os.path.isfile(c)), None)
    data = data or (cfg.data.source if cfg is not None else (provenance or {}).get("data"))
    if data is None:
        raise ConfigError("no data source known for this model; pass --data")
    return model, (Palette.load(palette) if palette else None), data
