"""Checkpoints and outputs are safe under every input and every kill (issue 10):
- a crafted checkpoint whose .pt would run code is refused by every entry point, and the code never runs;
- truncated/empty state files, a `latest` naming a missing or empty tag, truncated JSON records: one line naming
  the file and the previous complete tag;
- a kill (SIGKILL) in the middle of a save leaves `latest` on a complete tag, and the run resumes bit-exactly;
- re-saving the tag `latest` names (a finished run resumed) leaves its files untouched;
- export/sample never replace a directory they did not write (checked by hash); a previous export may be replaced.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from test_parallel_helpers import ROOT, SAVE_AT, STEPS, TRAIN, env, layout_config, layout_run, losses, micro_config
from conftest import tree_hash

pytestmark = pytest.mark.slow  # every test here starts training runs

PY = sys.executable


def megapix(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "megapix", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def train(out, *args, script=None, timeout=600) -> subprocess.CompletedProcess:
    """One-process training (plain python) with the layout tests' micro config."""
    cmd = [PY, script or TRAIN, "--config", layout_config(), "--out", str(out), "--no-samples", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def error_line(proc) -> str:
    """The one line a refusal prints: exit 2, no traceback, one non-log line on stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def copy_run(name, dst):
    shutil.copytree(layout_run(name), dst)
    return dst


# ---- nothing from a user path executes code -------------------------------------------------------------------

class Payload:
    """Unpickling this creates the marker file (what an attacker's os.system would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_run(folder, marker, zero_stage: int):
    """A run folder whose only checkpoint carries a payload: in the model states (ZeRO-0) or in the optimizer
    states (ZeRO-1, where export reads the fp32 masters through DeepSpeed's tool)."""
    cfg = micro_config()
    cfg["train"]["zero_stage"] = zero_stage
    from megapix.config import Config

    cfg = Config.from_dict(cfg).to_dict()
    tag = folder / "checkpoints" / "global_step3"
    tag.mkdir(parents=True)
    (folder / "checkpoints" / "latest").write_text("global_step3")
    (tag / "megapix_config.json").write_text(json.dumps(cfg))
    (tag / "layout.json").write_text(json.dumps({"step": 3, "world": 1, "tp": 1, "pp": 1, "dp": 1,
                                                 "zero_stage": zero_stage}))
    from megapix import ImageGPT
    from megapix.config import Config as C

    module = {f"model.{k}": v for k, v in ImageGPT(C.from_dict(cfg).model).state_dict().items()}
    model_states = {"module": module, "step": 3}
    if zero_stage == 0:
        model_states["payload"] = Payload(marker)
    else:
        torch.save({"optimizer_state_dict": {"payload": Payload(marker)}, "ds_version": "0.19.8"},
                   tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save(model_states, tag / "mp_rank_00_model_states.pt")
    return folder


def test_the_payload_is_live(tmp_path):
    """The crafted file does run code when unpickled without weights_only (so the tests below can fail)."""
    marker = tmp_path / "ran"
    run = crafted_run(tmp_path / "run", marker, 0)
    torch.load(run / "checkpoints" / "global_step3" / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


ENTRY_POINTS = {
    "export": lambda run, tmp: ["export", str(run), str(tmp / "exported")],
    "sample": lambda run, tmp: ["sample", str(run), "--out", str(tmp / "s.png")],
    "extract": lambda run, tmp: ["extract", "--checkpoint", str(run), "--data", "synthetic:16", "--out",
                                 str(tmp / "feats")],
    "finetune": lambda run, tmp: ["finetune", "--checkpoint", str(run), "--data", "synthetic:16", "--out",
                                  str(tmp / "ft")],
    "probe --attentive": lambda run, tmp: ["probe", "--attentive", "--checkpoint", str(run), "--data",
                                           "synthetic:16", "--out", str(tmp / "att")],
}


@pytest.mark.parametrize("zero_stage", [0, 1])
@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "train --resume"])
def test_crafted_checkpoint_never_runs_its_payload(tmp_path, entry, zero_stage):
    if entry == "train --resume" and zero_stage == 1:
        pytest.skip("one resume case suffices: resume checks every file of the tag the same way")
    marker = tmp_path / "ran"
    run = crafted_run(tmp_path / "run", marker, zero_stage)
    before = tree_hash(run)
    if entry == "train --resume":
        proc = train(run, "--resume")
    else:
        proc = megapix(*ENTRY_POINTS[entry](run, tmp_path))
    line = error_line(proc)
    assert "allow-list" in line and "_states.pt" in line, line
    assert not marker.exists()
    assert tree_hash(run) == before


# ---- a torn checkpoint is named, with the previous complete tag ------------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated model states": (lambda t: _truncate(t / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt"),
    "empty model states": (lambda t: (t / "mp_rank_00_model_states.pt").write_bytes(b""), "0 bytes"),
    "truncated layout.json": (lambda t: _truncate(t / "layout.json"), "layout.json"),
    "truncated megapix_config.json": (lambda t: _truncate(t / "megapix_config.json"), "megapix_config.json"),
    "latest names a missing tag": (lambda t: (t.parent / "latest").write_text("global_step9"), "global_step9"),
    "latest is empty": (lambda t: (t.parent / "latest").write_text(""), "latest"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_checkpoint_names_the_file_and_the_previous_complete_tag(tmp_path, case):
    run = copy_run("single", tmp_path / "run")
    corrupt, words = CORRUPTIONS[case]
    corrupt(run / "checkpoints" / f"global_step{STEPS}")
    before = tree_hash(run)
    for proc in (megapix("export", str(run), str(tmp_path / "exported")), train(run, "--resume")):
        line = error_line(proc)
        assert words in line and f"global_step{SAVE_AT}" in line, line
    assert tree_hash(run) == before and not (tmp_path / "exported").exists()


def test_resume_with_no_checkpoint_says_it_starts_fresh(tmp_path):
    """A run folder with a metrics log but no checkpoint (killed before its first save) resumes from step 0, and
    says so; --resume into a folder with no run at all is an error unless --resume-if-exists."""
    line = error_line(train(tmp_path / "new", "--resume", "--max-steps", "1"))
    assert "holds no run to continue" in line and "--resume-if-exists" in line, line
    assert not (tmp_path / "new").exists()
    proc = train(tmp_path / "new", "--resume-if-exists", "--max-steps", "1")
    # the summary's "continue" line says --resume, and this test's own folder name holds "resume"
    before_summary = proc.stdout.split("\nnext:")[0].replace(str(tmp_path), "").lower()
    assert proc.returncode == 0 and "resum" not in before_summary, proc.stdout[-2000:] + proc.stderr[-3000:]
    shutil.rmtree(tmp_path / "new" / "checkpoints")
    proc = train(tmp_path / "new", "--resume", "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no checkpoint in" in proc.stdout and "starting from step 0" in proc.stdout, proc.stdout


def test_latest_step(tmp_path):
    from megapix.checkpoint import latest_step

    assert latest_step(str(tmp_path / "none")) is None
    run = copy_run("single", tmp_path / "run")
    ck = run / "checkpoints"
    assert latest_step(str(ck)) == STEPS
    (ck / "latest").unlink()  # a run is still there when `latest` was deleted
    assert latest_step(str(ck)) == STEPS


# ---- kills during a save -------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

def save(self, state_dict, path):  # SIGKILL halfway through writing the first file of the armed tag
    if {tag!r} in path:
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04 torn")
        os.kill(os.getpid(), signal.SIGKILL)
    return ORIGINAL(self, state_dict, path)

ORIGINAL, TorchCheckpointEngine.save = TorchCheckpointEngine.save, save
from megapix.commands.train import main
sys.exit(main(sys.argv[1:]))
"""


def killer(tmp_path, tag) -> str:
    path = tmp_path / f"kill_{tag}.py"
    path.write_text(KILLER.format(root=ROOT, tag=tag))
    return str(path)


def test_sigkill_during_a_save_keeps_latest_on_a_complete_tag_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    proc = train(run, "--save-every", str(SAVE_AT), script=killer(tmp_path, f"global_step{STEPS}"))
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"global_step{SAVE_AT}"
    assert not (ck / f"global_step{STEPS}").exists()  # the torn write is only in the staging folder
    proc = train(run, "--save-every", str(SAVE_AT), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ck / "latest").read_text().strip() == f"global_step{STEPS}"
    assert not any(p.name.endswith(".saving") for p in ck.iterdir())
    assert losses(run) == losses(layout_run("single"))  # bit for bit: the resumed run is the uninterrupted one


def test_resaving_the_latest_tag_never_writes_it(tmp_path):
    """Resuming a finished run saves the same step again: the tag `latest` names keeps its files (a kill armed for
    any write of that tag never fires), so a kill during that save cannot tear the only checkpoint."""
    run = copy_run("single", tmp_path / "run")
    tag = run / "checkpoints" / f"global_step{STEPS}"
    before = tree_hash(tag)
    proc = train(run, "--resume", script=killer(tmp_path, f"global_step{STEPS}"))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert tree_hash(tag) == before  # the engine knows the step is saved; store.save would skip it too


def test_save_replaces_a_torn_tag_that_latest_does_not_name(tmp_path):
    """A tag left incomplete by an old crash (not named by `latest`) is moved aside, never written into."""
    run = copy_run("single", tmp_path / "run")
    ck = run / "checkpoints"
    (ck / "latest").write_text(f"global_step{SAVE_AT}")
    _truncate(ck / f"global_step{STEPS}" / "mp_rank_00_model_states.pt")
    torn = tree_hash(ck / f"global_step{STEPS}")
    proc = train(run, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ck / "latest").read_text().strip() == f"global_step{STEPS}"
    assert tree_hash(ck / f"global_step{STEPS}.replaced-1") == torn
    from megapix.checkpoint.tags import problem

    assert problem(str(ck), f"global_step{STEPS}", deep=True) is None


# ---- outputs never replace what the command did not write ----------------------------------------------------

@pytest.mark.parametrize("case", ["export RUN RUN", "export RUN DIR", "sample RUN --out RUN"])
def test_outputs_never_replace_a_users_directory(tmp_path, case):
    run = copy_run("single", tmp_path / "run")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("the user's file")
    args = {"export RUN RUN": ["export", str(run), str(run)],
            "export RUN DIR": ["export", str(run), str(other)],
            "sample RUN --out RUN": ["sample", str(run), "--out", str(run), "--n", "1"]}[case]
    before = tree_hash(tmp_path)
    line = error_line(megapix(*args))
    assert "refusing" in line or "never replaces" in line or "is a directory" in line, line
    assert tree_hash(tmp_path) == before


def test_export_may_replace_an_earlier_export_and_fills_an_empty_dir(tmp_path):
    run = layout_run("single")
    out = tmp_path / "exported"
    out.mkdir()  # empty: nothing to lose
    assert megapix("export", str(run), str(out)).returncode == 0
    assert json.loads((out / "megapix_export.json").read_text())["megapix_export"] == 1
    proc = megapix("export", str(run), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out / "notes.txt").write_text("added by the user")  # no longer only an export: refused
    error_line(megapix("export", str(run), str(out)))
    assert (out / "notes.txt").read_text() == "added by the user"


def test_atomic_path_refuses_a_file_onto_a_directory(tmp_path):
    from megapix.config import ConfigError
    from megapix.utils import atomic_path

    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="never replaces a directory"):
        with atomic_path(str(tmp_path / "d")) as tmp:
            open(tmp, "w").close()
    assert (tmp_path / "d").is_dir() and os.listdir(tmp_path) == ["d"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        with atomic_path(str(tmp_path / "f" / "g")) as tmp:
            pass


# ---- export goes through the universal checkpoint: fp32 masters ----------------------------------------------

def test_bf16_tp2_export_holds_the_fp32_masters(tmp_path):
    """A bf16 ZeRO-1 TP2 run (DeepSpeed's bf16 runs on CPU): export goes through DeepSpeed's universal checkpoint
    and yields the fp32 master weights. DeepSpeed's bf16 optimizer copies masters into the module after each step,
    so every module weight is its master rounded to bf16: the export must round to exactly the module weights while
    holding bits bf16 cannot (module weights would not)."""
    from megapix import ImageGPT
    from megapix.checkpoint.consolidate import module_state_dict
    from megapix.checkpoint.load import locate, read_config
    from test_parallel_helpers import run_train

    run = tmp_path / "bf16"
    run_train(run, 2, "--tensor-parallel", "2", "--zero-stage", "1", "--precision", "bf16", "--max-steps", "2",
              config=layout_config())
    root, tag = locate(str(run))
    cfg = read_config(root, tag)
    module = module_state_dict(root, tag, cfg)
    assert megapix("export", str(run), str(tmp_path / "exported")).returncode == 0
    exported = ImageGPT.from_pretrained(str(tmp_path / "exported")).state_dict()
    assert exported.keys() == module.keys()
    for k, w in exported.items():
        assert w.dtype == torch.float32
        assert torch.equal(w.bfloat16().float(), module[k]), k
    assert sum((w.bfloat16().float() != w).sum().item() for w in exported.values()) > 0.5 * sum(
        w.numel() for w in exported.values())


def test_resume_with_another_model_names_what_wrote_the_checkpoint(tmp_path):
    """--resume with other model settings: one line naming the model that wrote the checkpoint, nothing written;
    another --kernels is not another model."""
    run = copy_run("single", tmp_path / "run")
    before = tree_hash(run)
    # the saved run's config is the resume's: a contradicting model flag names both values
    line = error_line(train(run, "--resume", "--n-layer", "4", "--d-model", "128"))
    assert "model.n_layer 2 -> 4" in line and "model.d_model 64 -> 128" in line and "--allow-changed" in line, line
    assert tree_hash(run) == before
    # --allow-changed cannot make a checkpoint another model: the check of the checkpoint itself still refuses
    line = error_line(train(run, "--resume", "--model", "tiny", "--n-layer", "4", "--d-model", "128",
                            "--n-head", "4", "--allow-changed"))
    assert "was written for a custom model (2 layers, d 64" in line and "this run builds preset tiny" in line, line
    assert tree_hash(run) == before
