"""Fine-tuning: the joint loss, augmentation, a short lr sweep with early stopping, outputs, refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megapix.config import model_preset
from megapix.model import ImageGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(path):
    from megapix.data.palette import Palette

    model = ImageGPT(model_preset("tiny", n_layer=1, d_model=32, n_head=2))
    model.save_pretrained(str(path))
    Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)).save(str(path / "palette.npy"))


def test_joint_loss_is_unweighted_sum():
    from megapix.finetune import Classifier
    from megapix.model.igpt import lm_loss

    torch.manual_seed(0)
    model = ImageGPT(model_preset("tiny", n_layer=1, d_model=32, n_head=2))
    clf = Classifier(model, 5)
    torch.nn.init.normal_(clf.clf.weight)
    tokens, y = torch.randint(0, 512, (3, 64)), torch.tensor([0, 4, 2])
    loss, l_gen, l_clf, logits = clf(tokens, y)
    torch.testing.assert_close(l_gen, lm_loss(model(tokens), tokens))
    pooled = model.norm_f(torch.stack([b for b in [model.blocks[0](model.embed(tokens))]])[0]).mean(1)
    torch.testing.assert_close(logits, clf.clf(pooled))
    torch.testing.assert_close(loss, l_gen + torch.nn.functional.cross_entropy(logits, y))


def test_augmentation_before_encoding():
    from megapix.data.palette import Palette
    from megapix.data.sources import open_source
    from megapix.finetune import LabelledData

    pal = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    split = open_source("synthetic:16", 8).split("train")
    data = LabelledData(split, pal, 64, "synthetic")
    plain, y = data.batch(np.arange(4))
    aug, y2 = data.batch(np.arange(4), epoch=1, seed=0, augment=True)
    assert torch.equal(y, y2) and not torch.equal(plain, aug)
    from megapix.data.augment import cifar_augment

    expect = pal.encode(cifar_augment(np.asarray(split.images[np.arange(4)]), np.arange(4), 1, 0))
    assert np.array_equal(aug.numpy(), expect)


def test_finetune_sweep_early_stopping(tmp_path):
    export(tmp_path / "m")
    out = tmp_path / "ft"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "megapix", "finetune", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:48",
           "--out", str(out), "--lr", "3e-2,1e-6", "--max-steps", "4", "--eval-every", "1", "--patience", "1",
           "--global-batch", "8", "--zero-stage", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "finetune_results.json").read_text())
    assert [r["lr"] for r in res["runs"]] == [3e-2, 1e-6]
    best = max(res["runs"], key=lambda r: r["best_val_acc"])
    assert res["best_lr"] == best["lr"] and res["best_val_acc"] == best["best_val_acc"]
    for r in res["runs"]:
        assert r["steps"] == 4 or (r["stopped_early"] and r["steps"] < 4)
        assert r["zero_stage"] == 1
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == sum(r["steps"] for r in res["runs"])
    assert all(abs(r["loss"] - r["l_gen"] - r["l_clf"]) < 1e-4 for r in recs)
    assert all("val_acc" in r for r in recs)
    model = ImageGPT.from_pretrained(str(out / "best_model"))
    from safetensors.torch import load_file

    head = load_file(str(out / "best_model" / "classifier.safetensors"))
    assert head["weight"].shape == (4, model.config.d_model) and head["bias"].shape == (4,)


def test_refuses_tensor_and_pipeline_parallel(tmp_path, capsys):
    from megapix.cli import main

    assert main(["finetune", "--checkpoint", "x", "--out", str(tmp_path), "--tensor-parallel", "2"]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and len(err.strip().splitlines()) == 1
