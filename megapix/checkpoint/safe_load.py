"""Reading checkpoint files without executing anything from them.

Every torch.load of a file from a user path goes through `load` (weights_only=True: torch's restricted unpickler,
which builds only tensors, containers and the classes allow-listed below). DeepSpeed's own loaders call
torch.load(weights_only=False), so before DeepSpeed opens a tag, `check_folder` loads every file of it this way
(mmap: tensor bytes are not read) and refuses the tag with one line if a file is truncated, empty, not a torch
file, or references anything outside the allow-list.

The allow-list is what DeepSpeed 0.19 writes into model_states / optim_states files (measured with
torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0/1/2/3, TP, PP and bf16 checkpoints of megapix runs,
and on the universal checkpoint made from them).
"""
from __future__ import annotations

import os

import torch

from megapix.errors import CheckpointError, ConfigError


def _allowed_globals() -> list:
    """The classes DeepSpeed puts in its checkpoint files. Imported here (not at module top) only because they
    live in DeepSpeed, which costs seconds to import; each is a plain data holder (enum, dataclass, loss scaler)."""
    from deepspeed.checkpoint.universal_checkpoint import SubparamShape
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # optim_states: ZeroStageEnum, LossScaler (DynamicLossScaler with fp16), fragment_address (param_slice_mappings);
    # universal checkpoint: SubparamShape (c_attn's q|k|v split) in zero/<param>/*.pt
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, SubparamShape]


def load(path: str, mmap: bool = False):
    """torch.load(path) with weights_only=True and DeepSpeed's checkpoint classes allowed; one-line errors."""
    try:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{path} is empty (0 bytes)")
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # the unpickler's refusal, a truncated zip, a non-torch file: all mean "do not use"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} references code outside the checkpoint allow-list ({first[:200]}); "
                                  "refusing to load it: it was not written by megapix/DeepSpeed") from None
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint file ({first[:200]})") from None


def checked_files(folder: str) -> list[str]:
    """Every file under `folder` that a loader may torch.load (all but the JSON records megapix writes)."""
    out = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(base, f) for f in sorted(files) if not f.endswith(".json")]
    return out


def check_folder(folder: str) -> None:
    """Load every torch file under `folder` safely (mmap, so tensor bytes stay on disk); raise on the first bad one."""
    for path in checked_files(folder):
        load(path, mmap=True)
