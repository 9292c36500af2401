"""Probes during pre-training (`megapix train --probe-every N`, megapix/trainprobe.py): the number is the offline
extract + probe one, the training curve is untouched (one rank and a pipeline), the summary and loss.png show it."""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import types

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, run, subprocess_env
from test_parallel_helpers import palette_path, records, run_train, write_config

from megapix.attentive import default_layers
from megapix.config import Config, DataConfig, ModelConfig, TrainConfig
from megapix.data.loader import TokenData
from megapix.features import extract
from megapix.model import ImageGPT
from megapix.probe import probe
from megapix.runlog import RunLog, probe_summary, write_loss_plot
from megapix.trainprobe import L2_GRID, TrainingProbe


def small_cfg(**train) -> Config:
    model = ModelConfig(n_layer=3, d_model=32, n_head=2, resolution=8, kernels="torch")
    return Config(model=model, data=DataConfig(source="digits"),
                  train=TrainConfig(**{"max_steps": 30, "probe_every": 10, "probe_rows": 64, **train}))


def test_due_steps_layers_and_rows():
    p = TrainingProbe(small_cfg())
    assert [s for s in range(1, 31) if p.due(s)] == [10, 20, 30]
    assert [s for s in range(1, 26) if TrainingProbe(small_cfg(max_steps=25)).due(s)] == [10, 20, 25]
    assert p.layers == default_layers(3)  # the attentive probe's rule, not a second one
    assert TrainingProbe(small_cfg(probe_layers="0,3")).layers == [0, 3]
    assert [len(r) for r in p.rows.values()] == [64, 64] and p.num_classes == 10


def test_probe_is_extract_plus_probe_and_draws_no_random_number():
    """In process: the probe of a model's weights equals features.extract + probe.probe on the same rows, and the
    random streams of torch, numpy and Python are where they were (the next draws are the same)."""
    cfg = small_cfg(probe_rows=40, probe_layers="1,3")
    p = TrainingProbe(cfg)
    model = ImageGPT(cfg.model, seed=3).eval()
    from megapix.data.palette import Palette

    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    trainer = types.SimpleNamespace(full_state_dict=lambda: {k: v.clone() for k, v in model.state_dict().items()},
                                    is_rank0=True, palette=palette, device=torch.device("cpu"))
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    got = p(trainer)
    after = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))
    assert after[2] == random.random()
    assert got["probe_time_s"] > 0
    feats, labels = {}, {}
    for s in ("train", "val"):
        feats[s] = extract(model, TokenData(p.splits[s], 64, palette).tokens(np.arange(40)), p.layers)
        labels[s] = torch.from_numpy(p.splits[s].labels[:40].astype(np.int64))
    for i, layer in enumerate(p.layers):
        cols = slice(32 * i, 32 * (i + 1))
        want = probe((feats["train"][:, cols], labels["train"]), (feats["val"][:, cols], labels["val"]), None, 10,
                     L2_GRID, "lbfgs", "cpu")["val_acc"]
        assert got[f"probe_acc/layer_{layer}"] == pytest.approx(want, abs=1 / 40 + 1e-9)


def test_summary_names_the_best_layer_and_step_and_loss_png_draws_the_probes(tmp_path, capsys):
    log = RunLog(str(tmp_path), True)
    log.begin("train", 30, 0, 10)
    for step, accs in ((10, (0.20, 0.30)), (20, (0.25, 0.45)), (30, (0.26, 0.40))):
        log.record({"step": step, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 1.0, "probe_time_s": 0.5,
                    "probe_acc/layer_1": accs[0], "probe_acc/layer_2": accs[1]})
    log.end()
    assert "train step 20/30: loss 3.0000, probe 45.0% at layer 2," in capsys.readouterr().out  # the progress line
    [line] = probe_summary(log)
    assert "best 45.0% val accuracy at layer 2, step 20" in line and "layer 2 at step 30: 40.0%" in line
    assert "1.5 s in this process" in line
    # a resumed run reloads the probes from metrics.jsonl up to its step
    again = RunLog(str(tmp_path), True)
    again.continue_from(20)
    assert again.probe_curve == {"layer_1": [(10, 0.20), (20, 0.25)], "layer_2": [(10, 0.30), (20, 0.45)]}
    assert probe_summary(RunLog(str(tmp_path / "none"), True)) == []
    from PIL import Image

    png = tmp_path / "loss.png"
    write_loss_plot([(1, 3.0), (2, 2.9)], [(2, 2.95)], str(png), log.probe_curve)
    wide = Image.open(png).size
    write_loss_plot([(1, 3.0), (2, 2.9)], [(2, 2.95)], str(png))
    assert wide[0] > Image.open(png).size[0]  # the probe panel beside the loss panel


# ---- end to end (subprocesses) ----
def documented_commands() -> list[str]:
    """The indented commands of docs/evaluation.md's "Probes during pre-training" section."""
    text = open(os.path.join(REPO, "docs", "evaluation.md")).read()
    section = text.split("## Probes during pre-training", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    megapix ")]


def run_megapix(command: str, out_map: dict, palette: str | None = None, *more: str):
    args = shlex.split(command)[1:]
    args = [out_map.get(a, a) for a in args]
    if args[0] == "train":
        args += ["--palette", palette, "--kernels", "torch", "--no-samples", *more]
    proc = run(["-m", "megapix", *args], timeout=600, env=subprocess_env())
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_documented_run_keeps_the_curve_and_equals_offline_extract_and_probe(tmp_path):
    train_cmd, extract_cmd, probe_cmd = documented_commands()
    assert "--probe-every" in train_cmd
    grid = probe_cmd.split("--l2 ")[1].split()[0]
    assert [float(x) for x in grid.split(",")] == list(L2_GRID)  # the doc's offline grid is the probe's
    run_dir, feats = str(tmp_path / "probed"), str(tmp_path / "features")
    out_map = {"runs/digits-probed": run_dir, "features/digits-probed": feats}
    proc = run_megapix(train_cmd, out_map, palette_path(), "--report-to", "csv")
    plain = train_cmd.replace("--probe-every 20 ", "").replace("--probe-rows 2000 ", "")
    run_megapix(plain, {"runs/digits-probed": str(tmp_path / "plain")}, palette_path())
    probed, unprobed = records(run_dir), records(tmp_path / "plain")
    for key in ("loss", "grad_norm", "val_loss", "lr"):  # bit for bit: the probe leaves the curve alone
        assert [r.get(key) for r in probed] == [r.get(key) for r in unprobed], key
    assert [r["step"] for r in probed if "probe_acc/layer_1" in r] == [20, 40]
    last = probed[-1]
    best = max((v, -r["step"], k) for r in probed for k, v in r.items() if k.startswith("probe_acc/"))
    assert re.search(rf"probe +best {100 * best[0]:.1f}% val accuracy at {best[2][10:].replace('_', ' ')}, "
                     rf"step {-best[1]} ", proc.stdout), proc.stdout
    assert "loss.png" in proc.stdout and os.path.getsize(os.path.join(run_dir, "loss.png")) > 1000
    with open(os.path.join(run_dir, "monitor", "megapix", "megapix_probe_acc_layer_2.csv")) as f:
        assert len(f.read().strip().splitlines()) == 3  # DeepSpeed's CSV monitor: a header and the two probes
    # offline: extract + probe of the same checkpoint, rows and layers
    run_megapix(extract_cmd, out_map)
    run_megapix(probe_cmd, out_map)
    with open(os.path.join(feats, "probe_results.json")) as f:
        offline = {r["name"]: r["val_acc"] for r in json.load(f)["results"] if r.get("probe") == "linear"}
    for layer in (1, 2):
        assert abs(last[f"probe_acc/layer_{layer}"] - offline[f"layer {layer}"]) <= 0.01, (last, offline)
    # a resume goes on probing; its summary counts the run's probes, those before the resume too
    proc = run(["-m", "megapix", "train", "--resume", "--out", run_dir, "--max-steps", "60", "--no-samples"],
               timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in records(run_dir) if "probe_acc/layer_2" in r] == [20, 40, 60]
    assert "2 layers probed 3 times" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_pipeline_and_zero3_probe_like_one_rank_and_keep_their_curve(tmp_path):
    """2-rank layouts: the pipeline's curve is bit-exact with and without probes; the pipeline's and ZeRO-3's
    probes are the single rank's within 1 point (their curves match it to ~1e-6, not bit for bit)."""
    config = write_config(tmp_path, max_steps=6, probe_rows=256)
    probe = ["--probe-every", "3"]
    run_train(tmp_path / "single", 1, *probe, config=config, cmd=[PYTHON, os.path.join(REPO, "megapix", "train.py")])
    pp = ["--pipeline-parallel", "2", "--micro-batch", "2"]
    run_train(tmp_path / "pp2", 2, *pp, *probe, config=config)
    run_train(tmp_path / "pp2-plain", 2, *pp, config=config)
    run_train(tmp_path / "zero3", 2, "--zero-stage", "3", *probe, config=config)
    assert [r["loss"] for r in records(tmp_path / "pp2")] == [r["loss"] for r in records(tmp_path / "pp2-plain")]

    def probes(name):
        return [{k: v for k, v in r.items() if k.startswith("probe_acc/")} for r in records(tmp_path / name)
                if r["step"] in (3, 6)]

    single = probes("single")
    assert len(single) == 2 and all(len(p) == 2 for p in single)  # layers 1 and 2 of 2, at steps 3 and 6
    for name in ("pp2", "zero3"):
        for mine, ref in zip(probes(name), single, strict=True):
            assert mine.keys() == ref.keys() and all(abs(mine[k] - ref[k]) <= 0.01 for k in ref), (name, mine, ref)
