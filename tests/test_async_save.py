"""--async-save (issue 30): checkpoints written by a background thread while training goes on.

- the files hold the state of the step saved, not of a later one (a snapshot on the training thread);
- a failed background write is recorded, never raised in the thread, and becomes one line with exit 2 at the next
  step boundary, `latest` left on the previous complete tag and no staging folder left;
- a SIGKILL during a background write leaves `latest` on the previous tag, and the run resumes bit-exactly;
- a stop (--time-budget, a preemption signal) waits for the write before exiting 75.
"""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from megapix.checkpoint import async_save
from megapix.checkpoint.tags import problem
from megapix.runfolder import disk_error
from test_parallel_helpers import (ROOT, SAVE_AT, STEPS, TRAIN, env, layout_config, layout_run, losses,
                                   torchrun_cmd)

PY = sys.executable


# ---- the writer, in process ----------------------------------------------------------------------------------

def _engine_saving(tmp_path, state) -> async_save.AsyncCheckpointEngine:
    writer = async_save.AsyncCheckpointEngine(TorchCheckpointEngine())
    writer.create(None)
    writer.save(state, str(tmp_path / "model_states.pt"))
    return writer


def test_the_file_holds_the_state_at_save_time_not_later(tmp_path):
    w = torch.arange(1000, dtype=torch.float32)
    writer = _engine_saving(tmp_path, {"module": {"w": w}, "step": 3})
    w.add_(1.0)  # the next optimizer step, before the writer has started
    writer.commit(None)
    job = writer.take_job()
    job.wait()
    assert job.error is None and job.host_bytes == 4000 and job.bytes_written > 4000
    saved = torch.load(tmp_path / "model_states.pt", weights_only=True)
    assert torch.equal(saved["module"]["w"], torch.arange(1000, dtype=torch.float32)) and saved["step"] == 3


def test_the_next_save_copies_into_the_last_saves_buffers_and_writes_its_own_state(tmp_path):
    w = torch.arange(1000, dtype=torch.float32)
    writer = _engine_saving(tmp_path, {"module": {"w": w}, "step": 3})
    writer.commit(None)
    writer.take_job().wait()
    buffer = writer.buffers["model_states.pt"]["module"]["w"]
    w.add_(1.0)
    writer.create(None)
    writer.save({"module": {"w": w}, "step": 4}, str(tmp_path / "next" / "model_states.pt"))
    assert writer.files[0][0]["module"]["w"] is buffer  # reused: no new allocation
    (tmp_path / "next").mkdir()
    writer.commit(None)
    writer.take_job().wait()
    saved = torch.load(tmp_path / "next" / "model_states.pt", weights_only=True)
    assert torch.equal(saved["module"]["w"], torch.arange(1000, dtype=torch.float32) + 1) and saved["step"] == 4
    assert torch.equal(torch.load(tmp_path / "model_states.pt", weights_only=True)["module"]["w"],
                       torch.arange(1000, dtype=torch.float32))  # the first file keeps the first state


def test_a_failed_background_write_is_recorded_for_the_training_thread(tmp_path, monkeypatch):
    def read_only(state, path, zipfile):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(async_save, "write_file", read_only)
    writer = _engine_saving(tmp_path, {"w": torch.ones(4)})
    writer.commit(None)
    job = writer.take_job()
    job.wait()
    assert job.done() and isinstance(job.error, OSError)
    line = str(disk_error(job.error, str(tmp_path)))
    assert "Read-only file system" in line and "model_states.pt" in line, line


def test_checkpoint_files_without_zip_crc_load_and_torch_load_never_checked_it(tmp_path):
    """store.without_zip_crc's premise: torch.load reads a CRC-less file, and a CRC never stopped a flipped byte
    (so turning it off loses no check megapix had)."""
    from megapix.checkpoint import store

    state = {"w": torch.arange(1000, dtype=torch.float32)}
    before = torch.serialization.get_crc32_options()
    try:
        for crc in (True, False):
            torch.serialization.set_crc32_options(crc)
            path = tmp_path / f"crc_{crc}.pt"
            torch.save(state, path)
            assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
            raw = bytearray(path.read_bytes())
            raw[raw.index(torch.tensor([500.0]).numpy().tobytes())] ^= 0x40
            path.write_bytes(bytes(raw))
            assert torch.load(path, weights_only=True)["w"][500] != 500.0  # loaded: no CRC check either way
        torch.serialization.set_crc32_options(True)
        store.without_zip_crc()
        assert torch.serialization.get_crc32_options() is False
    finally:
        torch.serialization.set_crc32_options(before)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread niceness is Linux's")
def test_the_writer_thread_runs_nicer_than_the_training_thread(tmp_path, monkeypatch):
    seen = {}

    def record_priority(state, path, zipfile):
        import threading
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return 0

    monkeypatch.setattr(async_save, "write_file", record_priority)
    writer = _engine_saving(tmp_path, {"w": torch.ones(4)})
    writer.commit(None)
    writer.take_job().wait()
    training = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen["writer"] == async_save.WRITER_NICE == 19
    assert os.getpriority(os.PRIO_PROCESS, 0) == training  # the training thread's own priority is untouched


# ---- training runs -------------------------------------------------------------------------------------------

# The writer is patched in the training process: {action} runs for the files of {tag} (a kill, a full disk, a slow
# disk), in the background thread.
PATCHED = """
import errno, os, signal, sys, time
sys.path.insert(0, {root!r})
from megapix.checkpoint import async_save
from megapix.checkpoint.tags import problem

def write_file(state, path, zipfile):
    if {tag!r} in path:
        {action}
    return ORIGINAL(state, path, zipfile)

ORIGINAL, async_save.write_file = async_save.write_file, write_file
from megapix.commands.train import main
sys.exit(main(sys.argv[1:]))
"""
KILL = 'open(path, "wb").write(b"PK torn"); os.kill(os.getpid(), signal.SIGKILL)'
FULL = "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)"
SLOW = "time.sleep(1.0)"


def train(tmp_path, out, *args, tag=None, action=None, nproc=1):
    script = TRAIN
    if action is not None:
        script = tmp_path / "patched_train.py"
        script.write_text(PATCHED.format(root=ROOT, tag=tag, action=action))
    launch = [PY] if nproc == 1 else torchrun_cmd(nproc)[:-1]
    cmd = [*launch, str(script), "--config", layout_config(), "--out", str(out), "--no-samples", "--async-save", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_during_a_background_write_resumes_exactly_from_the_previous_tag(tmp_path):
    run = tmp_path / "run"
    proc = train(tmp_path, run, "--save-every", str(SAVE_AT), tag=f"global_step{STEPS}", action=KILL)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    assert f"saved global_step{SAVE_AT} " in proc.stdout and f"saved global_step{STEPS} " not in proc.stdout
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"global_step{SAVE_AT}"
    assert not (ck / f"global_step{STEPS}").exists()  # the torn file is only in the staging folder
    proc = train(tmp_path, run, "--save-every", str(SAVE_AT), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ck / "latest").read_text().strip() == f"global_step{STEPS}"
    assert not any(p.name.endswith(".saving") for p in ck.iterdir())
    assert losses(run) == losses(layout_run("single"))  # bit for bit: the resumed run is the uninterrupted one


@pytest.mark.slow
def test_a_full_disk_on_one_rank_is_one_line_on_every_rank_exit_2_and_latest_stays(tmp_path):
    """Two ranks; only rank 1's background write fails: both ranks stop at the same step boundary with the same
    line and exit 2, and nobody publishes the tag (every rank's files, or no `latest`)."""
    run = tmp_path / "run"
    full_on_rank1 = f'if os.environ.get("RANK") == "1": {FULL}'
    proc = train(tmp_path, run, "--save-every", "2", "--zero-stage", "1", tag="global_step4", action=full_on_rank1,
                 nproc=2)  # ZeRO-1: each rank writes its own optimizer partition
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), (proc.returncode, proc.stderr[-3000:])
    assert f'File "{ROOT}/megapix' not in proc.stderr, proc.stderr[-3000:]  # torchrun's own traceback only
    ck = run / "checkpoints"
    latest = (ck / "latest").read_text().strip()  # global_step2, or step 3's best-score checkpoint
    assert latest in ("global_step2", "global_step3") and problem(str(ck), latest) is None
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln and "megapix" in ln]
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, lines  # the same line (torchrun may end the other first)
    assert "No space left on device" in lines[0] and f"names {latest})" in lines[0], lines
    assert not (ck / "global_step4").exists() and not any(p.name.endswith(".saving") for p in ck.iterdir())
    assert len(losses(run)) == 5  # stopped at the step boundary after the failure was known, not at the end


@pytest.mark.slow
def test_a_time_budget_stop_waits_for_the_background_write_before_exit_75(tmp_path):
    run = tmp_path / "run"
    proc = train(tmp_path, run, "--save-every", "1", "--time-budget", "0.001", tag="global_step", action=SLOW)
    assert proc.returncode == 75, (proc.returncode, proc.stderr[-3000:])
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "global_step1"
    assert proc.stdout.index("saved global_step1 ") < proc.stdout.index("stop requested")
    assert not any(p.name.endswith(".saving") for p in ck.iterdir())
