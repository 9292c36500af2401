"""slurm/*.sbatch on a real one-node SLURM cluster (brought up by tests/slurm_cluster.py), on CPU.

Skipped, with the reason, where SLURM/munge are not installed (scripts/install_slurm.sh installs them) or
not running as root. Jobs run the tiny preset with 2 tasks and no GPUs
(`--ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0`), PYTHON = this interpreter.

    pytest -m slurm tests/test_slurm.py -v
    MEGAPIX_SLURM_LAUNCHERS=1 pytest tests/test_slurm.py -v   # also LAUNCHER=torchrun and deepspeed
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # every test here starts SLURM jobs

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
NTASKS = 2
MAX_STEPS = 100  # a signal sent after step 1 must land mid-run, even at ~10 steps/s on a loaded machine
TRAIN = dict(MODEL="tiny", DATA="digits", MAX_STEPS=str(MAX_STEPS), GLOBAL_BATCH="8", SEED="7",
             EXTRA_ARGS="--no-samples")
TRAIN_FLAGS = ["--model", "tiny", "--data", "digits", "--max-steps", str(MAX_STEPS), "--global-batch", "8",
               "--seed", "7", "--no-samples"]
CPU_OPTS = [f"--ntasks-per-node={NTASKS}", "--cpus-per-task=1", "--gpus-per-node=0"]
JOB_TIMEOUT = 600  # generous: on a loaded 2-core machine a 2-rank job can take minutes to start


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = slurm_cluster.why_unavailable()
    if reason:
        pytest.skip(reason)
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


_SUBMITTED: list[tuple] = []


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A failed test must not leave its job holding the node's CPUs for the next test."""
    yield
    while _SUBMITTED:
        cluster, job = _SUBMITTED.pop()
        if not job_gone(cluster, job):
            cluster.run("scancel", job, check=False)


def submit(cluster, script: str, log: Path, wait: bool = False, opts=(), **variables):
    """sbatch slurm/<script> from the repository root; variables travel in the environment (--export=ALL).
    Returns (job id, sbatch's CompletedProcess)."""
    env = cluster.env
    env.update(PYTHON=PYTHON, MEGAPIX_ROOT=str(ROOT), **variables)
    cmd = ["sbatch", "--parsable", "--export=ALL", f"--output={log}", *CPU_OPTS, *opts]
    if wait:
        cmd.append("--wait")
    cmd.append(str(ROOT / "slurm" / script))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        # `sbatch --wait` gave up, the job did not: cancel it, or it holds the node's CPUs for every later test
        printed = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        m = re.search(r"^(\d+)", printed.strip(), re.M)
        if m:
            cluster.run("scancel", m.group(1), check=False)
        pytest.fail(f"job {m.group(1) if m else '?'} did not finish within {JOB_TIMEOUT}s\n{read(log)[-4000:]}")
    m = re.search(r"^(\d+)", proc.stdout.strip(), re.M)
    assert m, f"sbatch printed no job id: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    _SUBMITTED.append((cluster, m.group(1)))
    return m.group(1), proc


def job_info(cluster, job: str) -> dict:
    out = cluster.run("scontrol", "show", "job", "-o", job, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(what: str, fn, timeout: float, interval: float = 0.25, on_timeout=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")


def job_gone(cluster, job: str) -> bool:
    """The job is finished and its processes are gone (not PENDING/RUNNING/COMPLETING)."""
    return not cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip()


def _squeue_state(cluster, job: str) -> str:
    """squeue's compact state (PD, R, CG, ...), "" once the job has left the queue."""
    return cluster.run("squeue", "-h", "-j", job, "-o", "%t", check=False).stdout.strip()


def metrics(out: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a later record for a step wins, as after a resume)."""
    path = out / "metrics.jsonl"
    losses = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line being written
                    continue
                if "loss" in rec:
                    losses[int(rec["step"])] = float(rec["loss"])
    return losses


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def assert_same_curve(got: dict, want: dict, what: str):
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), f"{what}: steps {sorted(got)}"
    diffs = {s: abs(got[s] - want[s]) for s in want}
    worst = max(diffs.values())
    assert worst <= 1e-5, f"{what}: loss differs from the reference by {worst:g} (per step: {diffs})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted local run without SLURM: the same 2 ranks, started by hand (RANK/WORLD_SIZE)."""
    out = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WORLD_SIZE=str(NTASKS), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for rank in range(NTASKS):
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([PYTHON, str(ROOT / "megapix/train.py"), *TRAIN_FLAGS, "--out", str(out)],
                                      cwd=ROOT, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=JOB_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * NTASKS, f"local reference run failed: {codes}\n{read(out / 'rank0.log')[-3000:]}"
    losses = metrics(out)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


@pytest.fixture(scope="session")
def trained(cluster, tmp_path_factory):
    """`sbatch --wait slurm/train.sbatch`, uninterrupted. Returns (output folder, log, sbatch result)."""
    tmp = tmp_path_factory.mktemp("train")
    out, log = tmp / "run", tmp / "train.log"
    job, proc = submit(cluster, "train.sbatch", log, wait=True, OUT=str(out), **TRAIN)
    return out, log, proc, job


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------
def test_train_completes(cluster, trained, reference):
    out, log, proc, job = trained
    text = read(log)
    assert proc.returncode == 0, f"sbatch --wait exit {proc.returncode}\n{proc.stderr}\n{text[-4000:]}"
    assert (out / "checkpoints" / "latest").is_file(), text[-3000:]
    assert "launcher=srun" in text and f"master={socket.gethostname().split('.')[0]}:" in text, text[-3000:]
    assert "world 2" in text, f"the trainer did not see {NTASKS} ranks:\n{text[-3000:]}"
    info = job_info(cluster, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "0", info
    assert_same_curve(metrics(out), reference, "sbatch run vs local run")


def test_a_taken_rendezvous_port_moves_to_a_free_one(cluster, tmp_path):
    """Another process holds the port the job id gives (20000 + id % 20000) on the first node: the batch script
    says so and rendezvouses on a free port; the job trains to the end. (Before, rank 0 died with exit 2.)"""
    out, log = tmp_path / "run", tmp_path / "port.log"
    job, _ = submit(cluster, "train.sbatch", log, opts=["--hold"], OUT=str(out),
                    **dict(TRAIN, MAX_STEPS="3", EXTRA_ARGS="--no-samples --eval-every 0"))
    derived = 20000 + int(job) % 20000
    with socket.socket() as holder:
        holder.bind(("", derived))
        holder.listen()
        cluster.run("scontrol", "release", job)
        wait_for("the job to finish", lambda: job_gone(cluster, job), JOB_TIMEOUT, on_timeout=lambda: read(log))
    text = read(log)
    assert job_info(cluster, job).get("JobState") == "COMPLETED", text[-4000:]
    moved = re.search(rf"port {derived} is in use on \S+: rendezvous on port (\d+) instead", text)
    assert moved and f":{moved.group(1)} " in text and sorted(metrics(out)) == [1, 2, 3], text[-4000:]


def test_preempt_saves_requeues_and_resumes(cluster, reference, tmp_path):
    _preempt_and_resume(cluster, reference, tmp_path, "srun")


def _preempt_and_resume(cluster, reference, tmp_path, launcher):
    out, log = tmp_path / "run", tmp_path / "preempt.log"
    job, _ = submit(cluster, "train.sbatch", log, OUT=str(out), LAUNCHER=launcher, **TRAIN)
    # Signal once training is under way (the trainer's handler is installed before step 1).
    # (or the job's end: a job that failed before its first step fails here at once, with its log)
    wait_for("the first training steps", lambda: len(metrics(out)) >= 1 or job_gone(cluster, job), JOB_TIMEOUT,
             interval=0.1, on_timeout=lambda: read(log))
    assert metrics(out), f"the job ended before its first step\n{read(log)[-4000:]}"
    steps_before = max(metrics(out))
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # The batch script forwards USR1, the trainer saves and exits 75, the script requeues the job.
    info = wait_for("the requeue", lambda: (i := job_info(cluster, job)).get("Restarts") == "1" and i, 300,
                    on_timeout=lambda: read(log))
    # A requeued job waits for its BeginTime (cred_expire + the scheduler's tick): start it sooner. Not in the
    # same second as the requeue: slurmd revokes the job's credentials with a one-second resolution, and a
    # restart within it dies with "Job credential revoked".
    wait_for("the job to be pending again", lambda: _squeue_state(cluster, job) in ("PD", "R", ""), 60,
             on_timeout=lambda: str(job_info(cluster, job)))
    time.sleep(2.5)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    wait_for("the requeued job to finish", lambda: job_gone(cluster, job), JOB_TIMEOUT,
             on_timeout=lambda: read(log)[-4000:])
    info = job_info(cluster, job)
    text = read(log)
    assert info.get("JobState") == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert info.get("Restarts") == "1", info
    saved = "exited with code 75" in text or (launcher == "torchrun" and "treating it as 75" in text)
    assert "SIGUSR1" in text and saved and "requeueing job" in text, text[-4000:]
    assert "(restart 1)" in text, "the log (open-mode=append) should hold both runs:\n" + text[-4000:]
    first_run = text.split("(restart 1)")[0]
    assert "exited with code 0" not in first_run, "the first run finished before the signal:\n" + first_run
    assert steps_before < MAX_STEPS
    assert (out / "checkpoints" / "latest").is_file()
    assert_same_curve(metrics(out), reference, "preempted + resumed run vs uninterrupted local run")


ALL_LAUNCHERS = os.environ.get("MEGAPIX_SLURM_LAUNCHERS") == "1"
needs_all_launchers = pytest.mark.skipif(not ALL_LAUNCHERS, reason="torchrun/deepspeed launcher runs are opt-in "
                                         "(about 2 more minutes): MEGAPIX_SLURM_LAUNCHERS=1")


@needs_all_launchers
def test_torchrun_launcher_preempt_and_resume(cluster, reference, tmp_path):
    """LAUNCHER=torchrun: one agent per node, c10d rendezvous; USR1 reaches the workers through the agent."""
    _preempt_and_resume(cluster, reference, tmp_path, "torchrun")


@needs_all_launchers
def test_deepspeed_launcher(cluster, reference, tmp_path):
    """LAUNCHER=deepspeed: DeepSpeed's runner with --launcher slurm (it runs srun itself)."""
    out, log = tmp_path / "run", tmp_path / "ds.log"
    job, proc = submit(cluster, "train.sbatch", log, wait=True, OUT=str(out), LAUNCHER="deepspeed", **TRAIN)
    text = read(log)
    assert proc.returncode == 0, f"{proc.returncode}\n{text[-4000:]}"
    assert "deepspeed.launcher.runner --launcher slurm" in text and "world 2" in text, text[-4000:]
    assert_same_curve(metrics(out), reference, "LAUNCHER=deepspeed vs local run")


def test_cancelled_job_does_not_requeue(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "cancel.log"
    job, _ = submit(cluster, "train.sbatch", log, OUT=str(out), **dict(TRAIN, MAX_STEPS="100000"))
    wait_for("the first training step", lambda: len(metrics(out)) >= 1, JOB_TIMEOUT, interval=0.1,
             on_timeout=lambda: read(log))
    cluster.run("scancel", job)
    wait_for("the cancelled job to end", lambda: job_gone(cluster, job), 90, on_timeout=lambda: read(log))
    time.sleep(3)
    info = job_info(cluster, job)
    text = read(log)
    assert info.get("JobState") == "CANCELLED", f"{info}\n{text[-3000:]}"
    assert info.get("Restarts") == "0", f"a cancelled job was requeued: {info}\n{text[-3000:]}"
    assert "requeueing job" not in text, text[-3000:]


def test_failed_job_does_not_requeue(cluster, tmp_path):
    log = tmp_path / "fail.log"
    job, proc = submit(cluster, "train.sbatch", log, wait=True, OUT=str(tmp_path / "run"),
                       **dict(TRAIN, EXTRA_ARGS="--no-such-flag"))
    info = job_info(cluster, job)
    assert proc.returncode == 2, f"{proc.returncode}\n{read(log)[-3000:]}"
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "0", info
    assert "requeueing job" not in read(log)


def test_time_budget_exit_75_and_requeue_cap(cluster, tmp_path):
    """--time-budget stops like a preemption (save, exit 75); MAX_REQUEUES=0 stops the requeue."""
    out, log = tmp_path / "run", tmp_path / "budget.log"
    job, proc = submit(cluster, "train.sbatch", log, wait=True, OUT=str(out), TIME_BUDGET="0.5",
                       MAX_REQUEUES="0", **TRAIN)
    text = read(log)
    info = job_info(cluster, job)
    assert proc.returncode == 75, f"{proc.returncode}\n{text[-3000:]}"
    assert "MAX_REQUEUES=0" in text and "requeueing job" not in text, text[-3000:]
    assert info.get("Restarts") == "0", info
    assert (out / "checkpoints" / "latest").is_file(), text[-3000:]
    assert 1 <= len(metrics(out)) < MAX_STEPS


def _extract_available() -> bool:
    proc = subprocess.run([PYTHON, "-m", "megapix", "extract", "--help"], cwd=ROOT, capture_output=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return proc.returncode == 0


def test_extract_matches_local_run(cluster, trained, tmp_path):
    pytest.importorskip("numpy")
    if not _extract_available():
        pytest.skip("`python -m megapix extract` is not available yet")
    out, _, train_proc, _ = trained
    assert train_proc.returncode == 0, "the training job failed; see test_train_completes"
    slurm_feats, local_feats, log = tmp_path / "slurm", tmp_path / "local", tmp_path / "extract.log"
    args = dict(CHECKPOINT=str(out), DATA="digits", LAYERS="0,1")
    job, proc = submit(cluster, "extract.sbatch", log, wait=True, FEATURES=str(slurm_feats), **args)
    assert proc.returncode == 0, f"{proc.returncode}\n{read(log)[-4000:]}"
    assert_same_features_as_one_rank(out, slurm_feats, local_feats)


def assert_same_features_as_one_rank(checkpoint, slurm_feats: Path, local_feats: Path) -> None:
    """A local one-rank `python -m megapix extract` of `checkpoint` into local_feats writes what the job wrote."""
    import numpy as np

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    local = subprocess.run([PYTHON, "-m", "megapix", "extract", "--checkpoint", str(checkpoint), "--data", "digits",
                            "--layers", "0,1", "--out", str(local_feats)], cwd=ROOT, capture_output=True, text=True,
                           env=dict(env, PYTHONPATH=str(ROOT)), timeout=JOB_TIMEOUT)
    assert local.returncode == 0, local.stderr[-4000:]
    local_files = sorted(p.relative_to(local_feats) for p in local_feats.rglob("*.npy"))
    slurm_files = sorted(p.relative_to(slurm_feats) for p in slurm_feats.rglob("*.npy"))
    assert local_files and local_files == slurm_files, (local_files, slurm_files)
    assert (slurm_feats / "manifest.json").is_file()
    for rel in local_files:
        a, b = np.load(local_feats / rel), np.load(slurm_feats / rel)
        assert a.shape == b.shape, (rel, a.shape, b.shape)
        if np.issubdtype(a.dtype, np.floating):
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6), rel
        else:
            assert np.array_equal(a, b), rel
