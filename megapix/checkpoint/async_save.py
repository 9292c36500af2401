"""--async-save: DeepSpeed writes a checkpoint's files from a background thread while training goes on.

DeepSpeed 0.19 ships three checkpoint engines besides torch's: FastCheckpointEngine and the decoupled one (it runs
FastCheckpointEngine in a subprocess) need DeepNVMe's async_io op, which needs libaio and builds only where the
accelerator has pinned-memory I/O; DataStates needs the `datastates` package. None builds on a CPU machine, and the
decoupled engine publishes `latest` itself at the next save. So megapix plugs its own engine into DeepSpeed's
interface (CheckpointEngine: create / save / commit): `save` snapshots each state dict to host memory on the
training thread (copy_into: a GPU tensor is copied to pinned host memory, a CPU one cloned, so later optimizer
steps cannot change what is written; from the second save on, into the previous save's buffers), and `commit`
hands the tag's files to one writer thread (at CPU niceness 19) that torch.saves and fsyncs each file and its
folder. DeepSpeed's file names and formats are unchanged: resume, the universal conversion and every reader see the
same tag.

Publishing (megapix records, rename, `latest`) is not here: checkpoint.manager does it once every rank's writer
has finished, agreed by a small all-reduce at a step boundary (store.publish). The host copy costs the size of
this rank's files in host memory, kept from the first save on for the next; one save at a time (a new save
waits for the last).
"""
from __future__ import annotations

import os
import threading
import time

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from megapix.utils import lower_this_threads_priority


def write_file(state, path: str, zipfile: bool) -> int:
    """torch.save `state` to `path`, flushed and fsynced; returns the bytes written."""
    with open(path, "wb") as f:
        torch.save(state, f, _use_new_zipfile_serialization=zipfile)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The writer thread's CPU niceness: 19 lets it take only the CPU time training leaves idle, so on a machine whose
# cores training fills the write stretches out instead of slowing the steps (measured in bench_async_save.py).
WRITER_NICE = 19


class WriteJob:
    """One tag's files on this rank, written by a daemon thread (a crash of the run never waits for it: the tag
    stays a staging folder, never published). `error` holds the exception that stopped it."""

    def __init__(self, files: list[tuple[object, str]], zipfile: bool):
        self.files, self.zipfile = files, zipfile
        self.host_bytes = sum(_tensor_bytes(state) for state, _ in files)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.started = time.monotonic()
        self.seconds: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megapix-checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            lower_this_threads_priority(WRITER_NICE)
            folders = set()
            while self.files:
                state, path = self.files.pop(0)  # each snapshot is freed as soon as it is on disk
                self.bytes_written += write_file(state, path, self.zipfile)
                del state
                folders.add(os.path.dirname(path))
            for folder in folders:
                _fsync_dir(folder)
        except BaseException as e:  # reported on the training thread at the next step boundary
            self.error = e
            self.files.clear()
        finally:
            self.seconds = time.monotonic() - self.started
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()


def copy_into(cache, item):
    """A host copy of `item` (tensors nested in dicts, lists, tuples), written into `cache`'s tensors where shape
    and dtype match (the previous save's copy of the same file), else newly allocated (pinned from a GPU)."""
    if torch.is_tensor(item):
        item = item.detach()
        if torch.is_tensor(cache) and cache.shape == item.shape and cache.dtype == item.dtype:
            return cache.copy_(item)
        if item.device.type == "cpu":
            return item.clone()
        return torch.empty(item.shape, dtype=item.dtype, pin_memory=True).copy_(item)
    if isinstance(item, dict):
        cache = cache if isinstance(cache, dict) else {}
        return {k: copy_into(cache.get(k), v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        cache = cache if isinstance(cache, (list, tuple)) and len(cache) == len(item) else [None] * len(item)
        copied = [copy_into(c, v) for c, v in zip(cache, item)]
        if isinstance(item, list):
            return copied
        return type(item)(*copied) if hasattr(item, "_fields") else tuple(copied)  # a namedtuple, or a tuple
    return item


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class AsyncCheckpointEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine interface with the writes in the background (see the module docstring).
    Loading goes to the engine it replaced (torch's)."""

    def __init__(self, base: CheckpointEngine):
        super().__init__()
        self.name = "MegapixAsyncCheckpointEngine"
        self.base = base
        self.zipfile = bool(getattr(base, "zipfile_serialization", True))
        self.files: list[tuple[object, str]] = []
        self.job: WriteJob | None = None
        # the last save's host copies by file name: the next save copies into them (no allocation, no page faults;
        # safe because a save starts only after the previous one's writer has finished)
        self.buffers: dict[str, object] = {}

    def create(self, info: CheckpointCommitInfo):
        self.files = []

    def save(self, state_dict, path: str):
        name = os.path.basename(path)
        snapshot = copy_into(self.buffers.get(name), state_dict)
        self.buffers[name] = snapshot
        self.files.append((snapshot, path))

    def commit(self, info: CheckpointCommitInfo):
        self.job, self.files = WriteJob(self.files, self.zipfile), []
        return True

    def load(self, path: str, map_location=None):
        return self.base.load(path, map_location=map_location)

    def preserves_storage_sharing(self):
        return False  # save() copies every tensor itself: DeepSpeed need not clone first

    def take_job(self) -> WriteJob:
        """The job the last save_checkpoint started (one per tag)."""
        job, self.job = self.job, None
        if job is None:
            raise RuntimeError("DeepSpeed's save_checkpoint returned without committing the checkpoint")
        return job


def install(engine) -> AsyncCheckpointEngine:
    """Make `engine` (a DeepSpeedEngine) write its checkpoints in the background; idempotent."""
    if not isinstance(engine.checkpoint_engine, AsyncCheckpointEngine):
        engine.checkpoint_engine = AsyncCheckpointEngine(engine.checkpoint_engine)
    return engine.checkpoint_engine
