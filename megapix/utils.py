"""Small shared helpers: atomic file/directory writes, rank-aware printing."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary sibling path; on success rename it onto `path` (file or directory), so readers never
    see a half-written result and a crash leaves the previous version in place."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    target = os.path.join(tmp, "payload")
    try:
        yield target
        if os.path.isdir(path) and not os.path.islink(path):
            old = path + f".old-{os.getpid()}"
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)
