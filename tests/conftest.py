"""Shared test helpers: the repo's interpreter, a tiny-model config file, a subprocess runner, and the
unit/integration split (markers `slow` and `triton_interp`, see pytest.ini)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
# `python -m pytest` from the repository root puts the root first on sys.path, where the folder kernels/ (installed
# as megapix.kernels) would shadow Hugging Face's `kernels` package, which transformers imports. The tests use the
# installed megapix, as users do, so the root comes off the path before any test module is imported.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != REPO]
# The CPU matmul peak that MFU divides by is measured once per machine and kept (megapix.runlog.cached_matmul_tflops):
# the tests' runs share one cache of their own, and the user's ~/.cache stays untouched.
TEST_CACHE = None if "MEGAPIX_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="megapix-test-cache-")
if TEST_CACHE:
    os.environ["MEGAPIX_CACHE_DIR"] = TEST_CACHE
# The runs the tests start use this interpreter: the venv make test built (or make lock's fresh one).
PYTHON = sys.executable


def pytest_sessionfinish(session):
    if TEST_CACHE:
        shutil.rmtree(TEST_CACHE, ignore_errors=True)


def pytest_sessionstart(session):
    """The runs the tests start (`python megapix/train.py`, launchers) import the installed megapix, and
    megapix.kernels exists only through the install (setup.py maps kernels/ to it): both must be this checkout."""
    try:
        import megapix.kernels
    except ModuleNotFoundError as e:
        pytest.exit(f"{e}: install this checkout first, `pip install -e .` (make test does)", returncode=2)
    for module, folder in ((megapix, "megapix"), (megapix.kernels, "kernels")):
        where = os.path.dirname(os.path.realpath(module.__file__))
        if where != os.path.realpath(os.path.join(REPO, folder)):
            pytest.exit(f"{module.__name__} is imported from {where}, not from this checkout ({REPO}): "
                        f"run `pip install -e .` here (make test does)", returncode=2)


# TRITON_INTERPRET must be set before triton is first imported, and must not reach other tests (nor their
# subprocesses): these modules run only in a pytest process started with it, the others only without it.
TRITON_INTERP = {"test_kernels.py", "test_model_kernels.py"}
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if module in TRITON_INTERP:
            item.add_marker(pytest.mark.triton_interp)
            if not INTERPRETING:
                item.add_marker(pytest.mark.skip(reason="Triton interpreter test: runs in its own process, "
                                                        "TRITON_INTERPRET=1 python -m pytest -m triton_interp "
                                                        "(make test does)"))
        elif INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="TRITON_INTERPRET=1 is set: only the triton_interp tests "
                                                    "run in this process (make test runs the rest separately)"))


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
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
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


def run(args: list[str], timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `args` (with the repo's python in front) from the repo root; text output captured."""
    return subprocess.run([PYTHON, *args], cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def tree_hash(path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path`: what "nothing was changed" is checked against."""
    import hashlib

    out = {}
    for base, _, files in os.walk(path):
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def wait_for_first_metrics(proc: subprocess.Popen, out, timeout: float) -> None:
    """Block until the training process `proc` has written its first metrics.jsonl line under `out`."""
    import time

    deadline = time.time() + timeout
    path = os.path.join(out, "metrics.jsonl")
    while not (os.path.exists(path) and open(path).read().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no metrics line appeared"
        time.sleep(0.2)


def next_commands(stdout: str) -> list[tuple[str, str]]:
    """(label, command) for each line under a summary's "next:" (two-space indent, label, two spaces, command)."""
    lines = stdout.splitlines()
    found = []
    for line in lines[lines.index("next:") + 1:]:
        if not line.startswith("  "):
            break
        label, command = [part.strip() for part in line.strip().split("  ", 1)]
        found.append((label, command))
    return found


def run_as_printed(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command megapix printed, as the user would paste it: a shell in the repository root whose PATH does
    not hold this venv's bin/ (the shell `make train` was typed in)."""
    venv_bin = os.path.realpath(os.path.dirname(sys.executable))
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.realpath(p) != venv_bin)
    return subprocess.run(command, shell=True, cwd=REPO, env=subprocess_env(PATH=path), capture_output=True,
                          text=True, timeout=timeout)


def ok(proc):
    """A command that succeeded, without a traceback."""
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def refused(proc, *words):
    """Exit 2 with one error line holding every word (DeepSpeed's own [WARNING] lines aside)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]
