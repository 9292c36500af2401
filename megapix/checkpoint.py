"""Find and read megapix checkpoints: a training --out folder, its checkpoints/ folder, one tag folder,
or an HF/megapix export directory. Everything here returns a plain, single-rank ImageGPT."""
from __future__ import annotations

import json
import os

import torch

from megapix.config import Config, ConfigError


def locate(path: str) -> tuple[str, str]:
    """(checkpoint root holding `latest`, tag) for an --out folder, a checkpoints/ folder or a tag folder."""
    path = os.path.abspath(path)
    for root in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(root, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                return root, f.read().strip()
    if os.path.isfile(os.path.join(path, "megapix_config.json")):
        return os.path.dirname(path), os.path.basename(path)
    raise ConfigError(f"{path} holds no megapix checkpoint (no checkpoints/latest, latest, or megapix_config.json); "
                      "pass a training --out folder, a checkpoint tag folder, or an export directory")


def read_config(root: str, tag: str) -> Config:
    cfg_path = os.path.join(root, tag, "megapix_config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{cfg_path} is missing; the checkpoint {tag} is incomplete")
    with open(cfg_path) as f:
        return Config.from_dict(json.load(f), where=cfg_path)


def consolidated_state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The plain ImageGPT state dict (fp32) from a DeepSpeed checkpoint of any layout."""
    from megapix.parallel import consolidate

    return consolidate.state_dict(root, tag, cfg)


def load_model(path: str):
    """An ImageGPT from an export directory (config.json) or a megapix DeepSpeed checkpoint."""
    from megapix.model import ImageGPT

    if os.path.isfile(os.path.join(path, "config.json")):
        return ImageGPT.from_pretrained(path), None
    root, tag = locate(path)
    cfg = read_config(root, tag)
    with torch.device("meta"):
        model = ImageGPT(cfg.model)
    model.load_state_dict(consolidated_state_dict(root, tag, cfg), assign=True, strict=True)
    return model.float(), cfg


def load_model_and_palette(path: str, palette: str | None = None, data: str | None = None):
    """(model, palette or None, data spec) for sampling/extraction. The palette defaults to the run's
    palette.npy (next to checkpoints/) and the data to the run's source."""
    from megapix.data.palette import Palette

    model, cfg = load_model(path)
    if palette is None:
        candidates = [os.path.join(path, "palette.npy")]
        if cfg is not None:
            root, _ = locate(path)
            candidates += [os.path.join(os.path.dirname(root), "palette.npy")]
            if cfg.data.palette:
                candidates.append(cfg.data.palette)
        palette = next((c for c in candidates if os.path.isfile(c)), None)
    data = data or (cfg.data.source if cfg is not None else None)
    if data is None:
        raise ConfigError("no data source known for this model; pass --data")
    return model, (Palette.load(palette) if palette else None), data
