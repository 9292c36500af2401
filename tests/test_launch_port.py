"""Launch hygiene: a rendezvous port already taken (a second run on the same machine) is one line naming
--master_port, a world of one picks its own port, and CPU ranks share the cores instead of each taking all."""
from __future__ import annotations

import os
import socket

import pytest
import torch
from conftest import run, subprocess_env

from megapix.parallel import launch


@pytest.fixture
def taken_port():
    with socket.socket() as s:  # listening on every address, as a running job's TCPStore does
        s.bind(("", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("slurm", [False, True])
def test_port_in_use_is_one_line(taken_port, tiny_config, tmp_path, slurm):
    """Rank 0 of a 2-rank launch (what deepspeed/torchrun export) finds its port taken: exit 2, one line. Inside a
    SLURM job the fix it names is the batch scripts' MEGAPIX_MASTER_PORT, not a launcher flag."""
    env = subprocess_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(taken_port), **({"SLURM_JOB_ID": "4242"} if slurm else {}))
    if not slurm:
        env.pop("SLURM_JOB_ID", None)
    proc = run(["megapix/train.py", "--config", tiny_config, "--out", str(tmp_path / "run"), "--max-steps", "1"],
               timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megapix: error:")]
    fix = "MEGAPIX_MASTER_PORT=" if slurm else "--master_port"
    assert len(errors) == 1 and f"port {taken_port}" in errors[0] and fix in errors[0], proc.stderr


def test_port_in_use_is_recognised():
    err = RuntimeError("The server socket has failed to listen on any local network address. port: 29500, "
                       "useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    assert launch.port_in_use(err)
    assert not launch.port_in_use(RuntimeError("Connection reset by peer"))


def _clean(monkeypatch, **env):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_one_deepspeed_rank_picks_a_free_port(monkeypatch, taken_port):
    # deepspeed's launcher exports MASTER_PORT=29500 even for one rank: a second such run must not collide
    _clean(monkeypatch, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(taken_port))
    assert launch.discover() == "torchrun/deepspeed"
    assert os.environ["MASTER_PORT"] != str(taken_port)
    with socket.socket() as s:
        s.bind(("", int(os.environ["MASTER_PORT"])))


def test_ports_of_multi_rank_and_torchrun_launches_are_kept(monkeypatch):
    _clean(monkeypatch, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_PORT="29611", LOCAL_SIZE="2")
    launch.discover()
    assert os.environ["MASTER_PORT"] == "29611" and os.environ["LOCAL_WORLD_SIZE"] == "2"
    _clean(monkeypatch, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT="29612", TORCHELASTIC_RUN_ID="x")
    launch.discover()  # torchrun's agent holds the store on MASTER_PORT
    assert os.environ["MASTER_PORT"] == "29612"


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_ranks_share_the_cores(monkeypatch, torch_threads, capsys):
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    _clean(monkeypatch, RANK="0", LOCAL_WORLD_SIZE="3")
    launch.set_cpu_threads()
    assert torch.get_num_threads() == 2  # 8 cores // 3 ranks
    assert "2 torch thread(s) each" in capsys.readouterr().out
    _clean(monkeypatch, RANK="0", LOCAL_WORLD_SIZE="16")
    launch.set_cpu_threads()
    assert torch.get_num_threads() == 1


def test_explicit_omp_num_threads_wins(monkeypatch, torch_threads, capsys):
    _clean(monkeypatch, RANK="0", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="3")
    torch.set_num_threads(3)
    launch.set_cpu_threads()
    assert torch.get_num_threads() == 3 and capsys.readouterr().out == ""
