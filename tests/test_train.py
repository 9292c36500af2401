"""`python megapix/train.py` end to end in subprocesses on a 2-layer d=64 model: outputs, learning, exact
resume, preemption (time budget, SIGUSR1), and one clear error line for each kind of bad input.

The first DeepSpeed start on a fresh machine JIT-builds a shm op (~90 s, then cached): timeouts are generous.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import (PYTHON, REPO, next_commands, run, run_as_printed, subprocess_env, tree_hash,
                      wait_for_first_metrics)

pytestmark = pytest.mark.slow  # every test here starts training runs

TRAIN = "megapix/train.py"
EXIT_PREEMPTED = 75
TIMEOUT = 400


def train(config, out, *args, timeout=TIMEOUT):
    return run([TRAIN, "--config", config, "--out", str(out), *map(str, args)], timeout=timeout)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def ok(proc, code=0):
    assert proc.returncode == code, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                     f"stderr:\n{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def latest_tag(out):
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        return f.read().strip()


def parallel(*thunks):
    """Run independent subprocess runs two at a time (each uses one thread)."""
    with ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(t) for t in thunks]]


def test_outputs_and_loss_decreases(tiny_config, tmp_path):
    out = tmp_path / "run"
    proc = train(tiny_config, out, "--max-steps", 40, "--eval-every", 20, "--global-batch", 32, "--log-every", 10)
    ok(proc)
    # not a terminal: plain progress lines every log_every steps, no bar redraws, and a summary saying what next
    assert "\r" not in proc.stdout
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("train step")] == \
        [f"train step {s}/40" for s in (10, 20, 30, 40)]
    assert "megapix: done at step 40: train loss" in proc.stdout and "val_loss" in proc.stdout
    assert f"megapix export --checkpoint {out}" in proc.stdout and os.path.join(str(out), "samples.png") in proc.stdout
    assert f"loss curve   {out / 'loss.png'}" in proc.stdout and "bits/dim" in proc.stdout
    assert "MFU against" in proc.stdout and "measured float32 matmul peak" in proc.stdout
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 41))
    for r in recs:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "peak_rss_gb", "mfu"} <= set(r)
        assert "peak_mem_gb" not in r  # CPU: the process's RSS, named as such
        assert np.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0
        assert r["bpd"] == pytest.approx(r["loss"] / np.log(2))  # bits per dim: nats per token / ln 2
        assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 and 0 < r["mfu"] and r["peak_rss_gb"] > 0.05
    assert [r["val_bpd"] == pytest.approx(r["val_loss"] / np.log(2)) for r in recs if "val_loss" in r] == [True] * 2
    assert abs(recs[0]["bpd"] - 9.0) < 0.05  # uniform over 512 colours: log2(512) bits
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["step"] for r in recs if "val_loss" in r] == [20, 40]
    assert all(np.isfinite(r["val_loss"]) for r in recs if "val_loss" in r)
    assert recs[-1]["lr"] < recs[5]["lr"]  # cosine decay
    first, last = np.mean([r["loss"] for r in recs[:5]]), np.mean([r["loss"] for r in recs[-5:]])
    assert abs(recs[0]["loss"] - np.log(512)) < 0.05  # zero head: uniform over 512 colours at step 1
    assert last < first - 0.2, (first, last)  # measured: 6.23 -> 5.84
    assert recs[-1]["val_loss"] < recs[0]["loss"] - 0.2

    assert latest_tag(out) == "global_step40"
    assert os.path.isdir(os.path.join(out, "checkpoints", "global_step40"))
    png = out / "samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.mode == "RGB" and img.width > 32 and img.height > 32


def test_resume_is_bit_exact_and_preemption_saves(tiny_config, tmp_path):
    # Warm-up longer than the run: the lr schedule is then the same whatever --max-steps says, so stopping
    # at step 3 and resuming to 6 must replay the uninterrupted run exactly.
    common = ("--no-samples", "--eval-every", 0, "--warmup-steps", 10)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ra, rb, rc = parallel(lambda: train(tiny_config, a, "--max-steps", 6, *common),
                          lambda: train(tiny_config, b, "--max-steps", 3, *common),
                          # A real interruption: the time budget stops this one after step 1.
                          lambda: train(tiny_config, c, "--max-steps", 6, *common, "--time-budget", 0.001))
    ok(ra), ok(rb)
    ok(rc, EXIT_PREEMPTED)
    assert "stop requested" in rc.stdout
    assert [r["step"] for r in metrics(c)] == [1] and latest_tag(c) == "global_step1"
    assert not (c / "samples.png").exists()

    rb2, rc2 = parallel(lambda: train(tiny_config, b, "--max-steps", 6, "--resume", *common),
                        lambda: train(tiny_config, c, "--max-steps", 6, *common, "--resume"))
    ok(rb2), ok(rc2)
    steps_a, steps_b = metrics(a), metrics(b)
    assert [r["step"] for r in steps_b] == list(range(1, 7))  # each step exactly once
    assert [r["loss"] for r in steps_b] == [r["loss"] for r in steps_a]  # bit for bit
    assert [r["lr"] for r in steps_b] == [r["lr"] for r in steps_a]
    assert latest_tag(b) == "global_step6"

    # The preempted run, resumed, equals the uninterrupted one too.
    assert [r["step"] for r in metrics(c)] == list(range(1, 7))
    assert [r["loss"] for r in metrics(c)] == [r["loss"] for r in steps_a]


def test_best_checkpoint_keep_last_and_resume(tiny_config, tmp_path):
    """A checkpoint at each new best val_loss, named by checkpoints/best.json; --keep-last 2 keeps the two newest
    step tags plus the best; a resume goes on from `latest` and still measures later evaluations against the best
    of the steps before it; the best tag loads as a model."""
    out = tmp_path / "run"
    ck = out / "checkpoints"
    common = ("--no-samples", "--eval-every", 2, "--save-every", 1, "--keep-last", 2, "--lr", 0.01)
    proc = train(tiny_config, out, "--max-steps", 8, *common)
    ok(proc)

    def best_step():
        vals = [(r["val_loss"], r["step"]) for r in metrics(out) if "val_loss" in r]
        return min(vals)[1]

    best = json.loads((ck / "best.json").read_text())
    assert best["step"] == best_step() and best["tag"] == f"global_step{best['step']}"
    assert best["val_loss"] == min(r["val_loss"] for r in metrics(out) if "val_loss" in r)
    tags = sorted(p.name for p in ck.iterdir() if p.name.startswith("global_step"))
    assert tags == sorted({"global_step7", "global_step8", best["tag"]}), tags
    assert f"best         {ck / best['tag']} (step {best['step']}" in proc.stdout

    proc = train(tiny_config, out, "--max-steps", 14, "--resume", *common)
    ok(proc)
    assert [r["step"] for r in metrics(out)] == list(range(1, 15)) and latest_tag(out) == "global_step14"
    best = json.loads((ck / "best.json").read_text())
    assert best["step"] == best_step(), (best, [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r])
    tags = sorted(p.name for p in ck.iterdir() if p.name.startswith("global_step"))
    assert tags == sorted({"global_step13", "global_step14", best["tag"]}), tags
    # a resumed run that only gets worse (lr 0.3) keeps the best from before the resume (measured: step 10)
    ok(train(tiny_config, out, "--max-steps", 18, "--resume", *common, "--lr", 0.3, "--allow-changed"))
    best = json.loads((ck / "best.json").read_text())
    assert best["step"] == best_step() <= 14, [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]
    assert (ck / best["tag"]).is_dir() and latest_tag(out) == "global_step18"

    from megapix.checkpoint import load_model

    model, cfg = load_model(str(ck / best["tag"]))
    assert cfg.train.keep_last == 2 and sum(p.numel() for p in model.parameters()) > 0


def test_report_to_writes_deepspeed_monitor_csv(tiny_config, tmp_path):
    """--report-to csv,tensorboard: DeepSpeed's csv monitor writes megapix/* series under <out>/monitor; without the
    tensorboard package one line at the start says what to install, the run goes on, and the summary says it again."""
    import glob
    import importlib.util

    out = tmp_path / "run"
    proc = train(tiny_config, out, "--max-steps", 3, "--no-samples", "--eval-every", 0,
                 "--report-to", "csv,tensorboard")
    ok(proc)
    csvs = [os.path.basename(p) for p in glob.glob(str(out / "monitor" / "**" / "*.csv"), recursive=True)]
    assert any("loss" in c for c in csvs) and any("grad_norm" in c for c in csvs), csvs
    lines = proc.stdout.splitlines()
    told = [i for i, line in enumerate(lines) if "pip install tensorboard" in line]
    if importlib.util.find_spec("tensorboard"):
        assert not told, proc.stdout[-2000:]
    else:  # once at the start, once in the end-of-run summary
        done = next(i for i, line in enumerate(lines) if line.startswith("megapix: done"))
        assert len(told) == 2 and told[0] < done < told[1], proc.stdout[-2000:]
        assert lines[told[1]].startswith("  note "), lines[told[1]]


def test_sigusr1_saves_and_exits_75(tiny_config, tmp_path):
    out = tmp_path / "run"
    cmd = [PYTHON, TRAIN, "--config", tiny_config, "--out", str(out), "--max-steps", "100000", "--no-samples",
           "--eval-every", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_first_metrics(proc, out, TIMEOUT)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    last = metrics(out)[-1]["step"]
    assert 1 <= last < 100000
    assert latest_tag(out) == f"global_step{last}"
    assert f"saved step {last}" in stdout


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear line on stderr, non-zero exit, no traceback, no --out folder left behind
# ---------------------------------------------------------------------------------------------------------
BAD = {  # name -> (arguments, words the error line must contain)
    "missing data file": (["--model", "igpt-s", "--data", "cifar10:/nonexistent"], ["/nonexistent", "does not exist"]),
    "corrupt palette": (["--palette", "{d}/corrupt.npy"], ["corrupt.npy", "not a readable"]),
    "palette shape": (["--palette", "{d}/wide.npy"], ["palette", "(512, 4)"]),
    "token ids >= 512": (["--data", "igpt:{d}/tok/cifar10"], ["token ids >= 512", "600"]),
    "image size": (["--model", "igpt-s", "--data", "npy:{d}/imgs8.npy"], ["8x8", "32x32"]),
    "unknown preset": (["--model", "igpt-q"], ["unknown model preset 'igpt-q'"]),
    "unknown config key": (["--config", "{d}/badkey.yaml"], ["unknown key(s) ['n_layers']"]),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    np.save(d / "wide.npy", np.zeros((512, 4), np.float32))
    np.save(d / "imgs8.npy", np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    (d / "tok").mkdir()
    for s in ("tr", "va", "te"):
        x = np.random.default_rng(1).integers(0, 512, (10, 100))  # 10x10: the default run's resolution
        x[3, 5] = 600
        np.save(d / "tok" / f"cifar10_{s}X.npy", x)
        np.save(d / "tok" / f"cifar10_{s}Y.npy", np.eye(10)[np.arange(10) % 10])
    (d / "badkey.yaml").write_text("model: {preset: tiny, n_layers: 3}\n")

    def go(name):
        args = [a.format(d=d) for a in BAD[name][0]]
        out = d / ("out-" + name.replace(" ", "-"))
        return run([TRAIN, *args, "--out", str(out), "--max-steps", "2"], timeout=TIMEOUT), out

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(BAD, pool.map(go, BAD)))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_fails_cleanly(bad_runs, name):
    proc, out = bad_runs[name]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("megapix: error: "), proc.stderr[-3000:]
    for word in BAD[name][1]:
        assert word in errors[0], errors[0]
    assert not out.exists(), [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]  # not even empty


# ---------------------------------------------------------------------------------------------------------
# the run folder is safe: no silent restart over a run, a torn metrics line, a corrupt image mid-run
# ---------------------------------------------------------------------------------------------------------
def test_rerun_into_a_run_refuses_and_changes_nothing(tiny_config, tmp_path):
    import shutil

    out = tmp_path / "run"
    common = ("--no-samples", "--eval-every", 0)
    ok(train(tiny_config, out, "--max-steps", 3, "--save-every", 2, *common))
    for damage in (None, "latest", "checkpoints"):  # also when `latest` or every checkpoint is gone
        if damage == "latest":
            os.remove(out / "checkpoints" / "latest")
        elif damage == "checkpoints":
            shutil.rmtree(out / "checkpoints")
        before = tree_hash(out)
        proc = train(tiny_config, out, "--max-steps", 5, *common)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line == (f"megapix: error: {out} already holds a run at step 3: pass --resume to continue, or "
                        "choose another --out"), (damage, proc.stderr[-2000:])
        assert tree_hash(out) == before, damage
    # --resume into a folder with no run is an error (a typo in --out must not start a new run silently);
    # --resume-if-exists (what the slurm/ scripts pass) starts one
    fresh = tmp_path / "fresh"
    proc = train(tiny_config, fresh, "--max-steps", 1, "--resume", *common)
    assert proc.returncode == 2 and "holds no run to continue" in proc.stderr and not fresh.exists(), proc.stderr
    ok(train(tiny_config, fresh, "--max-steps", 1, "--resume-if-exists", *common))
    assert [r["step"] for r in metrics(fresh)] == [1]


def test_resume_restores_the_saved_config_and_refuses_what_contradicts_it(tiny_config, tmp_path):
    """`--resume --out DIR` alone continues the run with its saved config; a flag that contradicts the saved run
    (here the seed) is one line naming both values and changes nothing, unless --allow-changed, which the log and
    the summary then say; --max-steps only steers it (the log says where the schedule now ends)."""
    out = tmp_path / "run"
    ok(train(tiny_config, out, "--max-steps", 2, "--no-samples", "--eval-every", 0, "--seed", 3, "--lr", 0.002))
    before = tree_hash(out)
    proc = run([TRAIN, "--resume", "--out", str(out), "--seed", "4", "--lr", "0.002"], timeout=TIMEOUT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "train.seed 3 -> 4" in line and "--allow-changed" in line and "train.lr" not in line, line
    assert tree_hash(out) == before

    proc = run([TRAIN, "--resume", "--out", str(out), "--max-steps", "3", "--no-samples"], timeout=TIMEOUT)
    ok(proc)
    assert "the schedule now ends at step 3 (the saved run's ended at 2)" in proc.stdout, proc.stdout[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    record = json.loads((out / "config.json").read_text())["config"]
    assert record["train"]["seed"] == 3 and record["train"]["lr"] == 0.002 and record["model"]["n_layer"] == 2

    # (not the seed here: the palette fitted with seed 3 is, rightly, not silently reused for another seed)
    proc = run([TRAIN, "--resume", "--out", str(out), "--max-steps", "4", "--lr", "0.004", "--allow-changed",
                "--no-samples"], timeout=TIMEOUT)
    ok(proc)
    said = [ln for ln in proc.stdout.splitlines() if "--allow-changed" in ln and "train.lr 0.002 -> 0.004" in ln]
    assert len(said) == 2, proc.stdout[-3000:]  # the log line, and the summary's
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_every_command_the_summary_prints_runs_as_printed(tiny_config, tmp_path):
    """Each command under the end-of-run summary's "next:" is copied and run as printed, from the repository root,
    in a shell whose PATH does not hold this venv's bin/: the shell the user typed `make train` in."""
    import shlex

    out = tmp_path / "run"
    proc = train(tiny_config, out, "--max-steps", 4, "--eval-every", 2)
    ok(proc)
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # megapix's own line says CPU
    commands = next_commands(proc.stdout)
    assert {"continue", "export (HF)", "sample", "probe"} <= {label for label, _ in commands}, commands
    for label, command in commands:
        assert shlex.split(command), command
        done = run_as_printed(command, timeout=TIMEOUT)
        assert done.returncode == 0, (label, command, done.stdout[-2000:], done.stderr[-3000:])
        assert "Setting accelerator to CPU" not in done.stdout + done.stderr, (label, done.stderr[-2000:])
    assert [r["step"] for r in metrics(out)][-1] > 4  # the continue line resumed the run and trained further
    # and it did to the lr what the summary said: "step 5 trains at lr X"
    said = re.search(r"continuing +--max-steps 8 stretches the cosine to end at step 8: step 5 trains at lr (\S+) "
                     r"\(step 4 had (\S+)\)", proc.stdout)
    assert said, proc.stdout[-3000:]
    lrs = {r["step"]: r["lr"] for r in metrics(out)}
    assert float(said[1]) == pytest.approx(lrs[5], rel=5e-3)
    assert float(said[2]) == pytest.approx(lrs[4], rel=5e-3, abs=1e-12)
    assert (out / "more_samples.png").is_file() and (tmp_path / "run-hf" / "config.json").is_file()


def test_resume_tolerates_a_torn_last_metrics_line(tiny_config, tmp_path):
    out = tmp_path / "run"
    common = ("--no-samples", "--eval-every", 0, "--warmup-steps", 10)
    ok(train(tiny_config, out, "--max-steps", 3, *common))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 6.1')  # a kill in the middle of a write
    ok(train(tiny_config, out, "--max-steps", 5, "--resume", *common))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]


def test_corrupt_image_mid_run_saves_then_exits_2(tiny_config, tmp_path):
    from PIL import Image

    from megapix.data.palette import Palette

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    files = []
    for split, n in (("train", 12), ("val", 2), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                p = root / split / cls / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(p)
                if split == "train":
                    files.append(p)
    pal = tmp_path / "palette.npy"
    Palette(rng.uniform(-1, 1, (512, 3)).astype(np.float32)).save(str(pal))
    out = tmp_path / "run"
    cmd = [PYTHON, TRAIN, "--config", tiny_config, "--out", str(out), "--data", f"imagefolder:{root}", "--palette",
           str(pal), "--max-steps", "100000", "--no-samples", "--eval-every", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_first_metrics(proc, out, TIMEOUT)
        for p in files:  # every training image becomes unreadable: the next step meets one
            p.write_bytes(b"not a png")
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("megapix: error:")]
    assert len(errors) == 1 and str(root / "train") in errors[0] and "--resume" in errors[0], stderr[-2000:]
    last = metrics(out)[-1]["step"]
    assert last >= 1 and latest_tag(out) == f"global_step{last}"
    assert f"step {last} was saved" in errors[0]


def test_loss_plot_is_atomic_and_bounded(tmp_path, monkeypatch):
    """loss.png: nothing to plot writes nothing; a long run's train curve is averaged into at most `points`
    buckets (the last step stays the last point); the PNG appears only complete (written under a temp name)."""
    from PIL import Image

    import megapix.runlog as runlog

    png = tmp_path / "loss.png"
    assert runlog.write_loss_plot([], [], str(png)) is None and not png.exists()
    plotted = {}
    from matplotlib.axes import Axes

    orig = Axes.plot

    def spy(self, *args, **kwargs):
        plotted[kwargs.get("label")] = (list(args[0]), list(args[1]))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    train = [(s, 6.0 - s * 1e-4) for s in range(1, 10_001)]
    assert runlog.write_loss_plot(train, [(5000, 5.8), (10_000, 5.5)], str(png), points=100) == str(png)
    xs, ys = plotted["train loss"]
    assert len(xs) == 100 and xs[-1] == 10_000 and ys[0] == pytest.approx(np.mean([v for _, v in train[:100]]))
    assert plotted["val loss"] == ([5000, 10_000], [5.8, 5.5])
    with Image.open(png) as img:
        img.verify()
    assert sorted(os.listdir(tmp_path)) == ["loss.png"]  # no temp files left behind


def test_train_py_under_a_python_without_megapix_names_the_venv_to_use():
    """`python megapix/train.py` with an interpreter that lacks megapix (the venv's base Python): one line naming the
    repository's venv command that works, exit 2."""
    import sys

    base = os.path.join(sys.base_prefix, "bin", "python3")
    has_megapix = subprocess.run([base, "-c", "import megapix"], cwd="/", capture_output=True).returncode == 0
    if sys.prefix == sys.base_prefix or has_megapix:
        pytest.skip("needs a venv whose base Python has no megapix")
    proc = subprocess.run([base, "megapix/train.py", "--max-steps", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=subprocess_env())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    venv_python = os.path.relpath(sys.executable, REPO)
    assert f"{venv_python} megapix/train.py --max-steps 3" in proc.stderr, proc.stderr
