"""Launchers: deepspeed, torchrun and mpiexec each start a 2-rank run on CPU/gloo with the same curve; srun's
environment is mapped to torch.distributed's (unit-tested with a fake environment; real srun is tested by
the SLURM suite)."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from test_parallel_helpers import TRAIN, free_port, losses, run_train, write_config

BIN = os.path.dirname(sys.executable)


def _launch(tmp_path, name, cmd):
    out = tmp_path / name
    proc = run_train(out, 2, config=write_config(tmp_path, max_steps=2), cmd=cmd)
    assert "world 2 = TP1 x PP1 x DP2" in proc.stdout, proc.stdout[-2000:]
    return losses(out)


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpiexec"])
def test_launcher_runs_two_ranks(launcher, tmp_path, curves):
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), TRAIN]
    elif launcher == "deepspeed":  # on CPU the launcher takes --num_gpus as the number of local ranks
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN]
    else:  # ranks found through mpi4py (megapix.parallel.launch)
        mpiexec = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
        if mpiexec is None:
            pytest.skip("no mpiexec (pip install mpich)")
        cmd = [mpiexec, "-n", "2", sys.executable, TRAIN]
    curves[launcher] = _launch(tmp_path, launcher, cmd)
    assert len(curves[launcher]) == 2
    if len(curves) > 1:  # every launcher gives the same curve
        first = next(iter(curves.values()))
        assert max(abs(a - b) for a, b in zip(curves[launcher], first)) < 1e-6


def _clean_env(monkeypatch):
    # The rank variables are named even when absent: discover() writes them, and monkeypatch restores only
    # keys it has touched (an absent one is deleted again at teardown).
    for k in {*os.environ, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}:
        if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.setenv(k, "")  # records the original value (or its absence) for restoring at teardown,
            monkeypatch.delenv(k)  # so what discover() writes into os.environ does not leak into later tests


def test_srun_environment_is_mapped(monkeypatch):
    from megapix.parallel import launch

    _clean_env(monkeypatch)
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no scontrol")))
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[03-06],gpu9")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert launch.discover() == "srun"
    e = os.environ
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["MASTER_ADDR"]) == ("5", "8", "1", "gpu03")
    assert e["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_sbatch_script_itself_is_not_an_srun_step(monkeypatch):
    """The batch script carries SLURM_PROCID=0 but no step task count: it is a world of one, not rank 0 of N."""
    from megapix.parallel import launch

    _clean_env(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert launch.discover() == "single"
    assert os.environ["WORLD_SIZE"] == "1"


def test_torchrun_variables_win(monkeypatch):
    from megapix.parallel import launch

    _clean_env(monkeypatch)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert launch.discover() == "torchrun/deepspeed"
    assert os.environ["RANK"] == "3"


def test_slurm_master_addr_without_scontrol(monkeypatch):
    from megapix.parallel import launch

    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no scontrol")))
    assert launch.slurm_master_addr("node[01-04],gpu7") == "node01"
    assert launch.slurm_master_addr("n7,n8") == "n7"
    assert launch.slurm_master_addr("a[3,5-6]") == "a3"


def test_cpu_shm_op_is_not_built(monkeypatch):
    """On CPU, DeepSpeed would JIT-build its shm all-reduce op in every init (minutes on a fresh install)."""
    import importlib

    from megapix.parallel import launch

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(ds_torch, "build_shm_op", ds_torch.build_shm_op)  # restored at teardown
    monkeypatch.delenv("MEGAPIX_CPU_SHM_OP", raising=False)
    launch.skip_cpu_shm_op()
    assert ds_torch.build_shm_op() is None
