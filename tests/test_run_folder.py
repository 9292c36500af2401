"""A run folder is owned and guarded (issue 21): one writer at a time (flock, taken over after a kill -9), each
command writes only into its own kind of folder, --keep-last prunes only the tags this run recorded, a torn or
malformed best.json stops pruning, palette.json's sha256 is checked by every reader, records with wrong types
are one line, and a full or read-only disk is one line with exit 2 and nothing half-written.

Every refusal row checks the exit code, the one error line's words, and that no file under the test folder
changed (by hash). One trained run (test_parallel_helpers' "single" layout, shared with other modules) is copied
into each case; only three tests start a training of their own."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
from conftest import PYTHON, REPO, subprocess_env, tree_hash

from megapix import runfolder
from megapix.cli import main
from megapix.config import ConfigError
from test_parallel_helpers import STEPS, TRAIN, layout_config, layout_run

def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and "[WARNING]" not in ln and "warn(" not in ln
            and "UserWarning" not in ln]


def one_line(code, err, expected=2) -> str:
    assert code == expected, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in error_lines(err) if "error:" in ln]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def cli(argv, capsys, monkeypatch, cwd):
    import torch

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="session")
def trained():
    """The out folder of one tiny run (6 steps, tags global_step3 and global_step6, best.json)."""
    return layout_run("single")


def copy_run(trained, dst):
    shutil.copytree(trained, dst)
    return str(dst)


# ---- one writer at a time ---------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from megapix import runfolder
runfolder.claim(sys.argv[1], "train", "megapix train")
print("held", flush=True)
time.sleep(600)
"""


def hold(out, wait=True, whole=False):
    """A process that holds `out`'s lock until killed."""
    code = HOLDER.replace('"train", "megapix train"', '"export", "megapix export", whole=True') if whole else HOLDER
    proc = subprocess.Popen([PYTHON, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env=subprocess_env())
    if wait:
        assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_pid_and_host_and_a_killed_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        with pytest.raises(ConfigError) as e:
            runfolder.claim(str(out), "train", "megapix train")
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and f"host {os.uname().nodename}" in msg and "megapix train" in msg, msg
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays, the kernel drops the flock
        holder.wait()
    assert (out / runfolder.LOCK_NAME).exists()
    runfolder.claim(str(out), "train", "megapix train")  # the stale lock is taken over
    try:
        rec = json.loads((out / runfolder.LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid()
    finally:
        runfolder.release_all()
    assert os.listdir(out) == [], "the release unlinks the lock file"
    os.rmdir(out)
    runfolder.claim(str(out / "a" / "b"), "train", "megapix train")
    runfolder.release_all()
    assert not out.exists(), "a claim that made --out (and its parents) and left nothing there removes them again"


def test_every_writing_command_refuses_a_held_out(tmp_path, trained, capsys, monkeypatch):
    """The lock is taken by every command that writes (in-process rows; train also as a process below)."""
    run = copy_run(trained, tmp_path / "run")
    holders = {name: hold(tmp_path / name, wait=False, whole=name == "hf") for name in ("ft", "feat", "shards", "hf")}
    try:
        for p in holders.values():  # started together, waited for together
            assert p.stdout.readline().strip() == "held"
        before = tree_hash(tmp_path)
        for argv in (["finetune", "--checkpoint", run, "--out", str(tmp_path / "ft"), "--max-steps", "1"],
                     ["extract", "--checkpoint", run, "--out", str(tmp_path / "feat")],
                     ["prepare", "--data", "digits", "--fit-palette", "--resolution", "8", "--out",
                      str(tmp_path / "shards")],
                     ["export", "--checkpoint", run, "--out", str(tmp_path / "hf")]):
            line = one_line(*cli(argv, capsys, monkeypatch, tmp_path))
            assert "is being written by" in line and "pid" in line and "host" in line, (argv[0], line)
        assert tree_hash(tmp_path) == before
    finally:
        for p in holders.values():
            p.kill()
            p.wait()


@pytest.mark.slow
def test_two_trainings_started_together_into_one_out_one_refuses(tmp_path):
    out = tmp_path / "run"
    cmd = [PYTHON, TRAIN, "--config", layout_config(), "--out", str(out), "--no-samples"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], [(c, e[-2000:]) for c, e in results]
    refused = next(e for c, e in results if c == 2)
    line = one_line(2, refused)
    assert "is being written by" in line or "already holds a run" in line, line
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "one run's curve, each step once"
    assert not (out / runfolder.LOCK_NAME).exists(), "the finished run released its lock"


# ---- folder kinds, records, small fixes: refusal rows -----------------------------------------------------------

def _case_folders(tmp, trained):
    run = copy_run(trained, tmp / "run")
    (tmp / "user").mkdir()
    (tmp / "user" / "notes.txt").write_text("a user's notes\n")
    swapped = copy_run(trained, tmp / "swapped")
    centres = np.load(os.path.join(swapped, "palette.npy"))
    np.save(os.path.join(swapped, "palette.npy"), centres[::-1].copy())
    badsha = copy_run(trained, tmp / "badsha")
    rec = json.loads(open(os.path.join(badsha, "palette.json")).read())
    rec["sha256"] = 12
    with open(os.path.join(badsha, "palette.json"), "w") as f:
        json.dump(rec, f)
    (tmp / "badcfg").mkdir()
    (tmp / "badcfg" / "config.json").write_text('{"config": [1, 2]}')
    (tmp / "badsec").mkdir()
    (tmp / "badsec" / "config.json").write_text('{"config": {"model": "tiny", "data": {}, "train": {}}}')
    return run


CASES = [
    ("finetune-into-its-checkpoint-run", ["finetune", "--checkpoint", "{tmp}/run", "--out", "{tmp}/run"],
     ["{tmp}/run", "holds a training run", "megapix finetune"]),
    ("prepare-into-a-run", ["prepare", "--data", "digits", "--fit-palette", "--resolution", "8", "--out", "{tmp}/run"],
     ["holds a training run", "megapix prepare"]),
    ("extract-into-a-run", ["extract", "--checkpoint", "{tmp}/run", "--out", "{tmp}/run"],
     ["holds a training run", "megapix extract"]),
    ("finetune-into-user-files", ["finetune", "--checkpoint", "{tmp}/run", "--out", "{tmp}/user"],
     ["{tmp}/user", "files megapix did not write"]),
    ("prepare-into-user-files", ["prepare", "--data", "digits", "--fit-palette", "--resolution", "8", "--out",
                                 "{tmp}/user"], ["files megapix did not write"]),
    ("extract-into-user-files", ["extract", "--checkpoint", "{tmp}/run", "--out", "{tmp}/user"],
     ["files megapix did not write"]),
    ("train-into-prepared-shards", ["train", "--out", "{tmp}/shards"], ["holds prepared token shards"]),
    ("finetune-max-steps-0", ["finetune", "--checkpoint", "{tmp}/run", "--out", "{tmp}/ft", "--max-steps", "0"],
     ["--max-steps 0", ">= 1"]),
    ("sample-swapped-palette", ["sample", "--checkpoint", "{tmp}/swapped", "--out", "{tmp}/s.png"],
     ["swapped/palette.npy", "sha256", "palette.json"]),
    ("extract-swapped-palette", ["extract", "--checkpoint", "{tmp}/swapped", "--out", "{tmp}/f"],
     ["swapped/palette.npy", "sha256"]),
    ("export-swapped-palette", ["export", "--checkpoint", "{tmp}/swapped", "--out", "{tmp}/hf"],
     ["swapped/palette.npy", "sha256"]),
    ("finetune-swapped-palette", ["finetune", "--checkpoint", "{tmp}/swapped", "--out", "{tmp}/ft"],
     ["swapped/palette.npy", "sha256"]),
    ("palette-json-sha-wrong-type", ["sample", "--checkpoint", "{tmp}/badsha", "--out", "{tmp}/s.png"],
     ["badsha/palette.json", "field 'sha256'"]),
    ("config-json-not-an-object", ["train", "--out", "{tmp}/badcfg"], ["badcfg/config.json", "field 'config'"]),
    ("config-json-section-not-an-object", ["train", "--out", "{tmp}/badsec"],
     ["badsec/config.json", "field 'config.model'"]),
]


@pytest.mark.parametrize("rid,argv,words", CASES, ids=[c[0] for c in CASES])
def test_refusal(rid, argv, words, tmp_path, trained, capsys, monkeypatch):
    _case_folders(tmp_path, trained)
    if rid == "train-into-prepared-shards":
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "manifest.json").write_text('{"format": "megapix-shards", "complete": true}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = tree_hash(tmp_path)
    dirs_before = sorted(p for p, _, _ in os.walk(tmp_path))
    line = one_line(*cli(argv, capsys, monkeypatch, tmp_path))
    for w in words:
        assert w.replace("{tmp}", str(tmp_path)) in line, (w, line)
    assert tree_hash(tmp_path) == before, "files were created or changed"
    assert sorted(p for p, _, _ in os.walk(tmp_path)) == dirs_before, "folders were created"


def test_export_accepts_a_finetune_best_model(tmp_path, capsys, monkeypatch):
    """A fine-tuning's best_model/ is an HF directory: exported as it is (copied, checked, marked)."""
    import torch

    from megapix.config import model_preset
    from megapix.model import ImageGPT
    from megapix.model.hf import save_classifier_pretrained

    cfg = model_preset("tiny")
    model = ImageGPT(cfg)
    best = tmp_path / "ft" / "best_model"
    save_classifier_pretrained(model.state_dict(), cfg, torch.zeros(10, cfg.d_model), str(best))
    code, err = cli(["export", "--checkpoint", str(best), "--out", str(tmp_path / "hf")], capsys, monkeypatch,
                    tmp_path)
    assert code == 0, err
    for name in os.listdir(best):
        assert (tmp_path / "hf" / name).read_bytes() == (best / name).read_bytes()
    assert json.loads((tmp_path / "hf" / "megapix_export.json").read_text())["megapix_export"] == 1
    code, err = cli(["export", "--checkpoint", str(best), "--out", str(tmp_path / "hf")], capsys, monkeypatch,
                    tmp_path)
    assert code == 0, err  # an earlier export is replaced, as ever


def test_folder_kinds(tmp_path, trained):
    run = copy_run(trained, tmp_path / "run")
    assert runfolder.folder_kind(run) == "train"
    assert runfolder.folder_kind(str(tmp_path / "none")) is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / runfolder.LOCK_NAME).write_text("")
    assert runfolder.folder_kind(str(tmp_path / "empty")) is None
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "metrics.jsonl").write_text('{"lr_run": 0.001, "step": 1}\n')
    assert runfolder.folder_kind(str(tmp_path / "ft")) == "finetune"
    (tmp_path / "sh").mkdir()
    (tmp_path / "sh" / "palette.npy").write_bytes(b"x")
    (tmp_path / "sh" / "train-00000.npy").write_bytes(b"x")
    assert runfolder.folder_kind(str(tmp_path / "sh")) == "prepare"  # a prepare killed before its manifest
    (tmp_path / "pal").mkdir()
    for n in ("palette.npy", "palette.json"):
        (tmp_path / "pal" / n).write_bytes(b"x")
    assert runfolder.folder_kind(str(tmp_path / "pal")) == "palette"
    runfolder.check_kind(str(tmp_path / "pal"), "finetune", "megapix finetune")  # a fine-tuning killed after its fit


# ---- pruning: only what this run wrote ------------------------------------------------------------------------

def _tags(ckpt):
    return sorted(n for n in os.listdir(ckpt) if n.startswith("global_step"))


def test_prune_deletes_only_tags_this_run_recorded(tmp_path, trained, capsys):
    from megapix.checkpoint import deleter
    from megapix.checkpoint.store import prune, saved_here

    run = copy_run(trained, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints")
    assert _tags(ckpt) == ["global_step3", "global_step6"] and all(saved_here(ckpt, t) for t in _tags(ckpt))
    other = copy_run(trained, tmp_path / "other")
    for tag, record in (("global_step3", {"save_id": "another-run", "step": 3}), ("global_step6", None)):
        path = os.path.join(other, "checkpoints", tag, "megapix_saved.json")  # another run's, or an older megapix's
        if record is None:
            os.remove(path)
        else:
            with open(path, "w") as f:
                json.dump(record, f)
    shutil.copytree(os.path.join(other, "checkpoints", "global_step6"), os.path.join(ckpt, "global_step2"))  # copied in
    shutil.copytree(os.path.join(ckpt, "global_step3"), os.path.join(ckpt, "global_step030"))  # a user's renamed copy
    shutil.rmtree(os.path.join(ckpt, "global_step3"))  # restored from a backup of another run
    shutil.copytree(os.path.join(other, "checkpoints", "global_step3"), os.path.join(ckpt, "global_step3"))
    os.remove(os.path.join(ckpt, "best.json"))
    before = tree_hash(ckpt)
    assert prune(ckpt, 1, 30) == []
    assert tree_hash(ckpt) == before, "no tag of another run, nor a renamed one, is deleted"
    # a tag this run did save goes; `latest`'s and the best's stay whatever their age
    fresh = copy_run(trained, tmp_path / "fresh")
    ckpt = os.path.join(fresh, "checkpoints")
    best = json.loads(open(os.path.join(ckpt, "best.json")).read())["tag"]
    deleted = prune(ckpt, 1, 6)
    deleter.wait()  # pruned tags are renamed out of the run, then freed in the background
    assert set(_tags(ckpt)) == {"global_step6", best} and set(deleted) == {"global_step3"} - {best}
    assert "global_step3" not in json.loads(open(os.path.join(ckpt, "saved_tags.json")).read())["tags"] or \
        best == "global_step3"


@pytest.mark.parametrize("content,field", [("{\"tag\": \"global_st", "torn"),
                                           ('{"tag": "global_step3", "step": "x", "score": 1.0}', "field 'step'"),
                                           ('{"tag": "global_step3", "step": 3, "score": "high"}', "field 'score'"),
                                           ('["global_step3"]', "JSON object")])
def test_a_torn_or_malformed_best_json_stops_pruning_with_a_warning(tmp_path, trained, capsys, content, field):
    from megapix.checkpoint import store

    run = copy_run(trained, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints")
    with open(os.path.join(ckpt, "best.json"), "w") as f:
        f.write(content)
    store._WARNED.clear()
    before = tree_hash(ckpt)
    assert store.prune(ckpt, 1, 6) == []
    store.write_best(ckpt, "global_step6", 6, {"val_loss": 1.0}, -1.0)  # never replaces it: it may name the best
    assert store.read_best(ckpt) is None
    assert tree_hash(ckpt) == before
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "best.json" in warnings[0] and field in warnings[0] and "not pruning" in \
        warnings[0], out


@pytest.mark.slow
def test_resume_with_keep_last_keeps_copied_in_and_renamed_tags_and_the_best_of_a_torn_best_json(tmp_path, trained):
    run = copy_run(trained, tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints")
    other = copy_run(trained, tmp_path / "other")
    shutil.copytree(os.path.join(other, "checkpoints", "global_step3"), os.path.join(ckpt, "global_step2"))
    shutil.copytree(os.path.join(ckpt, "global_step3"), os.path.join(ckpt, "global_step030"))
    best = os.path.join(ckpt, "best.json")
    torn = open(best).read()[:20]
    with open(best, "w") as f:
        f.write(torn)
    proc = subprocess.run([PYTHON, TRAIN, "--config", layout_config(), "--out", run, "--no-samples", "--resume",
                           "--max-steps", str(STEPS + 2), "--save-every", "1", "--keep-last", "1"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stdout.splitlines() if "warning" in ln and "best.json" in ln]
    assert len(warnings) == 1 and "not pruning" in warnings[0], proc.stdout[-3000:]
    assert set(_tags(ckpt)) >= {"global_step2", "global_step030", "global_step3", "global_step6"}
    assert open(best).read() == torn
    # the same resume with a sound best.json prunes this run's own older tags only
    os.remove(best)
    proc = subprocess.run([PYTHON, TRAIN, "--config", layout_config(), "--out", run, "--no-samples", "--resume",
                           "--max-steps", str(STEPS + 3), "--keep-last", "1"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_tags(ckpt)) == {"global_step2", "global_step030", f"global_step{STEPS + 3}"}, _tags(ckpt)


# ---- disks --------------------------------------------------------------------------------------------------------

def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs at tmp_path/disk (unmounted afterwards)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): the full-disk cases need one")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def read_only(tmp_path):
    """tmp_path/ro: a read-only bind mount of tmp_path/ro_src (unmounted afterwards)."""
    src, ro = tmp_path / "ro_src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if not _mount("--bind", str(src), str(ro)):
        pytest.skip("cannot bind-mount here (needs root or CAP_SYS_ADMIN): the read-only cases need one")
    try:
        if not _mount("-o", "remount,ro,bind", str(ro)):
            pytest.skip("cannot remount a bind mount read-only here")
        yield ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def fill(disk, leave: int) -> None:
    """Fill the tmpfs at `disk` until `leave` bytes are free."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(disk / "filler")
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))


def test_read_only_out_is_one_line_for_every_writing_command(read_only, trained, tmp_path, capsys, monkeypatch):
    run = copy_run(trained, tmp_path / "run")
    for argv in (["train", "--out", f"{read_only}/run", "--max-steps", "1"],
                 ["finetune", "--checkpoint", run, "--out", f"{read_only}/ft", "--max-steps", "1"],
                 ["extract", "--checkpoint", run, "--out", f"{read_only}/f"],
                 ["prepare", "--data", "digits", "--fit-palette", "--resolution", "8", "--out", f"{read_only}/sh"],
                 ["export", "--checkpoint", run, "--out", f"{read_only}/hf"],
                 ["sample", "--checkpoint", run, "--n", "1", "--out", f"{read_only}/s.png"]):
        line = one_line(*cli(argv, capsys, monkeypatch, tmp_path))
        assert "Read-only file system" in line and str(read_only) in line and "writable disk" in line, (argv, line)
    assert os.listdir(read_only) == []


def test_full_disk_export_sample_prepare_are_one_line_and_leave_nothing(small_disk, trained, tmp_path, capsys,
                                                                        monkeypatch):
    run = copy_run(trained, tmp_path / "run")
    for argv, target in ((["export", "--checkpoint", run, "--out", f"{small_disk}/hf"], "hf"),
                         (["sample", "--checkpoint", run, "--n", "8", "--out", f"{small_disk}/s.png"], "s.png"),
                         (["prepare", "--data", "digits", "--palette", f"{run}/palette.npy", "--resolution", "8",
                           "--out", f"{small_disk}/sh"], "sh/manifest.json")):
        fill(small_disk, 4 << 10)  # one page: the lock's record fits, the output does not
        line = one_line(*cli(argv, capsys, monkeypatch, tmp_path))
        assert "No space left on device" in line and str(small_disk) in line and "disk is full" in line, (argv, line)
        if argv[0] == "prepare":  # what prepare left is marked incomplete: no reader takes it for shards
            manifest = small_disk / target
            assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False
        else:
            assert not (small_disk / target).exists()
        assert not [n for n in os.listdir(small_disk) if n.startswith(".")], os.listdir(small_disk)
        shutil.rmtree(small_disk / "sh", ignore_errors=True)


def test_full_disk_extract_is_one_line_not_sigbus(small_disk, trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    fill(small_disk, 256 << 10)  # room for the small files, not for the features
    proc = subprocess.run([PYTHON, "-m", "megapix", "extract", "--checkpoint", run, "--out", f"{small_disk}/f"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != -signal.SIGBUS, "killed by SIGBUS"
    line = one_line(proc.returncode, proc.stderr)
    assert "No space left on device" in line and "features.npy.partial" in line, line
    assert not [n for n in os.listdir(small_disk / "f") if n.endswith("_features.npy") or n == "manifest.json"]


@pytest.mark.slow
def test_full_disk_during_training_is_one_line_and_latest_stays_complete(small_disk):
    from megapix.checkpoint.tags import problem, read_latest

    out = small_disk / "run"
    cmd = [PYTHON, TRAIN, "--config", layout_config(), "--out", str(out), "--no-samples", "--save-every", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    line = one_line(proc.returncode, proc.stderr)
    assert "No space left on device" in line and str(out) in line, line
    ckpt = str(out / "checkpoints")
    if os.path.isdir(ckpt):
        assert not [n for n in os.listdir(ckpt) if n.endswith(".saving")], os.listdir(ckpt)
        latest = read_latest(ckpt)
        assert latest is None or problem(ckpt, latest) is None
    proc = subprocess.run(cmd + ["--resume"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    line = one_line(proc.returncode, proc.stderr)
    assert "No space left on device" in line, line


def test_disk_error_lines():
    e = OSError(errno.EACCES, os.strerror(errno.EACCES), "/data/run/metrics.jsonl")
    assert str(runfolder.disk_error(e)) == ("cannot access /data/run/metrics.jsonl: Permission denied; choose paths "
                                            "you may read and write (--out), or fix their permissions")
    assert "Disk quota exceeded" in str(runfolder.disk_error(OSError(errno.EDQUOT, "x", "/q")))
    # a library's error that carries the text (safetensors), with the path given by the caller
    assert "cannot write into /out: No space left on device" in str(
        runfolder.disk_error(RuntimeError("I/O error: No space left on device (os error 28)"), "/out"))
    assert runfolder.disk_error(OSError(errno.ENOENT, "missing", "/x")) is None
    assert runfolder.disk_error(ValueError("bad")) is None
