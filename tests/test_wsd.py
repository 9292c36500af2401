"""Issue 28's schedules: --schedule wsd (warm-up, stable, 1-sqrt decay over --decay-steps) and its continuation from
the stable-phase checkpoint (--resume-tag), which trains exactly as one run straight through; the summary's continue
line per schedule; the tqdm bar on a terminal; docs/training.md's "Schedules and continuing a run" commands."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess

import pytest
from conftest import PYTHON, REPO, next_commands, ok, refused, run, run_as_printed, subprocess_env, tree_hash

from megapix.checkpoint.manager import check_resume_config
from megapix.checkpoint.schedule import Schedule, continuation, default_decay
from megapix.config import Config, ConfigError

TRAIN = "megapix/train.py"
TIMEOUT = 400
TINY = ("--model", "tiny", "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--global-batch", "8",
        "--log-every", "1", "--eval-batches", "1", "--eval-every", "0", "--no-samples")
WSD = ("--schedule", "wsd", "--warmup-steps", "2", "--decay-steps", "2", "--seed", "3", "--lr", "0.002")


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the schedule's shape ----
def test_wsd_shape_warmup_stable_then_one_minus_sqrt_decay_to_zero():
    s = Schedule(0.01, 4, 20, "wsd", 5)
    assert s.decay_start == 15
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])  # warm-up ends at peak
    assert all(s.lr_at(i) == 0.01 for i in range(3, 15))  # stable: steps 4..15 (1-based), the checkpoint at 15
    decay = [s.factor(i) for i in range(15, 20)]  # steps 16..20 (1-based): 1-sqrt, each above 0
    assert decay == pytest.approx([1 - math.sqrt(k / 6) for k in range(1, 6)])
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] > 0 and s.factor(20) == 0.0
    assert s.factor(25) == 0.0  # past the end: stays at 0, like the cosine
    assert Schedule(0.01, 4, 20).decay_start is None  # the cosine has no stable phase
    assert default_decay(300) == 30 and default_decay(3) == 1


def test_cosine_is_unchanged():
    s = Schedule(0.003, 2, 10)
    assert s.factor(0) == 0.5 and s.factor(1) == 1.0 and s.factor(10) == pytest.approx(0.0, abs=1e-12)
    assert s.factor(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


@pytest.mark.parametrize("train, words", [
    ({"schedule": "wsd", "max_steps": 100, "warmup_steps": 10, "decay_steps": 91}, "[1, max_steps - warm-up = 90]"),
    ({"schedule": "wsd", "max_steps": 100, "decay_steps": 95}, "[1, max_steps - warm-up = 90]"),  # default warm-up
    ({"schedule": "wsd", "max_steps": 100, "decay_steps": 0}, "must lie in [1,"),
    ({"max_steps": 100, "decay_steps": 20}, "add --schedule wsd"),
    ({"schedule": "linear"}, "is not one of cosine, wsd"),
])
def test_bad_decay_settings_are_one_clear_error(train, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        Config.from_dict({"train": train})


def test_a_decay_longer_than_the_run_is_refused_by_the_cli_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    line = refused(run([TRAIN, "--out", str(out), *TINY, "--schedule", "wsd", "--max-steps", "10",
                        "--warmup-steps", "2", "--decay-steps", "9"], timeout=TIMEOUT), "train.decay_steps=9",
                   "max_steps - warm-up = 8", "--decay-steps")
    assert line.startswith("megapix: error:") and not out.exists()


def test_a_schedule_change_on_resume_is_announced_not_refused():
    saved = Config.from_dict({"train": {"max_steps": 100}}).to_dict()
    now = Config.from_dict({"train": {"max_steps": 200, "schedule": "wsd", "decay_steps": 30}})
    notes = check_resume_config(saved, now, "runs/x", allow_changed=False)
    assert any("now ends at step 200" in n and "WSD decay" in n for n in notes), notes
    assert any("train.schedule 'cosine' -> 'wsd'" in n and "train.decay_steps None -> 30" in n for n in notes), notes


def test_continue_lines_per_schedule():
    cos = Schedule(0.002, 2, 10)
    line, how = continuation(cos, 10, Schedule(0.002, 2, 20), None)
    assert how == "--resume" and "stretches the cosine to end at step 20: step 11 trains at lr" in line
    wsd = Schedule(0.002, 2, 10, "wsd", 2)
    line, how = continuation(wsd, 10, Schedule(0.002, 2, 20, "wsd", 2), "global_step8")
    assert how == "--resume-tag global_step8"
    assert "stable-phase checkpoint global_step8 (step 8" in line
    assert "stays at the peak (0.002) through step 18" in line
    line, how = continuation(wsd, 10, Schedule(0.002, 2, 20, "wsd", 2), None)  # no stable tag kept: a warm restart
    assert how == "--resume" and "step 11 trains at lr 0.002" in line


# ---- a WSD run continued from its stable phase equals one trained straight through ----
@pytest.fixture(scope="module")
def straight_and_continued(tmp_path_factory):
    """Run A: WSD, 10 steps, decay 2 (stable through step 8). Run B: the same settings over 5 steps (stable through
    step 3, decayed 4-5, --keep-last 1), then the continue command its summary prints, run as printed."""
    root = tmp_path_factory.mktemp("wsd")
    a, b = root / "a", root / "b"
    ok(run([TRAIN, "--out", str(a), *TINY, *WSD, "--max-steps", "10"], timeout=TIMEOUT))
    first = ok(run([TRAIN, "--out", str(b), *TINY, *WSD, "--max-steps", "5", "--keep-last", "1"], timeout=TIMEOUT))
    kept = sorted(os.listdir(b / "checkpoints"))
    before = {r["step"]: r for r in metrics(b)}
    cont = dict(next_commands(first.stdout))["continue"]
    return a, b, first, kept, before, cont


@pytest.mark.slow
def test_wsd_continued_from_its_stable_checkpoint_equals_a_straight_run(straight_and_continued):
    a, b, first, kept, before, cont = straight_and_continued
    assert "global_step3" in kept and "global_step5" in kept, kept  # the stable tag survives --keep-last 1
    assert before[4]["lr"] < 0.002 and before[5]["lr"] < before[4]["lr"]  # B decayed at its end
    assert "continuing   --max-steps 10 continues from the stable-phase checkpoint global_step3" in first.stdout
    assert shlex.split(cont)[2:4] == ["--resume-tag", "global_step3"], cont
    proc = run_as_printed(cont, timeout=TIMEOUT)
    assert proc.returncode == 0, (cont, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "--resume-tag" in proc.stdout and "names global_step3 now" in proc.stdout
    straight, continued = metrics(a), metrics(b)
    assert [r["step"] for r in continued] == list(range(1, 11))
    for x, y in zip(straight, continued):
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-6, abs=1e-12), (x["step"], x["lr"], y["lr"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-6), (x["step"], x["loss"], y["loss"])
    assert [r["lr"] for r in continued[2:8]] == [0.002] * 6 and continued[8]["lr"] < 0.002
    with open(b / "checkpoints" / "latest") as f:
        assert f.read().strip() == "global_step10"


@pytest.mark.slow
def test_an_unknown_resume_tag_is_one_line_naming_the_tags(straight_and_continued, tmp_path):
    b = straight_and_continued[1]
    copy = tmp_path / "b"
    shutil.copytree(b, copy)
    before = tree_hash(copy)
    line = refused(run([TRAIN, "--resume-tag", "global_step7", "--out", str(copy), "--max-steps", "12"],
                       timeout=TIMEOUT), "--resume-tag global_step7: no such checkpoint", "global_step10")
    assert "its tags:" in line and tree_hash(copy) == before


# ---- the progress bar on a terminal ----
@pytest.mark.slow
def test_on_a_terminal_the_progress_is_a_tqdm_bar_with_the_pace_fields(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    env = subprocess_env()
    env.pop("TQDM_DISABLE", None)  # the test environment turns tqdm off; a user's terminal does not
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([PYTHON, TRAIN, "--out", str(tmp_path / "run"), *TINY, "--max-steps", "3"], cwd=REPO,
                            env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=TIMEOUT) == 0
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert "train step 3/3:" not in text  # no plain lines on a terminal
    bar = [seg for seg in re.split(r"[\r\n]", text) if "3/3 [" in seg]
    assert bar, text[-3000:]
    last = bar[-1]
    assert re.search(r"3/3 \[\d+:\d\d<\d+:\d\d", last), last  # tqdm's elapsed<ETA
    for field in ("loss=", "ms_step=", "mfu=", "tok_s="):
        assert field in last, (field, last)


# ---- docs/training.md ----
def documented_commands() -> list[str]:
    with open(os.path.join(REPO, "docs", "training.md")) as f:
        text = f.read()
    section = text.split("## Schedules and continuing a run", 1)[1].split("\n## ", 1)[0]
    return [ln.strip() for ln in section.splitlines() if ln.startswith("    python megapix/train.py")]


@pytest.mark.slow
def test_the_documented_schedule_commands_run(tmp_path):
    """Each command of the section, in order, into a temporary --out and at a smaller model (flags appended): the
    continued run trains steps 91-200 at the peak until its decay (191-200)."""
    commands = documented_commands()
    assert len(commands) == 2, commands
    out = tmp_path / "wsd"
    small = ["--n-layer", "2", "--d-model", "64", "--n-head", "4", "--global-batch", "8", "--eval-every", "0",
             "--no-samples"]
    for command in commands:
        args = [str(out) if a == "runs/wsd" else a for a in shlex.split(command)[1:]]
        ok(run([*args, *small], timeout=TIMEOUT))
    recs = metrics(out)
    peak = recs[50]["lr"]
    assert [r["step"] for r in recs] == list(range(1, 201))
    assert all(r["lr"] == peak for r in recs[90:190]) and 0 < recs[199]["lr"] < recs[190]["lr"] < peak


def test_a_run_recorded_before_the_schedule_settings_existed_still_resumes():
    """A config.json written before --schedule and --decay-steps lacks them: that run trained the cosine, so the
    record stays whole (any other missing field still is damage)."""
    from megapix.config import check_record_config

    raw = Config().to_dict()
    del raw["train"]["schedule"], raw["train"]["decay_steps"]
    cfg = check_record_config(raw, "config.json")
    assert cfg.train.schedule == "cosine" and cfg.train.decay_steps is None
    del raw["train"]["seed"]
    with pytest.raises(ConfigError, match="'train.seed' is missing"):
        check_record_config(raw, "config.json")
