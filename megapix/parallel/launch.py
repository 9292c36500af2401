"""Find this process's rank under any launcher and start torch.distributed.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.
srun exports SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and a node list; mpiexec exports PMI_*/OMPI_* and we ask
mpi4py (as DeepSpeed's MPI discovery does). A plain `python megapix/train.py` is a world of one.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess

from megapix.config import ConfigError

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def launched() -> bool:
    """Whether a launcher started this process as one rank of several (torchrun/deepspeed, srun or mpiexec)."""
    env = os.environ
    return (("RANK" in env and "WORLD_SIZE" in env) or ("SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env)
            or any(v in env for v in MPI_RANK_VARS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list ("node[01-04],gpu7" -> "node01"), via scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    first = nodelist.split(",")[0]
    if "[" in first:  # node[01-04] -> node01, without scontrol
        prefix, rng = first.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return first


def discover() -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the launcher; return its name."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", env.get("LOCAL_RANK", "0"))
        env.setdefault("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env["WORLD_SIZE"]))  # LOCAL_SIZE: deepspeed's
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        if env["WORLD_SIZE"] == "1" and "TORCHELASTIC_RUN_ID" not in env:
            # One rank meets no one: the deepspeed launcher's fixed 29500 would only collide with another run on
            # this machine. (torchrun's agent owns its store on MASTER_PORT: left alone.)
            env["MASTER_PORT"] = str(_free_port())
        return "torchrun/deepspeed"
    # An srun step (not the batch script itself, which also carries SLURM_PROCID=0 and the job's task count).
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        # "2(x3),1": tasks per node; the first count, or every task when SLURM does not say
        per_node = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "")))
        env.setdefault("LOCAL_WORLD_SIZE", per_node.group() if per_node else env["WORLD_SIZE"])
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = slurm_master_addr(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "srun"
    if any(v in env for v in MPI_RANK_VARS):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        env["RANK"], env["WORLD_SIZE"] = str(comm.Get_rank()), str(comm.Get_size())
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = str(node.Get_rank()), str(node.Get_size())
        master, port = comm.bcast((socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None, root=0)
        env.setdefault("MASTER_ADDR", "127.0.0.1" if comm.Get_size() == 1 else master)
        env.setdefault("MASTER_PORT", str(port))
        return "mpi"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "single"


def init_distributed(collective_timeout: float | None = None) -> str:
    """Start torch.distributed through DeepSpeed: nccl on GPUs, gloo on CPU. Returns the launcher's name.

    `collective_timeout` (seconds) bounds every process group's waits and starts the watchdog that names a rank
    that stopped answering (megapix/parallel/watchdog.py); None keeps torch's defaults and no watchdog."""
    import deepspeed
    import torch

    from megapix.parallel import watchdog

    launcher = discover()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if not torch.cuda.is_available():
        set_cpu_threads()
        skip_cpu_shm_op()
    timeout = {} if collective_timeout is None else {"timeout": watchdog.set_collective_timeout(collective_timeout)}
    if not torch.distributed.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **timeout)
        except RuntimeError as e:  # torch's DistNetworkError is one
            if not port_in_use(e):
                raise
            port, addr = os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]
            free = _free_port()
            fix = (f"submit with a free one, e.g. `MEGAPIX_MASTER_PORT={free} sbatch ...` (slurm/launch.sh)"
                   if os.environ.get("SLURM_JOB_ID") else
                   f"launch with a free one, e.g. `deepspeed --master_port {free} ...` (torchrun takes the same flag; "
                   f"`make train PORT={free}`)")
            raise ConfigError(f"port {port} on {addr} is already in use (another run on this machine?): "
                              f"{fix}") from None
    if collective_timeout is not None:
        watchdog.start(collective_timeout)
    return launcher


def port_in_use(error: BaseException) -> bool:
    text = str(error)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def set_cpu_threads() -> None:
    """Without OMP_NUM_THREADS, every CPU rank would start one torch thread per core: N ranks on one machine then
    run N x cores threads and each step slows several-fold. Share the cores instead (an explicit OMP_NUM_THREADS
    wins)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    if os.environ.get("RANK", "0") == "0":
        print(f"megapix: CPU ranks use {threads} torch thread(s) each ({cores} cores / {local} rank(s) on this "
              f"machine); set OMP_NUM_THREADS to choose", flush=True)


def skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm) at
    init; it only serves inference all-reduce, and concurrent processes re-run its ~90 s ninja build. Training
    over gloo does not use it, so it is not built (set MEGAPIX_CPU_SHM_OP=1 to keep DeepSpeed's default)."""
    if os.environ.get("MEGAPIX_CPU_SHM_OP") == "1":
        return
    import importlib

    try:
        # importlib, not `import deepspeed.comm.torch as m`: that form resolves the attribute deepspeed.comm.torch,
        # which is the real torch package (deepspeed.comm imports it), and the patch would land on torch.
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    ds_torch_comm.build_shm_op = lambda: None
