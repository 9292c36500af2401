"""Two nodes on one machine: slurm/*.sbatch with --nodes 2 on a namespaced SLURM cluster, and dead/hung/cut-off
ranks across nodes.

The nodes are network namespaces on a private bridge (10.213.0.0/24, nothing routed off the machine), each with
its own hostname and /etc/hosts and its own slurmd; slurmctld runs on node 0 (tests/slurm_cluster.py). One cluster
serves the whole session. What runs on it, tiny preset on CPU (gloo):

- LAUNCHER=srun: train.sbatch, 2 nodes x 2 tasks, `scontrol requeue` mid-run: saves, requeues, resumes;
- LAUNCHER=deepspeed (its runner, --launcher slurm, the generated hostfile): the same job uninterrupted; the
  requeued run's curve equals it bit for bit, and both equal the single-rank curve (1e-5);
- LAUNCHER=torchrun (c10d rendezvous): train_xl.sbatch scaled to tiny, TP 2 inside a node x DP 2 across, the
  time limit brought close so that `--signal=B:USR1@60` fires: saves, requeues, resumes to the single-rank curve;
- extract.sbatch across 2 nodes: the same features as one rank;
- a hung rank (SIGSTOP) in a 2-node srun job: the survivor names it and exits 75, srun ends the hung task, the
  script requeues, the rerun resumes to the single-rank curve;
- ranks started by hand on the two nodes: a killed rank, a hung one with SIGTERM to the blocked survivor, a node
  whose link goes down: each survivor ends in bounded time with one line and exit 75.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2/util-linux) or SLURM is not
installed (scripts/install_slurm.sh installs both).
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster  # noqa: E402
import test_faults as faults  # noqa: E402
from test_slurm import (_squeue_state, assert_same_features_as_one_rank, job_gone, job_info, metrics,  # noqa: E402
                        read, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # every test here starts SLURM jobs

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
JOB_TIMEOUT = 600
MAX_STEPS = 60
TRAIN = dict(MODEL="tiny", DATA="digits", GLOBAL_BATCH="8", SEED="7", EXTRA_ARGS="--no-samples --eval-every 0")
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
_ports = itertools.count(29100)


# ----------------------------------------------------------------------------------------------------------
# the cluster (one per session) and helpers
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def nodes():
    reason = slurm_cluster.why_no_namespaces()
    if reason:
        pytest.skip(reason)
    n = slurm_cluster.NamespaceNodes(2).up()
    try:
        yield n
    finally:
        n.down()


@pytest.fixture(scope="session")
def cluster(nodes, tmp_path_factory):
    reason = slurm_cluster.why_unavailable()
    if reason:
        pytest.skip(reason)
    c = slurm_cluster.MultiNodeSlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def single_rank_curve(tmp_path_factory, max_steps: int, *extra: str) -> dict[int, float]:
    out = tmp_path_factory.mktemp("single") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([PYTHON, str(ROOT / "megapix/train.py"), "--model", "tiny", "--data", "digits",
                           "--global-batch", "8", "--seed", "7", "--no-samples", "--eval-every", "0",
                           "--max-steps", str(max_steps), "--out", str(out), *extra], cwd=ROOT, capture_output=True,
                          text=True, env=dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return metrics(out)


@pytest.fixture(scope="session")
def single_rank(tmp_path_factory):
    return single_rank_curve(tmp_path_factory, MAX_STEPS)


def submit(cluster, script: str, log: Path, opts=TWO_NODES, wait: bool = False, **variables) -> tuple[str, object]:
    env = cluster.env
    env.update(PYTHON=PYTHON, MEGAPIX_ROOT=str(ROOT), **variables)
    cmd = [*cluster.client_prefix, "sbatch", "--parsable", "--export=ALL", f"--output={log}", *opts]
    if wait:
        cmd.append("--wait")
    cmd.append(str(ROOT / "slurm" / script))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        cluster.run("scancel", "--user", env["USER"], check=False)
        pytest.fail(f"{script} did not finish within {JOB_TIMEOUT}s\n{read(log)[-4000:]}")
    m = re.search(r"^(\d+)", proc.stdout.strip(), re.M)
    assert m, f"sbatch printed no job id: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return m.group(1), proc


def close(got: dict, want: dict, what: str, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)}"
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, f"{what}: loss differs from the single-rank curve by {worst:g}"


def restart_soon(cluster, job: str, log: Path, **update) -> None:
    """After a requeue: start the job again now (not after its BeginTime), with `update` (e.g. TimeLimit)."""
    wait_for("the requeue", lambda: job_info(cluster, job).get("Restarts") == "1", 300, on_timeout=lambda: read(log))
    wait_for("the job to be pending again", lambda: _squeue_state(cluster, job) in ("PD", "R", ""), 60)
    time.sleep(2.5)  # not within the second of the requeue: slurmd revokes the old credential at 1 s resolution
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", *(f"{k}={v}" for k, v in update.items()),
                check=False)
    wait_for("the requeued job to finish", lambda: job_gone(cluster, job), JOB_TIMEOUT,
             on_timeout=lambda: read(log)[-4000:])


# ----------------------------------------------------------------------------------------------------------
# slurm/*.sbatch across two nodes
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def deepspeed_run(cluster, tmp_path_factory):
    """train.sbatch, 2 nodes x 2 tasks, LAUNCHER=deepspeed, uninterrupted."""
    tmp = tmp_path_factory.mktemp("ds2")
    out, log = tmp / "run", tmp / "train.log"
    job, proc = submit(cluster, "train.sbatch", log, wait=True, OUT=str(out), LAUNCHER="deepspeed",
                       MAX_STEPS=str(MAX_STEPS), **TRAIN)
    return out, log, proc


def test_deepspeed_launcher_two_nodes(deepspeed_run, single_rank):
    out, log, proc = deepspeed_run
    text = read(log)
    assert proc.returncode == 0, f"{proc.returncode}\n{text[-4000:]}"
    assert "nodes=2" in text and "deepspeed.launcher.runner --launcher slurm" in text and "world 4" in text, \
        text[-4000:]
    close(metrics(out), single_rank, "2 nodes x 2 ranks (deepspeed launcher) vs one rank")


def test_srun_two_nodes_requeue_resumes_bit_exact(cluster, deepspeed_run, tmp_path):
    """`scontrol requeue` of a running 2-node job: SIGTERM to every rank, a save, the rerun resumes; its curve is
    the uninterrupted run's bit for bit."""
    out, log = tmp_path / "run", tmp_path / "requeue.log"
    job, _ = submit(cluster, "train.sbatch", log, OUT=str(out), LAUNCHER="srun", MAX_STEPS=str(MAX_STEPS), **TRAIN)
    wait_for("the first training steps", lambda: len(metrics(out)) >= 2, JOB_TIMEOUT, interval=0.1,
             on_timeout=lambda: read(log))
    cluster.run("scontrol", "requeue", job)
    restart_soon(cluster, job, log)
    text = read(log)
    info = job_info(cluster, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{text[-4000:]}"
    assert "launcher=srun" in text and "nodes=2" in text and "(restart 1)" in text, text[-4000:]
    first = text.split("(restart 1)")[0]
    assert "stop requested: saved step" in first and "exited with code 0" not in first, first[-4000:]
    got, want = metrics(out), metrics(deepspeed_run[0])
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), sorted(got)
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}


def test_xl_torchrun_tp2_signal_before_time_limit(cluster, tmp_path_factory, tmp_path):
    """train_xl.sbatch at tiny size, TP 2 inside a node x DP 2 across, LAUNCHER=torchrun (c10d rendezvous). Once it
    trains, its time limit is brought within --signal=B:USR1@60 of now: USR1, save, requeue, resume."""
    # The job must still train when slurmctld's next 30 s look at time limits comes: frequent, long evaluations
    # (they leave the training curve alone) make 60 steps last long enough; a lower lr keeps TP's rounding
    # differences from growing over the run.
    slow = ["--eval-every", "3", "--eval-batches", "24"]
    # ds_configs/zero3.json's clip; the reference skips the evaluations (one rank would spend most of its time there)
    want = single_rank_curve(tmp_path_factory, MAX_STEPS, "--grad-clip", "1.0", "--lr", "1e-3")
    out, log = tmp_path / "run", tmp_path / "xl.log"
    # the script's layout (TP 2, ZeRO-3 with its ds_config, its micro-batch) at the tiny preset
    job, _ = submit(cluster, "train_xl.sbatch", log, opts=TWO_NODES, OUT=str(out), LAUNCHER="torchrun", TP="2",
                    MAX_STEPS=str(MAX_STEPS),
                    **dict(TRAIN, EXTRA_ARGS=TRAIN["EXTRA_ARGS"] + " " + " ".join(slow + ["--lr", "1e-3"])))
    wait_for("the first training steps", lambda: len(metrics(out)) >= 2, JOB_TIMEOUT, interval=0.2,
             on_timeout=lambda: read(log))
    h, m, sec = (int(x) for x in job_info(cluster, job)["RunTime"].split("-")[-1].split(":"))
    elapsed = 3600 * h + 60 * m + sec
    # the limit 40-100 s ahead: slurmctld sends the --signal when at most its 60 s + 30 s of look-ahead remain, at
    # its next check (every 30 s), so USR1 comes while the job trains, and well before the limit
    cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={(elapsed + 40 + 59) // 60}")
    restart_soon(cluster, job, log, TimeLimit="30")
    text = read(log)
    info = job_info(cluster, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{text[-4000:]}"
    first = text.split("(restart 1)")[0]
    assert "SIGUSR1" in first and "stop requested: saved step" in first, first[-4000:]
    assert "launcher=torchrun" in text and "TP2 x PP1 x DP2" in text, text[-4000:]
    close(metrics(out), want, "TP2 x DP2 over 2 nodes (torchrun), signalled and resumed, vs one rank")


def test_extract_two_nodes_matches_one_rank(cluster, deepspeed_run, tmp_path):
    pytest.importorskip("numpy")
    trained = deepspeed_run[0]
    assert deepspeed_run[2].returncode == 0, "the training job failed; see test_deepspeed_launcher_two_nodes"
    feats, local, log = tmp_path / "slurm", tmp_path / "local", tmp_path / "extract.log"
    job, proc = submit(cluster, "extract.sbatch", log, opts=["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                                             "--gpus-per-node=0"],
                       wait=True, CHECKPOINT=str(trained), FEATURES=str(feats), DATA="digits", LAYERS="0,1")
    assert proc.returncode == 0, f"{proc.returncode}\n{read(log)[-4000:]}"
    assert "nodes=2" in read(log), read(log)[-3000:]
    assert_same_features_as_one_rank(trained, feats, local)


def rank_pid(job: str, rank: int) -> int:
    """The pid of trainer rank `rank` of SLURM job `job` (this machine runs every node's processes)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{entry}/environ").read().split("\0") if "=" in kv)
            cmd = open(f"/proc/{entry}/cmdline").read()
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank) and "train.py" in cmd \
                and "python" in cmd.split("\0")[0]:
            return int(entry)
    return 0


def test_hung_rank_in_a_two_node_job_requeues_and_resumes(cluster, single_rank, tmp_path):
    """SIGSTOP of rank 1 (node 1) in an srun job: rank 0 stops answering-waits for --collective-timeout, names it
    and exits 75; srun ends the hung task EXIT_WAIT s later; the script sees the lost-peer report and requeues;
    the rerun resumes from the last complete checkpoint to the single-rank curve."""
    out, log = tmp_path / "run", tmp_path / "hang.log"
    job, _ = submit(cluster, "train.sbatch", log, opts=["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                                        "--gpus-per-node=0"],
                    OUT=str(out), LAUNCHER="srun", MAX_STEPS=str(MAX_STEPS), EXIT_WAIT="10", SAVE_EVERY="5",
                    **dict(TRAIN, EXTRA_ARGS=TRAIN["EXTRA_ARGS"] + " --collective-timeout 30"))
    wait_for("7 training steps", lambda: len(metrics(out)) >= 7, JOB_TIMEOUT, interval=0.1,
             on_timeout=lambda: read(log))
    pid = wait_for("rank 1's pid", lambda: rank_pid(job, 1), 30)
    os.kill(pid, signal.SIGSTOP)
    restart_soon(cluster, job, log)
    text = read(log)
    info = job_info(cluster, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", f"{info}\n{text[-4000:]}"
    first = text.split("(restart 1)")[0]
    one_line(first, "rank 1 (host mpxnode1", "quiet for")
    assert "lost a peer" in first and "requeueing job" in first, first[-4000:]
    close(metrics(out), single_rank, "2 nodes, rank 1 hung, requeued and resumed, vs one rank")


# ----------------------------------------------------------------------------------------------------------
# dead, hung and cut-off ranks across two nodes (ranks started by hand: rank 0 on node 0, rank 1 on node 1)
# ----------------------------------------------------------------------------------------------------------
def launch_across(nodes, out, *extra):
    return faults.launch(out, *extra, prefix=[nodes.prefix(0), nodes.prefix(1)], addr=nodes.addrs[0],
                         port=next(_ports))


def one_line(text: str, *parts: str) -> str:
    lines = [ln for ln in text.splitlines()  # the trainer's line, not the batch script's quote of it
             if ln.startswith("megapix: ") and ("stopped answering" in ln or "still blocked" in ln)]
    assert len(lines) == 1 and all(p in lines[0] for p in parts), (parts, text[-3000:])
    return lines[0]


def test_killed_rank_on_other_node_is_named(nodes, tmp_path):
    """(The resume after a fault is checked bit for bit on one node in tests/test_faults.py, and across these
    nodes by the requeued SLURM jobs above.)"""
    out = tmp_path / "run"
    procs = launch_across(nodes, out, "--collective-timeout", "60")
    try:
        faults.wait_steps(procs, out, 7)
        os.killpg(procs[1].pid, signal.SIGKILL)
        code, took = faults.wait_exit(procs[0], 60)
    finally:
        faults.reap(procs)
    assert code == 75 and took < 30, (code, took, faults.log_of(out, 0)[-3000:])
    one_line(faults.log_of(out, 0), "rank 1 (host mpxnode1", "at step")


def test_hung_rank_on_other_node_and_sigterm_to_the_blocked_one(nodes, tmp_path):
    """Rank 1 (node 1) stops (SIGSTOP); rank 0 blocks in the step's all-reduce; SIGTERM ends it within seconds,
    long before the 600 s collective timeout."""
    out = tmp_path / "run"
    procs = launch_across(nodes, out, "--collective-timeout", "600")
    try:
        faults.wait_steps(procs, out, 7)
        os.kill(procs[1].pid, signal.SIGSTOP)
        time.sleep(2)
        os.kill(procs[0].pid, signal.SIGTERM)
        code, took = faults.wait_exit(procs[0], 120)
    finally:
        faults.reap(procs)
    assert code == 75 and took < 30, (code, took, faults.log_of(out, 0)[-3000:])
    one_line(faults.log_of(out, 0), "got SIGTERM during step")


def test_node_link_down_both_sides_exit_75(nodes, tmp_path):
    """Node 1's link goes down mid-step: rank 0 names rank 1 on mpxnode1; rank 1, which can no longer reach the
    rendezvous store on node 0, says so. Both exit 75 within the collective timeout plus a margin."""
    out, timeout = tmp_path / "run", 30  # 10x the longest one-sided setup (rank 0 fits the palette: 1.5-3 s)
    procs = launch_across(nodes, out, "--collective-timeout", str(timeout))
    try:
        faults.wait_steps(procs, out, 7)
        nodes.set_link(1, up=False)
        try:
            t0 = time.time()
            codes = [p.wait(timeout=timeout + 90) for p in procs]
            took = time.time() - t0
        finally:
            nodes.set_link(1, up=True)
    finally:
        faults.reap(procs)
    assert codes == [75, 75] and took < timeout + 40, (codes, took, faults.log_of(out, 0)[-2000:],
                                                       faults.log_of(out, 1)[-2000:])
    one_line(faults.log_of(out, 0), "rank 1 (host mpxnode1", "quiet for")
    one_line(faults.log_of(out, 1), f"rendezvous store on {nodes.addrs[0]}", "mpxnode1")
