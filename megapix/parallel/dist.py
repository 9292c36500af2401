"""torch.distributed helpers that work the same launched or not (a world of one when not initialised).

Every module that needs a barrier, this rank's index or a sum over ranks takes it from here, so none of them
reaches up into the engine for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def all_reduce_sum(values, device=None, group=None) -> list[float]:
    """Sum a list of numbers over the ranks of `group` (all ranks when None), in float64."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if initialized() and world_size() > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


def broadcast_error(error: BaseException | None, src: int = 0) -> None:
    """Raise on every rank if rank `src` failed, so no rank waits in a collective that `src` never joins."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if initialized() and world_size() > 1:
        dist.broadcast_object_list(message, src=src)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank {src} failed: {message[0]}")
