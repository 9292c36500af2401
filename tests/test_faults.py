"""Dead and hung ranks on one node (2 ranks, gloo): every survivor ends within the collective timeout plus a
margin with one line naming the rank that stopped answering and the step, exit 75, and --resume afterwards is
bit-exact. The same faults across two namespaced nodes are in tests/test_multinode.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import PYTHON, REPO, subprocess_env

from megapix.engine import EXIT_PREEMPTED
from megapix.parallel import watchdog

MAX_STEPS = 30  # a fault lands right after step 7: the rest only has to exist for the resume to continue
FLAGS = ["--model", "tiny", "--data", "digits", "--global-batch", "8", "--seed", "7", "--no-samples",
         "--max-steps", str(MAX_STEPS), "--save-every", "5", "--eval-every", "0"]
STARTUP = 300  # seconds a 2-rank start may take on a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, *extra, world: int = 2, prefix=(), addr="127.0.0.1", port=None) -> list[subprocess.Popen]:
    """`world` ranks of megapix/train.py started by hand (RANK/WORLD_SIZE); prefix[r] runs rank r elsewhere
    (on another namespaced node: tests/test_multinode.py)."""
    port = port or _free_port()
    procs = []
    for r in range(world):
        env = subprocess_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                             MASTER_ADDR=addr, MASTER_PORT=str(port), PYTHONPATH=REPO)
        log = open(f"{out}.rank{r}.log", "w")
        cmd = [*(prefix[r] if prefix else ()), PYTHON, os.path.join(REPO, "megapix", "train.py"), *FLAGS,
               "--out", str(out), *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def losses(out) -> dict[int, float]:
    path = os.path.join(out, "metrics.jsonl")
    got = {}
    for line in open(path).read().splitlines() if os.path.exists(path) else ():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        got[rec["step"]] = rec["loss"]
    return got


def log_of(out, rank: int) -> str:
    with open(f"{out}.rank{rank}.log", errors="replace") as f:
        return f.read()


def wait_steps(procs, out, n: int, timeout: float = STARTUP) -> None:
    deadline = time.time() + timeout
    while len(losses(out)) < n:
        assert all(p.poll() is None for p in procs), [log_of(out, r)[-2000:] for r in range(len(procs))]
        assert time.time() < deadline, f"no {n} steps in {timeout}s"
        time.sleep(0.1)


def reap(procs) -> None:
    for p in procs:
        if p.poll() is None:
            with_suppress(os.killpg, p.pid, signal.SIGKILL)
            with_suppress(os.kill, p.pid, signal.SIGCONT)
            p.wait(timeout=30)


def with_suppress(fn, *args) -> None:
    try:
        fn(*args)
    except ProcessLookupError:
        pass


def wait_exit(proc, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    code = proc.wait(timeout=timeout)
    return code, time.time() - t0


def run_to_end(out, *extra, **kw) -> list[int]:
    procs = launch(out, *extra, **kw)
    try:
        return [p.wait(timeout=STARTUP + 120) for p in procs]
    finally:
        reap(procs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    codes = run_to_end(out)
    assert codes == [0, 0], log_of(out, 0)[-3000:]
    return losses(out)


def test_exit_code_is_the_requeue_code():
    assert watchdog.EXIT_REQUEUE == EXIT_PREEMPTED == 75


def test_collective_timeout_is_what_new_group_takes(monkeypatch):
    """DeepSpeed makes its groups with new_group(ranks), no timeout: torch then takes _get_default_timeout."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        monkeypatch.setattr(c10d, name, getattr(c10d, name))  # put back after the test
    assert watchdog.set_collective_timeout(7) == timedelta(seconds=7)
    assert c10d._get_default_timeout(c10d.Backend("gloo")) == timedelta(seconds=7)
    assert c10d.default_pg_nccl_timeout == timedelta(seconds=7)


def test_peer_failures_are_told_from_other_errors():
    assert watchdog.is_peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert watchdog.is_peer_failure(RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                                 "20000ms for recv operation to complete"))
    assert not watchdog.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not watchdog.is_peer_failure(ValueError("Timed out"))


@pytest.mark.slow
def test_killed_rank_is_named_and_resume_is_bit_exact(tmp_path, reference):
    out = tmp_path / "run"
    procs = launch(out, "--collective-timeout", "60")
    try:
        wait_steps(procs, out, 7)
        procs[1].kill()
        code, took = wait_exit(procs[0], 60)
    finally:
        reap(procs)
    text = log_of(out, 0)
    assert code == 75, text[-3000:]
    assert took < 30, f"rank 0 took {took:.0f}s to notice a dead peer"
    line = [ln for ln in text.splitlines() if "stopped answering" in ln]
    assert len(line) == 1 and "rank 1 (host" in line[0] and "at step" in line[0], text[-3000:]
    codes = run_to_end(out, "--resume")
    assert codes == [0, 0], log_of(out, 0)[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert got == reference, {s: (got[s], reference[s]) for s in got if got[s] != reference[s]}


@pytest.mark.slow
def test_hung_rank_bounded_by_the_collective_timeout(tmp_path):
    out, timeout = tmp_path / "run", 30  # 10x the longest one-sided setup (rank 0 fits the palette: 1.5-3 s)
    procs = launch(out, "--collective-timeout", str(timeout))
    try:
        wait_steps(procs, out, 7)
        os.kill(procs[1].pid, signal.SIGSTOP)
        code, took = wait_exit(procs[0], timeout + 60)
    finally:
        reap(procs)
    text = log_of(out, 0)
    assert code == 75, text[-3000:]
    assert took < timeout + 30, f"rank 0 took {took:.0f}s with --collective-timeout {timeout}"
    line = [ln for ln in text.splitlines() if "stopped answering" in ln]
    assert len(line) == 1 and "rank 1 (host" in line[0] and "quiet for" in line[0], text[-3000:]


@pytest.mark.slow
def test_sigterm_ends_a_rank_blocked_in_a_collective(tmp_path):
    """The peer hangs, the collective timeout is long: SIGTERM still ends the blocked rank within seconds."""
    out = tmp_path / "run"
    procs = launch(out, "--collective-timeout", "600")
    try:
        wait_steps(procs, out, 7)
        os.kill(procs[1].pid, signal.SIGSTOP)
        time.sleep(2)  # rank 0 is now waiting in the step's all-reduce
        os.kill(procs[0].pid, signal.SIGTERM)
        code, took = wait_exit(procs[0], 120)
    finally:
        reap(procs)
    text = log_of(out, 0)
    assert code == 75, text[-3000:]
    assert took < watchdog.MIN_GRACE_S + 20, f"SIGTERM took {took:.0f}s to end a blocked rank"
    assert "got SIGTERM during step" in text and "still blocked" in text, text[-3000:]
