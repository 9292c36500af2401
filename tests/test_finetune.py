"""Fine-tuning: the joint loss, augmentation, a short lr sweep with early stopping, outputs, refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import next_commands, run_as_printed, subprocess_env

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


@pytest.mark.slow
def test_finetune_sweep_early_stopping(tmp_path):
    export(tmp_path / "m")
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "megapix", "finetune", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:48",
           "--out", str(out), "--lr", "3e-2,1e-6", "--max-steps", "4", "--eval-every", "1", "--patience", "1",
           "--global-batch", "8", "--zero-stage", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_acc" in proc.stdout  # the step lines carry the accuracy of each evaluation
    assert (out / "finetune_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label, command in next_commands(proc.stdout):  # runs as printed, in the user's shell
        done = run_as_printed(command)
        assert done.returncode == 0, (label, command, done.stderr[-3000:])
    assert (tmp_path / "ft-features" / "manifest.json").is_file()
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
    from transformers import ImageGPTForImageClassification

    hf, info = ImageGPTForImageClassification.from_pretrained(str(out / "best_model"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.score.weight.shape == (4, hf.config.n_embd)


@pytest.mark.parametrize("argv,words", [
    (["--lr", "abc"], ["cannot parse --lr 'abc'"]),
    (["--lr", "nan"], ["positive, finite"]),
    (["--patience", "0"], ["--patience"]),
    (["--checkpoint", "x"], ["checkpoint 'x' does not exist"]),
])
def test_bad_options_fail_with_one_line(tmp_path, capsys, argv, words):
    from megapix.cli import main

    assert main(["finetune", "--out", str(tmp_path / "ft"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "ft").exists()


def test_defaults_agree_with_the_trainer():
    from megapix.config import TrainConfig
    from megapix.commands.finetune import FinetuneConfig, parse_args

    t, (args, _) = TrainConfig(), parse_args(["--out", "x"])
    assert args.train == t  # FinetuneConfig nests the trainer's TrainConfig: one definition of each setting
    args, _ = parse_args(["--out", "x", "--grad-clip", "0.5", "--seed", "3", "--tensor-parallel", "2"])
    assert (args.train.grad_clip, args.train.seed, args.train.tensor_parallel) == (0.5, 3, 2)
    import dataclasses

    for f in dataclasses.fields(FinetuneConfig):  # every option has help text (the CLI generator reads it)
        assert f.metadata.get("help"), f.name


def test_shift_augmentation_for_digits_never_flips():
    from megapix.finetune import default_augmentation, shift_augment

    assert default_augmentation("digits") == "shift" and default_augmentation("cifar10:/x") == "cifar"
    assert default_augmentation("digits-shifted") == default_augmentation("digits-shifted:2") == "shift"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = shift_augment(images, np.arange(64), 3, 0)
    assert out.shape == images.shape
    moved = 0
    for a, b in zip(images, out):  # each output is the input moved by at most one pixel, never mirrored
        ok = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if np.array_equal(b[max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)],
                                a[max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)])]
        assert ok, "not a shift"
        moved += ok[0] != (0, 0)
    assert moved > 32


# ---- fine-tuning in every layout reproduces the one-rank curve ----
FT_LAYOUTS = {
    "dp2": (2, ["--zero-stage", "1"]),
    "tp2": (2, ["--tensor-parallel", "2"]),
    "pp2": (2, ["--pipeline-parallel", "2", "--micro-batch", "2"]),
}
FT_TOL = 1e-4
_FT = {}


def finetune_run(name, tmp_root):
    """The metrics of fine-tuning layout `name`, run on first use; the 2-rank layouts share one launch
    (test_parallel_helpers.train_in_one_launch)."""
    from test_parallel_helpers import env, train_in_one_launch

    if name not in _FT:
        model = tmp_root / "model"
        if not model.exists():
            from megapix.data.palette import Palette

            ImageGPT(model_preset("tiny", n_layer=2, d_model=32, n_head=2, kernels="torch"), seed=3).save_pretrained(
                str(model))
            Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)).save(
                str(model / "palette.npy"))

        def argv(n):
            return ["finetune", "--checkpoint", str(model), "--data", "synthetic:48", "--out", str(tmp_root / n),
                    "--lr", "1e-2", "--max-steps", "5", "--eval-every", "2", "--patience", "10", "--global-batch", "8",
                    "--seed", "1", *FT_LAYOUTS.get(n, (1, []))[1]]

        if name in FT_LAYOUTS:
            nproc = FT_LAYOUTS[name][0]
            batch = [n for n in FT_LAYOUTS if FT_LAYOUTS[n][0] == nproc and n not in _FT]
            train_in_one_launch(nproc, [(n, argv(n), str(tmp_root / f"{n}.stdout")) for n in batch], tmp_root)
        else:
            batch = [name]
            e = env()
            e["PYTHONPATH"] = ROOT
            proc = subprocess.run([sys.executable, "-m", "megapix", *argv(name)], cwd=ROOT, env=e, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        for n in batch:
            _FT[n] = [json.loads(line) for line in (tmp_root / n / "metrics.jsonl").read_text().splitlines()]
    return _FT[name]


@pytest.fixture(scope="module")
def ft_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ft-layouts")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FT_LAYOUTS))
def test_finetune_layout_reproduces_single_rank_curve(name, ft_root):
    ref, got = finetune_run("single", ft_root), finetune_run(name, ft_root)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4, 5]
    worst = 0.0
    for a, b in zip(got, ref):
        for key in ("loss", "l_gen", "l_clf", "val_loss", "val_acc"):
            assert (key in a) == (key in b), key
            if key in b:
                worst = max(worst, abs(a[key] - b[key]))
    print(f"finetune {name}: max |diff| vs one rank = {worst:.2e} (loss, l_gen, l_clf, val_loss, val_acc)")
    assert worst < FT_TOL, (name, got, ref)
    assert abs(ref[-1]["loss"] - ref[0]["loss"]) > 0.02  # the curve moves, so equality is not trivial
