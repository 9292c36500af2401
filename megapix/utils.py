"""Small shared helpers: atomic file/directory writes that never replace what the writer did not make."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading

from megapix.errors import ConfigError


def check_output(path: str, replace=None) -> None:
    """Refuse (ConfigError) an output path that holds something the writer may not replace: an existing directory
    is replaced only when it is empty or `replace(path)` says it is an earlier output of the same writer (a marked
    export, say); an existing file may be replaced by a new version of it. Also refuses a parent that is a file."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ConfigError(f"cannot write {path}: {probe} is a file, not a directory; choose another output path")
    if os.path.isdir(path) and not os.path.islink(path) and os.listdir(path) and not (replace and replace(path)):
        raise ConfigError(f"{path} is an existing directory that holds files this command did not write; refusing "
                          "to replace it: choose a new output path (or an earlier output of this command)")


def refuse_link(path: str) -> None:
    """megapix never writes through, nor over, a symbolic link it did not make (it makes none): one line."""
    if os.path.islink(path):
        raise ConfigError(f"{path} is a symbolic link megapix did not make; it never writes through or over one: "
                          "remove the link (or replace it with the file it names), or choose another output path")


def append_line(path: str, line: str) -> None:
    """Append one line to a record megapix writes (metrics.jsonl), never through a symbolic link (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


@contextlib.contextmanager
def atomic_path(path: str, replace=None):
    """Yield a temporary sibling path; on success rename it onto `path` (file or directory), so readers never
    see a half-written result and a crash leaves the previous version in place. Never replaces a directory it
    may not (see check_output; `replace` marks earlier outputs of the caller), and a file never replaces a
    directory nor a directory a file."""
    path = os.path.abspath(path)
    refuse_link(path)
    check_output(path, replace)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    target = os.path.join(tmp, "payload")
    try:
        yield target
        if os.path.isdir(path) and not os.path.islink(path):
            if not os.path.isdir(target):
                raise ConfigError(f"{path} is a directory; a file output never replaces a directory: pass a file "
                                  "path (for example inside it)")
            check_output(path, replace)  # still ours to replace (nothing was added meanwhile)
            old = path + f".old-{os.getpid()}"
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(target) and os.path.lexists(path):
                raise ConfigError(f"{path} is a file; a directory output never replaces it: choose another path")
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str):
    """The JSON value in `path`, or None when it is missing or unreadable (torn, edited): for records megapix
    wrote itself and checks before trusting. (read_record is the strict reading, for records that must be there;
    these two are the readers of megapix's own JSON records.)"""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_record(path: str) -> dict:
    """The JSON object in `path`, a record that must be there (a checkpoint's layout.json, megapix_config.json):
    a ConfigError naming the file and what is wrong with it otherwise."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is truncated or not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return value


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a record survives a power loss, not only a kill


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (the one reader of that file). A torn last line (a kill in the middle of a
    write) is skipped; a bad line anywhere else means the file is not ours to rewrite."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path} line {i + 1} is not JSON; move the file away and resume again") from None
    return out


def shell_program(name: str) -> str:
    """How the user's shell runs `name` (python, megapix) of the environment this process runs in, as a command
    prefix. A venv's bin/ is on PATH only inside `make` or an activated shell, so a venv's program is named by its
    path (relative to the working directory when under it); elsewhere (a system or conda install) by its name."""
    import shlex
    import sys

    if sys.prefix == sys.base_prefix:
        return name
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        return name
    rel = os.path.relpath(path)
    return shlex.quote(rel if not rel.startswith("..") else path)


class _DropCpuNotice:
    """A logging filter (any object with .filter(record) is one)."""

    @staticmethod
    def filter(record) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def drop_deepspeed_cpu_notice() -> None:
    """DeepSpeed logs "Setting accelerator to CPU..." in every process that imports it on a machine without a GPU.
    megapix's start-up line already says the ranks run on CPU, so its commands drop that one record (the library
    leaves the logger alone; only the entry points call this, before DeepSpeed is imported)."""
    import logging

    logger = logging.getLogger("DeepSpeed")  # DeepSpeed's own logger keeps the filters it finds
    if not any(isinstance(f, _DropCpuNotice) for f in logger.filters):
        logger.addFilter(_DropCpuNotice())


def lower_this_threads_priority(nice: int = 19) -> None:
    """Give the calling thread CPU niceness `nice` (Linux schedules threads apart; 19: only the time the training
    threads leave idle). Where that is not permitted, the thread keeps its priority."""
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass
