"""Nothing a resume restores may be silently wrong (issue 33): --allow-changed lr, warm-up and max-steps take effect
at the resumed step; config.json is trusted only when whole (else the checkpoint's own megapix_config.json, said in
one line, never defaults), and every hint a resume error prints leads to a correct run; locks and records are never
written through a link; checkpoint records (saved_tags.json, skipped_batches.json) are checked; the study script's
bad inputs are one line. Each refusal: exit 2, one line, no file changed.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess

import pytest
from conftest import PYTHON, REPO, ok, refused, run, subprocess_env, tree_hash

TRAIN = "megapix/train.py"
TIMEOUT = 400
TINY = ("--model", "tiny", "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--global-batch", "8",
        "--log-every", "1", "--eval-batches", "1", "--eval-every", "0", "--no-samples")


def train(out, *args):
    return run([TRAIN, "--out", str(out), *map(str, args)], timeout=TIMEOUT)


def resume(out, *args):
    return run([TRAIN, "--resume", "--out", str(out), "--no-samples", *map(str, args)], timeout=TIMEOUT)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]


def record(out):
    return json.loads(open(os.path.join(out, "config.json")).read())["config"]


def cosine_lr(peak, warmup, max_steps, step):
    """The lr of optimizer step `step` (1-based, as metrics.jsonl numbers it): linear warm-up, cosine to 0. Written
    out here, not imported, so the test checks the engine against the schedule's definition."""
    i = step - 1
    if i < warmup:
        return peak * (i + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, max_steps - warmup))))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run (seed 3, lr 0.002, warm-up 2, a checkpoint every 2 steps), asked for TensorBoard,
    which is not installed here: copied by each test."""
    out = tmp_path_factory.mktemp("base") / "run"
    proc = ok(train(out, *TINY, "--max-steps", 6, "--seed", 3, "--lr", 0.002, "--warmup-steps", 2,
                    "--save-every", 2, "--keep-last", 0, "--report-to", "tensorboard"))
    return out, proc


def copy_of(finished, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(finished[0], dst, symlinks=True)
    return dst


def lrs(out):
    return {r["step"]: r["lr"] for r in metrics(out)}


@pytest.mark.slow
def test_tensorboard_without_the_package_is_said_again_in_the_summary(finished):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    stdout = finished[1].stdout
    assert "the tensorboard package is not installed" in stdout  # the start-up warning
    summary = stdout[stdout.index("megapix: done at step 6"):]
    assert "note         warning: TensorBoard was asked for" in summary, summary


@pytest.mark.slow
def test_allow_changed_lr_and_a_longer_max_steps_follow_the_new_schedule(finished, tmp_path):
    """--allow-changed --lr applies from the first resumed step (read back from metrics.jsonl against the schedule
    computed here); a later resume with only a longer --max-steps continues the decay to the new end instead of
    training at the old end's lr (0); the hints of the contradiction error both lead to a run."""
    out = copy_of(finished, tmp_path)
    before = tree_hash(out)
    line = refused(resume(out, "--max-steps", 10, "--lr", 0.03), "train.lr 0.002 -> 0.03", "--allow-changed")
    assert tree_hash(out) == before and "drop those settings" in line
    # hint 1: drop the contradicting setting: the run continues as it was (a longer schedule, the same peak)
    plain = copy_of(finished, tmp_path, "plain")
    proc = ok(resume(plain, "--max-steps", 8))
    got = lrs(plain)
    assert all(got[s] == pytest.approx(cosine_lr(0.002, 2, 6, s), rel=1e-12) for s in range(1, 7)), got
    assert all(got[s] == pytest.approx(cosine_lr(0.002, 2, 8, s), rel=1e-12) for s in (7, 8)), got
    assert got[7] > 0 and "the lr schedule follows the current settings" in proc.stdout
    # hint 2: --allow-changed: the new peak lr, warm-up and end take effect at step 7
    proc = ok(resume(out, "--max-steps", 10, "--lr", 0.03, "--warmup-steps", 3, "--allow-changed"))
    assert "step 7 trains at lr" in proc.stdout and "train.lr 0.002 -> 0.03" in proc.stdout, proc.stdout[-3000:]
    got = lrs(out)
    assert sorted(got) == list(range(1, 11))
    for s in range(7, 11):
        assert got[s] == pytest.approx(cosine_lr(0.03, 3, 10, s), rel=1e-12), (s, got[s], cosine_lr(0.03, 3, 10, s))
    # a longer --max-steps alone: step 11 is on the cosine to 14, not at the old end's lr of 0
    ok(resume(out, "--max-steps", 14))
    got = lrs(out)
    for s in range(11, 15):
        assert got[s] == pytest.approx(cosine_lr(0.03, 3, 14, s), rel=1e-12), (s, got[s])
    assert got[11] > 1e-3


@pytest.mark.slow
def test_a_huge_allowed_lr_really_trains_at_it(finished, tmp_path):
    """--allow-changed --lr 1e30 diverges at once (it used to train on at the old lr, and no rollback ever fired):
    step 7 trains at it, step 8 is non-finite, exit 1 naming the step."""
    out = copy_of(finished, tmp_path)
    proc = resume(out, "--max-steps", 8, "--lr", 1e30, "--allow-changed")
    assert proc.returncode == 1 and "non-finite" in proc.stderr and "at step 8" in proc.stderr, proc.stderr[-3000:]
    assert lrs(out)[7] == pytest.approx(cosine_lr(1e30, 2, 8, 7), rel=1e-12)


@pytest.mark.slow
def test_a_damaged_or_missing_config_json_uses_the_checkpoints_own_never_defaults(finished, tmp_path):
    """A torn config.json: the settings come from the latest tag's megapix_config.json, said in one line, and the run
    continues as it was (seed, lr, max_steps kept). A missing one: the same. Neither whole: exit 2 naming both files;
    following its hint (restore config.json) resumes correctly."""
    saved = record(finished[0])
    out = copy_of(finished, tmp_path)
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[:150])
    proc = ok(resume(out, "--max-steps", 8))
    said = [ln for ln in proc.stdout.splitlines() if "config.json is truncated or not valid JSON" in ln]
    assert len(said) == 2 and "checkpoints/global_step6/megapix_config.json" in said[0], proc.stdout[-3000:]
    now = record(out)
    assert {k: now["train"][k] for k in ("seed", "lr", "warmup_steps", "save_every")} == \
        {k: saved["train"][k] for k in ("seed", "lr", "warmup_steps", "save_every")} and now["train"]["max_steps"] == 8
    assert lrs(out)[7] == pytest.approx(cosine_lr(0.002, 2, 8, 7), rel=1e-12)

    gone = copy_of(finished, tmp_path, "gone")
    (gone / "config.json").unlink()
    proc = ok(resume(gone))  # the saved run's 6 steps, not the defaults' 300
    assert "config.json is missing" in proc.stdout and record(gone)["train"]["max_steps"] == 6
    assert [r["step"] for r in metrics(gone)] == list(range(1, 7))

    both = copy_of(finished, tmp_path, "both")
    (both / "config.json").write_text("[]")
    (both / "checkpoints" / "global_step6" / "megapix_config.json").write_text('{"model": {}')
    before = tree_hash(both)
    line = refused(resume(both), "config.json does not hold a JSON object", "megapix_config.json",
                   "restore", "never continues with default settings")
    assert tree_hash(both) == before, line
    # its hint: restore config.json (here from the copy it was made from). The damaged tag is then refused on its
    # own, and that error's hint (write the newest complete tag into `latest`) resumes from step 4 as it was
    shutil.copy(finished[0] / "config.json", both / "config.json")
    before = tree_hash(both)
    line = refused(resume(both, "--max-steps", 8), "cannot resume global_step6", "megapix_config.json")
    assert "write 'global_step4' into" in line and tree_hash(both) == before, line
    (both / "checkpoints" / "latest").write_text("global_step4")
    ok(resume(both, "--max-steps", 8))
    assert record(both)["train"]["seed"] == 3 and [r["step"] for r in metrics(both)] == list(range(1, 9))
    reference = lrs(copy_of(finished, tmp_path, "reference"))
    assert all(lrs(both)[s] == reference[s] for s in range(1, 5))
    assert all(lrs(both)[s] == pytest.approx(cosine_lr(0.002, 2, 8, s), rel=1e-12) for s in range(5, 9))


@pytest.mark.slow
def test_a_lock_or_record_that_is_a_link_is_never_written_through(finished, tmp_path):
    users = tmp_path / "users_file.txt"
    users.write_text("the user's own file\n")
    out = copy_of(finished, tmp_path)
    os.symlink(users, out / ".megapix.lock")
    before = tree_hash(tmp_path)
    refused(resume(out), ".megapix.lock is a symbolic link megapix did not make")
    assert users.read_text() == "the user's own file\n" and tree_hash(tmp_path) == before


@pytest.mark.slow
def test_resume_if_exists_into_a_folder_with_a_users_metrics_changes_nothing(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"step": 3, "acc": 0.5}\n')
    before = tree_hash(tmp_path)
    refused(train(mine, *TINY, "--resume-if-exists", "--max-steps", 2), "--resume-if-exists",
            "holds files megapix did not write")
    assert tree_hash(tmp_path) == before


@pytest.mark.slow
def test_a_torn_saved_tags_json_stops_pruning_with_a_warning_and_operational_flags_may_change(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    ck = out / "checkpoints"
    (ck / "saved_tags.json").write_text('{"format": "megapix-saved-tags", "tags": {"global_st')
    torn = (ck / "saved_tags.json").read_text()
    # --collective-timeout and --context-parallel are operational: they may change on a resume
    proc = ok(resume(out, "--max-steps", 10, "--keep-last", 1, "--save-every", 2, "--collective-timeout", 60,
                     "--context-parallel", 1))
    warned = [ln for ln in proc.stdout.splitlines() if "saved_tags.json is torn" in ln]
    assert len(warned) == 1 and "not pruning" in warned[0], proc.stdout[-3000:]
    assert (ck / "saved_tags.json").read_text() == torn
    tags = sorted(p.name for p in ck.iterdir() if p.name.startswith("global_step") and "." not in p.name)
    assert tags == [f"global_step{s}" for s in (10, 2, 4, 6, 8)], tags  # nothing pruned
    assert record(out)["train"]["collective_timeout"] == 60


@pytest.mark.slow
@pytest.mark.parametrize("batches", [[-5], [True], "x", [2, 2]])
def test_invalid_skipped_batches_are_refused_naming_the_file(finished, tmp_path, batches):
    out = copy_of(finished, tmp_path)
    path = out / "checkpoints" / "global_step6" / "skipped_batches.json"
    path.write_text(json.dumps({"batches": batches}))
    before = tree_hash(out)
    refused(resume(out, "--max-steps", 8), "skipped_batches.json: field 'batches'", "damaged")
    assert tree_hash(out) == before


def test_resume_settings_list_the_operational_flags():
    from megapix.commands.train import build_parser

    text = " ".join(build_parser().format_help().split())
    steer = text[text.index("may change:"):text.index("any other setting")]
    for flag in ("--collective-timeout", "--context-parallel", "--sequence-parallel", "--tensor-parallel"):
        assert flag in steer, (flag, steer)


def test_a_lock_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """An immutable or foreign lock file (EPERM/EACCES when opened) is one line, not a PermissionError."""
    from megapix import runfolder
    from megapix.config import ConfigError

    lock = tmp_path / ".megapix.lock"
    lock.write_text("")
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path) == str(lock):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    with pytest.raises(ConfigError, match=r"\.megapix\.lock cannot be written \(Operation not permitted\): remove it"):
        runfolder._open_lock(str(lock))


def test_schedule_apply_sets_every_group_and_keeps_an_unchanged_resume_exact():
    import torch

    from megapix.checkpoint.schedule import Schedule

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.002)
    old = Schedule(0.002, 2, 6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, old.factor)
    for _ in range(6):
        opt.step()
        sched.step()

    class Engine:
        lr_scheduler = sched

    assert old.apply(Engine, 6) is None  # the same settings: nothing touched
    new = Schedule(0.03, 2, 10)
    line = new.apply(Engine, 6)
    assert "step 7 trains at lr" in line and "had 0" in line
    assert [g["lr"] for g in opt.param_groups] == [new.lr_at(6)] * 2
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [new.lr_at(7)] * 2


@pytest.mark.parametrize("args,words", [
    (["--seeds", "-1"], ["--seeds '-1'", ">= 0"]),
    (["--seeds", "0,x"], ["--seeds '0,x'"]),
    (["--out", "{tmp}/afile"], ["afile is a file", "choose another --out"]),
    (["--report", "{tmp}/afile/r"], ["afile is a file", "choose another --report"]),
    (["--steps", "0"], ["--steps 0"]),
    (["--attentive-epochs", "0"], ["--attentive-epochs 0", "1 or more"]),
    (["--out", "{tmp}/torn", "--seeds", "0"], ["result.json is torn", "move it away"]),
    (["--out", "{tmp}/partial", "--seeds", "0"], ["result.json is partial", "'chance'"]),
    (["--out", "{tmp}/stale", "--seeds", "0", "--no-bert", "--no-finetune", "--no-attentive"],
     ["other settings", "--steps 300"]),
])
def test_probe_study_bad_inputs_are_one_line(tmp_path, args, words):
    (tmp_path / "afile").write_text("a file\n")
    for name, text in (("torn", '{"seed": 0'), ("partial", '{"seed": 0, "ar": {}}'),
                       ("stale", json.dumps({k: {} for k in ("chance", "counts", "raw_pixels", "random_init",
                                                              "checkpoints", "timings")} | {"seed": 0,
                                                              "ar": {"step": 100, "layers": [{}] * 9}}))):
        (tmp_path / name / "seed0").mkdir(parents=True)
        (tmp_path / name / "seed0" / "result.json").write_text(text)
    before = tree_hash(tmp_path)
    proc = subprocess.run([PYTHON, os.path.join(REPO, "examples", "small_scale_probe.py"),
                           *[a.replace("{tmp}", str(tmp_path)) for a in args]], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    refused(proc, "small_scale_probe.py: error:", *words)
    assert tree_hash(tmp_path) == before
