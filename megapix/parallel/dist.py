"""torch.distributed helpers that work the same launched or not (a world of one when not initialised).

Every module that needs a barrier, this rank's index, or one rank's decision shared by all (`rank0_decides`,
`from_rank0`, `shared_error`) takes it from here, so none of them reaches up into the engine for it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megapix.config import ConfigError


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


class World:
    """This process's rank and world for a command that is not the trainer (extract, the attentive probe):
    torch.distributed when a launcher started this process (the group is started here if nobody has), a world of
    one otherwise. close() ends a group started here."""

    def __init__(self):
        from megapix.parallel.launch import init_distributed, launched

        self.dist = dist
        self.started = launched() and not dist.is_initialized()
        if self.started:
            init_distributed()
        self.on = initialized()
        self.rank, self.world = rank(), world_size()

    def barrier(self) -> None:
        if self.on and self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started:
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where a collective's tensors live: NCCL needs this rank's GPU, gloo the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_rank0(value):
    """Rank 0's `value` on every rank (rank 0 decides what the filesystem says, so no two ranks act differently)."""
    box = [value]
    if initialized() and world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_decides(fn):
    """fn() on rank 0, its result on every rank: the one way megapix has one rank decide. A ConfigError there is
    raised on every rank with the same one-line message (every rank exits 2, none waits in a collective); any
    other failure stops every rank too (rank 0 re-raises it, the others raise a RuntimeError naming it)."""
    result, error, failure = None, None, None
    if is_rank0():
        try:
            result = fn()
        except ConfigError as e:
            error = str(e)
        except Exception as e:  # every rank must hear of it, or the others wait in their next collective forever
            failure = e
    box = from_rank0((error, None if failure is None else f"{type(failure).__name__}: {failure}", result))
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise ConfigError(box[0])
    if box[1] is not None:
        raise RuntimeError(f"rank 0 failed: {box[1]}")
    return box[2]


def shared_error(error: ConfigError | None) -> ConfigError | None:
    """Every rank's view of a ConfigError that any rank may have hit (a corrupt image in its share, a bad
    path): the lowest failing rank's error on every rank, else None. One small all-reduce when no rank failed."""
    if not initialized() or world_size() == 1:
        return error
    flag = torch.tensor([0.0 if error is None else 1.0], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return None
    messages = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    return ConfigError(next(m for m in messages if m is not None))


def broadcast_error(error: BaseException | None, src: int = 0) -> None:
    """Raise on every rank if rank `src` failed, so no rank waits in a collective that `src` never joins."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if initialized() and world_size() > 1:
        dist.broadcast_object_list(message, src=src)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank {src} failed: {message[0]}")
