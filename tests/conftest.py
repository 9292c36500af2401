"""Shared test helpers: the repo's interpreter, a tiny-model config file, and a subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

# A 2-layer, d=64 model on 8x8 images: a DeepSpeed step takes milliseconds on one CPU core.
TINY_YAML = """\
model: {preset: tiny, n_layer: 2, d_model: 64, n_head: 4}
train: {global_batch: 8, log_every: 1, eval_batches: 1}
"""


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    # DeepSpeed JIT-builds a shm op into the torch extensions cache on first use. A cache of our own keeps these
    # runs from waiting on (or rebuilding over) builds by other interpreters that share ~/.cache/torch_extensions.
    if os.path.isdir(os.path.join(REPO, ".venv")):
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".venv", "torch_extensions"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process runs call discover(), which writes RANK/WORLD_SIZE/MASTER_* into os.environ: put the
    environment back after every test, so no later subprocess (or SLURM job) inherits another test's ranks."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)


def run(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `args` (with the repo's python in front) from the repo root; text output captured."""
    return subprocess.run([PYTHON, *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)
