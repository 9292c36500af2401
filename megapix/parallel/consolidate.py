"""Consolidate a DeepSpeed checkpoint of any layout into the plain ImageGPT state dict (fp32)."""
from __future__ import annotations

import os

import torch

from megapix.config import Config, ConfigError


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v.float() for k, v in sd.items() if not k.startswith("loss_fn")}


def state_dict(root: str, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    t = cfg.train
    folder = os.path.join(root, tag)
    if t.tensor_parallel == 1 and t.pipeline_parallel == 1:
        zero_files = [f for f in os.listdir(folder) if "optim_states" in f]
        if (t.zero_stage or 0) > 0 or zero_files:
            # ZeRO partitions the fp32 master weights across data-parallel ranks; DeepSpeed's tool gathers them.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return _strip(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
        path = os.path.join(folder, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing; the checkpoint {tag} is incomplete")
        return _strip(torch.load(path, map_location="cpu", weights_only=True)["module"])
    raise ConfigError(f"consolidating a TP {t.tensor_parallel} x PP {t.pipeline_parallel} checkpoint needs "
                      "megapix.parallel's layout-aware reader")
