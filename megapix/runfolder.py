"""The folders megapix writes are owned: one writer at a time, each command only in a folder of its own kind, and
one clear line (never a traceback, never a half-written result taken for complete) when the disk says no.

One writer at a time: every command that writes an output takes an exclusive advisory lock (fcntl.flock) on a lock
file for its whole life: `<out>/.megapix.lock` for a run folder (train, finetune, extract, prepare), a hidden
sibling `.<name>.megapix.lock` for an output that is replaced whole (an export directory, a sample PNG). Under a
launcher rank 0 holds it and every rank is told rank 0's answer. A second writer is refused in one line naming
the holder's pid and host. The kernel drops a flock when its process dies (kill -9 included), so a lock file
left by a killed process is simply taken over; a release unlinks the file (the inode is checked after locking,
so a writer that opened the file just before it was unlinked retries on the new one).

Each command knows its own kind of folder (folder_kind): finetune, prepare and extract write only into a new or
empty folder or one of their own earlier outputs; train refuses a folder of another megapix kind.

Disks: disk_error turns ENOSPC/EDQUOT/EROFS/EACCES (an OSError, or a library error that carries its text) into a
ConfigError naming the path and what to do; preallocate reserves a file's blocks before it is written through a
memory map (a write into a sparse mapping on a full disk is a SIGBUS, not an error).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time

from megapix.config import ConfigError

LOCK_NAME = ".megapix.lock"
_HELD: dict[str, tuple[int, list[str]]] = {}  # lock path -> (fd, folders this claim created, innermost first)


# ---- the lock -------------------------------------------------------------------------------------------------

def lock_path(out: str, whole: bool = False) -> str:
    """Where the lock of output `out` lives: inside a run folder, or beside an output replaced whole."""
    out = os.path.abspath(out)
    if whole:
        return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}{LOCK_NAME}")
    return os.path.join(out, LOCK_NAME)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            rec = json.load(f)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec["since"])))
        return f"{rec['command']} (pid {int(rec['pid'])} on host {rec['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another megapix process (pid and host not yet written)"


def _open_lock(path: str) -> int:
    """The lock file's descriptor, opened without following a symbolic link (O_NOFOLLOW): a link, a directory or
    a file megapix may not write at the lock's path is one line (ConfigError), never a write into what it names."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            why = "is a symbolic link megapix did not make (a lock is never written through a link)"
        elif e.errno == errno.EISDIR or os.path.isdir(path):
            why = "is a directory, where megapix keeps its lock file"
        elif e.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(path):  # else disk_error names the folder
            why = f"cannot be written ({os.strerror(e.errno)})"
        else:
            raise
        raise ConfigError(f"the lock {path} {why}: remove it (megapix makes it again), or choose another "
                          "--out") from None


def _acquire(out: str, command: str, whole: bool) -> None:
    path = lock_path(out, whole)
    if path in _HELD:
        return
    made = []
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = _open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                where = os.path.dirname(path) if not whole else out
                raise ConfigError(f"{where} is being written by {_holder(path)}; wait for it to finish, or choose "
                                  f"another --out (the lock {path} is released when that process ends)") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder unlinked it between our open and our lock: lock the new file
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
    except OSError as e:
        problem = disk_error(e, path)
        if problem is None:
            raise
        raise problem from None
    if not _HELD:
        atexit.register(release_all)  # a script entry point that returns without calling it
    _HELD[path] = (fd, made)


def claim(out: str, kind: str, command: str, whole: bool = False) -> None:
    """Take `out` for this process's life (every rank: rank 0 holds the lock): refuse, in one line on every rank, a
    folder another process writes, or (for a run folder) one that holds another kind's output (check_kind). A
    folder this claim creates is removed again at release when the command left nothing in it."""
    def take():
        if not whole:
            check_kind(out, kind, command)
        _acquire(out, command, whole)
        if not whole:
            check_kind(out, kind, command)  # again under the lock: nothing was added by a writer before us

    from megapix.parallel import dist

    dist.rank0_decides(take)


def release_all() -> None:
    """Unlink and unlock every lock this process holds (the end of a command), and remove the folders a claim
    made that were left empty (a refused or failed command leaves no empty --out behind)."""
    for path, (fd, made) in list(_HELD.items()):
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
        os.close(fd)
        del _HELD[path]
        with contextlib.suppress(OSError):
            for folder in made:
                os.rmdir(folder)  # fails, and stops, at the first one that is not empty


# ---- folder kinds ---------------------------------------------------------------------------------------------

KIND_NAMES = {"train": "a training run", "finetune": "a fine-tuning output", "extract": "a feature extraction",
              "prepare": "prepared token shards", "export": "an export", "palette": "a run's palette",
              "probe": "probe results", "user": "files megapix did not write"}
_PALETTE = {"palette.npy", "palette.json", "palette.lut.npz"}
_OURS = re.compile(r"\.megapix\.lock|\..+\.tmp-.*|.*\.tmp\d+")  # the lock, atomic_path's and extract's temp names
_SHARD = re.compile(r"(train|val|test)-(\d{5}|labels)\.npy")
_FEATURES = re.compile(r"(train|val|test)_(features\.npy(\.partial)?|labels\.npy)")
# what each kind writes, beyond its defining records (a killed run of the kind may have left only these)
_PROBE = {"probe_results.json", "probe_results.md", "probe_accuracy.png"}
_WRITES = {
    "finetune": _PALETTE | {"metrics.jsonl", "finetune_results.json", "best_model"},
    "extract": {"manifest.json", ".extract_progress"},
    "prepare": {"manifest.json", "palette.npy", "palette.lut.npz"},
}


def _json(path: str):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return json.load(f)
    return None


def folder_kind(path: str) -> str | None:
    """What megapix output `path` holds: None (missing or empty), one of KIND_NAMES' keys, "user" otherwise."""
    if not os.path.isdir(path):
        return None
    names = {n for n in os.listdir(path) if not _OURS.fullmatch(n)}
    if not names:
        return None
    manifest = _json(os.path.join(path, "manifest.json")) if "manifest.json" in names else None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt == "megapix-features" or ".extract_progress" in names:
        return "extract"
    if fmt == "megapix-shards":
        return "prepare"
    if "megapix_export.json" in names:
        return "export"
    if "finetune_results.json" in names:
        return "finetune"
    if "checkpoints" in names or "config.json" in names:
        return "train"
    if "metrics.jsonl" in names:  # a run killed before its first checkpoint: fine-tuning logs lr_run
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(path, "metrics.jsonl")) as f:
                first = json.loads(f.readline() or "{}")
            if isinstance(first, dict) and "lr_run" in first:
                return "finetune"
        return "train"
    if names <= _PALETTE:
        return "palette"
    if names <= _PROBE and isinstance(_json(os.path.join(path, "probe_results.json")), dict):
        return "probe"
    if all(n in _WRITES["prepare"] or _SHARD.fullmatch(n) for n in names) and "palette.json" not in names:
        return "prepare"
    if all(n in _WRITES["extract"] or _FEATURES.fullmatch(n) for n in names):
        return "extract"
    return "user"


# the kinds each command writes into besides a new or empty folder
ACCEPTS = {"train": {"train", "palette", "user"}, "finetune": {"finetune", "palette"}, "extract": {"extract"},
           "prepare": {"prepare"}, "probe": {"probe", "extract"}}


def check_kind(out: str, kind: str, command: str) -> None:
    """Refuse an --out that holds output this command may not write into (ACCEPTS), in one line."""
    found = folder_kind(out)
    if found is None or found in ACCEPTS[kind]:
        return
    raise ConfigError(f"{os.path.abspath(out)} holds {KIND_NAMES[found]}; {command} writes only into a new or empty "
                      f"folder or one of its own earlier outputs: choose another --out")


# ---- disks ----------------------------------------------------------------------------------------------------

_DISK = {errno.ENOSPC: "the disk is full: free space there or choose an --out on another disk",
         errno.EDQUOT: "the disk quota is exhausted: free space there or choose an --out on another disk",
         errno.EROFS: "the file system is read-only: choose an --out on a writable disk",
         errno.EACCES: "choose paths you may read and write (--out), or fix their permissions"}
_TEXTS = {os.strerror(code): code for code in _DISK}


_WRITER_FAILED = ("PytorchStreamWriter", "inline_container", "file write failed")


def _disk_state(path: str) -> int | None:
    """The errno a write under `path` meets now (a full or read-only file system, no write permission), or None."""
    folder = path
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < 1 << 20:  # under 1 MiB left: the short write ran out of space
        return errno.ENOSPC
    if not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


def disk_error(e: BaseException, path: str | None = None) -> ConfigError | None:
    """One line (a ConfigError) naming the path and what to do, when `e` says the disk refused a write (an
    OSError's errno, or a library error that carries the same text: torch's and safetensors' writers); else None."""
    code = e.errno if isinstance(e, OSError) else None
    if code not in _DISK:
        code = next((c for text, c in _TEXTS.items() if text in str(e)), None)
    if code is None and path is not None and any(w in str(e) for w in _WRITER_FAILED):
        code = _disk_state(path)  # torch's zip writer reports a short write without its errno
    if code is None:
        return None
    # a copy or rename names its destination second (shutil.copyfile, os.replace): that is what was written
    filename = (code != errno.EACCES and getattr(e, "filename2", None)) or getattr(e, "filename", None)
    where = filename or (f"into {path}" if path else "a file")
    verb = "access" if code == errno.EACCES else "write"  # a permission error may come from a read as well
    return ConfigError(f"cannot {verb} {where}: {os.strerror(code)}; {_DISK[code]}")


@contextlib.contextmanager
def disk_errors(path: str | None = None):
    """Within it, a refused write becomes disk_error's one line (other errors pass unchanged)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        problem = disk_error(e, path)
        if problem is None:
            raise
        raise problem from None


def preallocate(path: str) -> None:
    """Reserve every block of `path` (its current size) on disk, so writes through a memory map of it cannot meet
    a full disk (which would be a SIGBUS): ENOSPC now, as one line, and the file removed."""
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path)
        e.filename = e.filename or path
        problem = disk_error(e, path)
        if problem is None:
            raise
        raise problem from None
