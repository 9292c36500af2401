"""Attentive probes (`megapix probe --attentive`): the pooling head, the statistics, the results folder shared with
linear probes, bad inputs, rank invariance (slow), a random-init trunk (slow) and a compiled trunk (slow)."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO, subprocess_env, tree_hash
from test_features import export, random_model

from megapix.attentive import AttentionPoolingHead, _Rows, channel_stats, default_layers
from megapix.cli import main


class _OneRank:
    rank, world, on = 0, 1, False


def test_the_pooling_head_ignores_token_order_and_standardises():
    head = AttentionPoolingHead(32, 5, queries=2, heads=2, seed=1)
    head.mean.fill_(3.0)
    head.inv_std.fill_(0.5)
    x = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(0))
    out = head(x)
    assert out.shape == (4, 5)
    # attention pooling is a weighted mean over positions: a permutation of the tokens changes nothing
    torch.testing.assert_close(head(x[:, torch.randperm(10)]), out, atol=1e-5, rtol=1e-5)
    # the standardisation is applied first: shifting the input by the mean it removes is the same as no mean
    head.mean.zero_()
    torch.testing.assert_close(head(x - 3.0), out, atol=1e-5, rtol=1e-5)
    # the same seed gives the same head on every rank
    same = AttentionPoolingHead(32, 5, queries=2, heads=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), AttentionPoolingHead(32, 5, 2, 2, 1).parameters()))


@pytest.mark.parametrize("queries,heads", [(1, 1), (1, 4), (3, 2)])
def test_the_reordered_pooling_equals_aims_direct_form_with_gradients(queries, heads):
    head = AttentionPoolingHead(32, 7, queries=queries, heads=heads, seed=2).double()
    head.mean.normal_()
    head.inv_std.uniform_(0.5, 2.0)
    x = torch.randn(5, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = head(x)
    grads = torch.autograd.grad(out.square().sum(), list(head.parameters()))
    ref = head.reference_forward(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(head.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_channel_stats_are_the_mean_and_std_over_every_position():
    from megapix.data.base import Split
    from megapix.data.loader import TokenData

    model = random_model()
    tokens = np.random.default_rng(0).integers(0, 512, (20, 64))
    rows = _Rows(TokenData(Split(tokens=tokens, labels=np.zeros(20, np.int64)), 64, None), _OneRank(), "cpu")
    rows.attach(model, [0, 2], cache_bytes=0)
    stats = channel_stats(model, rows, [0, 2], batch_size=6)
    with torch.no_grad():
        states = dict(model.hidden_states(torch.from_numpy(tokens), [0, 2]))
    for l in (0, 2):
        x = states[l].reshape(-1, 32).double()
        torch.testing.assert_close(stats[l][0].double(), x.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(stats[l][1].double(), (x.var(0, unbiased=False) + 1e-6).rsqrt(), atol=1e-3,
                                   rtol=1e-4)


def test_default_layers_spread_over_depth_and_end_at_the_top():
    assert default_layers(4) == [1, 2, 3, 4]
    assert default_layers(8) == [2, 4, 6, 8]
    assert default_layers(24) == [6, 12, 18, 24]
    assert default_layers(2) == [1, 2]


def test_attentive_rows_join_the_linear_rows_and_a_rerun_of_either_keeps_the_other(tmp_path):
    export(tmp_path / "m")
    feats = tmp_path / "feats"
    assert main(["extract", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:64", "--layers", "1-3",
                 "--out", str(feats)]) == 0
    assert main(["probe", str(feats), "--max-iter", "30", "--l2", "1e-2"]) == 0
    attentive = ["probe", "--attentive", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:64",
                 "--layers", "1,3", "--attentive-epochs", "2", "--out", str(feats)]
    assert main(attentive) == 0
    res = json.loads((feats / "probe_results.json").read_text())
    kinds = [(r["probe"], r["name"]) for r in res["results"]]
    assert kinds == [("linear", "layer 1"), ("linear", "layer 2"), ("linear", "layer 3"), ("linear", "concat all"),
                     ("attentive", "attentive 1"), ("attentive", "attentive 3")]
    for r in res["results"][-2:]:
        assert r["layers"] in ([1], [3]) and 0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert r["lr"] in (3e-3, 1e-2, 3e-2) and 1 <= r["epoch"] <= 2
    assert res["attentive"]["selection"] == "--layers" and res["solver"] == "lbfgs"
    md = (feats / "probe_results.md").read_text()
    assert "Linear probes" in md and "Attentive probes" in md and "| attentive 3 | 3 |" in md
    assert (feats / "probe_accuracy.png").stat().st_size > 1000
    # a linear rerun keeps the attentive rows, an attentive rerun replaces only its own
    assert main(["probe", str(feats), "--max-iter", "30", "--l2", "1e-2", "--layers", "2"]) == 0
    assert main(attentive) == 0
    names = [r["name"] for r in json.loads((feats / "probe_results.json").read_text())["results"]]
    assert names == ["layer 2", "attentive 1", "attentive 3"]
    # the model's folder was only read
    assert not (tmp_path / "m_attentive_probe").exists()


def test_without_layers_it_picks_by_val_and_writes_beside_the_model(tmp_path, capsys):
    export(tmp_path / "m", n_layer=4)
    assert main(["probe", "--attentive", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:48",
                 "--attentive-epochs", "1", "--attentive-lr", "1e-3"]) == 0
    out = tmp_path / "m_attentive_probe"
    res = json.loads((out / "probe_results.json").read_text())
    assert [r["layers"] for r in res["results"]] == [[1], [2], [3], [4]]
    best = max(res["results"], key=lambda r: r["val_acc"])
    assert res["attentive"]["best_layer_by_val"] == best["layers"][0]
    assert "val accuracy among 4 layers" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["probe_accuracy.png", "probe_results.json", "probe_results.md"]


@pytest.mark.parametrize("argv,words", [
    (["probe", "--attentive", "{tmp}/feats", "--checkpoint", "{tmp}/m"], ["--attentive trains over the model"]),
    (["probe", "--attentive"], ["--attentive needs the model", "--checkpoint RUN"]),
    (["probe", "--checkpoint", "{tmp}/m"], ["--checkpoint is for --attentive"]),
    (["probe", "--attentive", "--checkpoint", "{tmp}/feats", "--out", "{tmp}/o"],
     ["is a feature extraction", "megapix probe --features"]),
    (["probe", "--attentive", "--checkpoint", "{tmp}/m", "--data", "synthetic:32", "--layers", "7", "--out",
      "{tmp}/o"], ["layer index 7 is out of range", "0..3"]),
    (["probe", "--attentive", "--checkpoint", "{tmp}/m", "--attentive-lr", "0,x", "--out", "{tmp}/o"],
     ["--attentive-lr", "positive numbers"]),
    (["probe", "--attentive", "--checkpoint", "{tmp}/nope", "--out", "{tmp}/o"], ["does not exist"]),
    (["probe", "--attentive", "--checkpoint", "{tmp}/m", "--data", "synthetic:32", "--attentive-heads", "12",
      "--out", "{tmp}/o"], ["--attentive-heads 12 does not divide the model width 32", "e.g. 4"]),
    (["probe", "--attentive", "--checkpoint", "{tmp}/m", "--data", "synthetic:32", "--out", "{tmp}/m"],
     ["writes only into a new or empty folder", "choose another --out"]),
])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, capsys, argv, words):
    export(tmp_path / "m")
    assert main(["extract", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:16", "--layers", "1",
                 "--out", str(tmp_path / "feats")]) == 0
    capsys.readouterr()
    before = tree_hash(tmp_path)
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "error" in err[0], err
    assert all(w in err[0] for w in words), err[0]
    assert tree_hash(tmp_path) == before


def test_kept_states_train_what_a_pass_per_batch_trains(tmp_path, capsys, monkeypatch):
    """Also with one row per trunk forward (the CPU's token cap at one 64-token image): the same states."""
    import megapix.features as features

    export(tmp_path / "m")
    results = []
    for gb, cap in (("0", None), ("1", None), ("1", 64)):
        if cap:
            monkeypatch.setattr(features, "CPU_BATCH_TOKENS", cap)
        out = tmp_path / f"gb{gb}-{cap}"
        assert main(["probe", "--attentive", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:96",
                     "--layers", "1,3", "--attentive-epochs", "3", "--attentive-batch-size", "16",
                     "--state-cache-gb", gb, "--out", str(out)]) == 0
        results.append(json.loads((out / "probe_results.json").read_text())["results"])
    out = capsys.readouterr().out
    assert "kept in memory after their first pass: none" in out and "pass: train, val, test" in out
    for a, b, c in zip(*results):
        assert (a["lr"], a["epoch"], a["val_acc"], a["test_acc"]) == (b["lr"], b["epoch"], b["val_acc"], b["test_acc"])
        assert (c["lr"], c["epoch"], c["val_acc"], c["test_acc"]) == (b["lr"], b["epoch"], b["val_acc"], b["test_acc"])


def _attentive(out, ckpt, nproc):
    args = ["-m", "megapix", "probe", "--attentive", "--checkpoint", ckpt, "--data", "synthetic:96", "--layers",
            "1,3", "--attentive-epochs", "4", "--attentive-batch-size", "16", "--out", out]
    if nproc == 1:
        return [PYTHON, *args]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 2000), *args]


@pytest.mark.slow
def test_two_ranks_train_what_one_rank_trains(tmp_path):
    export(tmp_path / "m")
    results = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"r{nproc}")
        proc = subprocess.run(_attentive(out, str(tmp_path / "m"), nproc), cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads(open(os.path.join(out, "probe_results.json")).read())
    assert results[2]["attentive"]["world_size"] == 2
    for a, b in zip(results[1]["results"], results[2]["results"]):
        assert a["layers"] == b["layers"] and a["lr"] == b["lr"] and a["epoch"] == b["epoch"]
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.005 and abs(a["test_acc"] - b["test_acc"]) <= 0.005


@pytest.mark.slow
def test_on_a_random_init_trunk_it_stays_near_the_linear_control(tmp_path):
    """The pooling can weigh positions, a mean cannot, but over a random-init trunk neither has learned features
    to find: the attentive probe must not invent accuracy (a leak of labels or test rows would show here)."""
    export(tmp_path / "m", n_layer=2)
    feats, ckpt = tmp_path / "feats", str(tmp_path / "m")
    assert main(["extract", "--checkpoint", ckpt, "--data", "shapes", "--layers", "1,2", "--out", str(feats)]) == 0
    assert main(["probe", str(feats), "--no-concat"]) == 0
    assert main(["probe", "--attentive", "--checkpoint", ckpt, "--data", "shapes", "--layers", "1,2",
                 "--attentive-epochs", "6", "--out", str(feats)]) == 0
    rows = json.loads((feats / "probe_results.json").read_text())["results"]
    linear = {r["layers"][0]: r["test_acc"] for r in rows if r["probe"] == "linear"}
    attentive = {r["layers"][0]: r["test_acc"] for r in rows if r["probe"] == "attentive"}
    for layer in (1, 2):
        assert abs(attentive[layer] - linear[layer]) < 0.15, (layer, attentive, linear)


@pytest.mark.slow
def test_a_compiled_trunk_gives_the_eager_rows_without_recompiling_at_each_batch(tmp_path):
    """--compile require with no state cache: the compiled trunk runs for every batch of 12 over splits that end
    short (synthetic:64 is 58 train / 6 val / 16 test rows here: batches of 10, 6 and 4 besides 12): the eager
    rows, from a handful of graphs (the first size, then a dynamic batch) however many batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    export(tmp_path / "m")
    args = ["probe", "--attentive", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:64", "--layers", "1,3",
            "--attentive-epochs", "3", "--attentive-batch-size", "12", "--state-cache-gb", "0"]
    assert main(args + ["--out", str(tmp_path / "eager")]) == 0
    torch._dynamo.reset()
    counters.clear()
    try:
        assert main(args + ["--compile", "require", "--out", str(tmp_path / "compiled")]) == 0
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # the next in-process test starts without these graphs
    assert 1 <= graphs <= 3, dict(counters["stats"])
    rows = {name: json.loads((tmp_path / name / "probe_results.json").read_text())["results"]
            for name in ("eager", "compiled")}
    assert len(rows["eager"]) == len(rows["compiled"]) == 2
    for a, b in zip(rows["eager"], rows["compiled"]):
        assert (a["layers"], a["lr"], a["epoch"]) == (b["layers"], b["lr"], b["epoch"])
        assert (a["val_acc"], a["test_acc"]) == (b["val_acc"], b["test_acc"])
