"""Feature extraction: correctness (naive forward, HF ImageGPT), layer parsing, CLI round trip, kill-and-resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megapix.config import ConfigError, model_preset
from megapix.features import extract, parse_layers
from megapix.model import ImageGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_model(seed=0, **kw):
    cfg = model_preset("tiny", **{"n_layer": 3, "d_model": 32, "n_head": 2, **kw})
    model = ImageGPT(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-init head/norms would hide mistakes: perturb every parameter
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def export(path, seed=0, **kw):
    from megapix.data.palette import Palette

    model = random_model(seed, **kw)
    model.save_pretrained(str(path))
    rng = np.random.default_rng(seed)
    Palette(rng.uniform(-1, 1, (512, 3)).astype(np.float32)).save(os.path.join(str(path), "palette.npy"))
    return model


def naive(model, tokens, layers):
    with torch.no_grad():
        h = model.embed(tokens)
        feats = []
        for block in model.blocks:
            feats.append(block.norm_1(h).mean(1))
            h = block(h)
        feats.append(model.norm_f(h).mean(1))
    return torch.cat([feats[l] for l in layers], 1)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_extract_matches_naive_forward(objective):
    model = random_model(objective=objective)
    tokens = torch.randint(0, 512, (23, 64), generator=torch.Generator().manual_seed(1))
    layers = [3, 0, 2]
    out = extract(model, tokens, layers, batch_size=5)
    assert out.shape == (23, 3 * 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, naive(model, tokens, layers), atol=1e-6, rtol=1e-6)
    # blocks past max(layers) are never run: a broken last block does not change layers <= 1
    model.blocks[2].forward = None
    model.blocks[2].mlp = None
    torch.testing.assert_close(extract(model, tokens, [1, 0]), naive(random_model(objective=objective), tokens, [1, 0]))


def test_a_cpu_forward_takes_at_most_cpu_batch_tokens_and_the_features_stay_the_same(monkeypatch):
    """On a CPU, 256 rows asked of 64-token images run as CPU_BATCH_TOKENS // 64 rows per forward (cache-sized
    activations, benchmarks/bench_extract.py --cpu-batch); every row's features equal the one-row-at-a-time ones."""
    import megapix.features as features

    model = random_model()
    tokens = torch.randint(0, 512, (50, 64), generator=torch.Generator().manual_seed(1))
    one_by_one = extract(model, tokens, [0, 3], batch_size=1)
    monkeypatch.setattr(features, "CPU_BATCH_TOKENS", 1024)
    rows = []
    real = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda t, layers: rows.append(len(t)) or real(t, layers))
    torch.testing.assert_close(extract(model, tokens, [0, 3], batch_size=256), one_by_one, atol=1e-6, rtol=0)
    assert rows == [16, 16, 16, 2]
    rows.clear()
    extract(model, tokens, [0, 3], batch_size=10)  # a smaller batch asked is kept
    assert rows == [10] * 5


def test_extract_matches_hf_imagegpt(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model(seed=3)
    model.save_pretrained(str(tmp_path / "hf"))
    hf = transformers.ImageGPTModel.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, 512, (6, 64), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([torch.full((6, 1), 512), tokens[:, :-1]], 1)  # HF: SOS first
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states
        L = model.config.n_layer
        ref = [hf.h[l].ln_1(hs[l]).mean(1) for l in range(L)] + [hs[L].mean(1)]  # hs[L] already has ln_f
    layers = list(range(L + 1))
    torch.testing.assert_close(extract(model, tokens, layers), torch.cat(ref, 1), atol=1e-5, rtol=0)


def test_parse_layers():
    assert parse_layers("3,4,5", 8) == [3, 4, 5]
    assert parse_layers("2-6", 8) == [2, 3, 4, 5, 6]
    assert parse_layers("2:7", 8) == [2, 3, 4, 5, 6]
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert parse_layers(None, 2) == [0, 1, 2]
    assert parse_layers("5,1", 8) == [5, 1]
    assert parse_layers(None, 60, center=30, span=5) == [28, 29, 30, 31, 32]
    assert parse_layers(None, 8, center=8, span=5) == [4, 5, 6, 7, 8]  # clipped to the model
    assert parse_layers(None, 8, center=0) == [0, 1, 2, 3, 4]
    for bad in ("9", "1,x", "3-12", "1,1", "4:4"):
        with pytest.raises(ConfigError):
            parse_layers(bad, 8)
    with pytest.raises(ConfigError):
        parse_layers("1", 8, center=3)


def test_cli_extract_probe_round_trip(tmp_path, capsys):
    from megapix.cli import main
    from megapix.data.loader import TokenData
    from megapix.data.palette import Palette
    from megapix.data.sources import open_source

    model = export(tmp_path / "m")
    out = tmp_path / "feats"
    args = ["extract", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:48", "--layers", "1-3",
            "--out", str(out), "--chunk-size", "16", "--batch-size", "7"]
    assert main(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["layers"] == [1, 2, 3] and man["counts"] == {"train": 43, "val": 5, "test": 12}
    assert not list(out.glob("*.partial")) and not (out / ".extract_progress").exists()
    feats = np.load(out / "train_features.npy", mmap_mode="r", allow_pickle=False)
    labels = np.load(out / "train_labels.npy", allow_pickle=False)
    assert feats.shape == (43, 96) and feats.dtype == np.float32 and labels.shape == (43,)
    pal = Palette.load(str(tmp_path / "m" / "palette.npy"))
    td = TokenData(open_source("synthetic:48", 8).split("train"), 64, pal)
    ref = extract(model, td.tokens(np.arange(43)), [1, 2, 3])
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-6)
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out  # rerun of a complete dump
    assert main(["probe", str(out), "--max-iter", "50", "--l2", "1e-3,1e-1"]) == 0
    res = json.loads((out / "probe_results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["layer 1", "layer 2", "layer 3", "concat all"]
    assert (out / "probe_results.md").is_file() and (out / "probe_accuracy.png").stat().st_size > 1000


def test_cli_bad_input(tmp_path, capsys):
    from megapix.cli import main

    assert main(["extract", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    export(tmp_path / "m")
    assert main(["extract", "--checkpoint", str(tmp_path / "m"), "--data", "synthetic:16", "--layers", "7",
                 "--out", str(tmp_path / "o")]) == 2
    assert "layer index 7 is out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_extract_compiled_gives_the_eager_features(tmp_path):
    """`megapix extract --compile require` (each block through inductor): the same features as the eager forward,
    over batches of 7 whose splits end short (43 = 6 x 7 + 1, 5 and 12 rows): other sizes do not break it."""
    from megapix.data.loader import TokenData
    from megapix.data.palette import Palette
    from megapix.data.sources import open_source

    model = export(tmp_path / "m")
    out = tmp_path / "feats"
    proc = subprocess.run([sys.executable, "-m", "megapix", "extract", "--checkpoint", str(tmp_path / "m"), "--data",
                           "synthetic:48", "--layers", "1-3", "--out", str(out), "--chunk-size", "16", "--batch-size",
                           "7", "--compile", "require"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pal = Palette.load(str(tmp_path / "m" / "palette.npy"))
    for split, n in (("train", 43), ("test", 12)):
        feats = np.load(out / f"{split}_features.npy", allow_pickle=False)
        td = TokenData(open_source("synthetic:48", 8).split(split), 64, pal)
        ref = extract(model, td.tokens(np.arange(n)), [1, 2, 3])
        np.testing.assert_allclose(feats, ref.numpy(), atol=1e-4, rtol=1e-4)


def _extract_cmd(nproc, ckpt, out):
    args = ["-m", "megapix", "extract", "--checkpoint", ckpt, "--data", "synthetic:60", "--out", out,
            "--chunk-size", "4", "--batch-size", "4", "--layers", "0,2,3", "--dtype", "float16"]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 2000), *args]


@pytest.mark.slow
def test_kill_and_resume_two_ranks(tmp_path):
    export(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "resumed")
    ckpt = str(tmp_path / "m")
    from megapix.cli import main  # the uninterrupted reference, single rank, in this process

    assert main(_extract_cmd(1, ckpt, ref)[3:]) == 0
    # 2 ranks, each dies (os._exit, no cleanup) after 3 chunks: train has 54 rows = 14 chunks, 7 per rank
    killed = subprocess.run(_extract_cmd(2, ckpt, out), env={**env, "MEGAPIX_EXTRACT_STOP_AFTER_CHUNKS": "3"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    prog = tmp_path / "resumed" / ".extract_progress"
    done = [set(json.loads(p.read_text())["done"]) for p in prog.glob("train.rank*.json")]
    assert len(done) == 2 and all(len(d) == 3 for d in done)  # rank 0: chunks 0-2, rank 1: chunks 7-9
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert not (tmp_path / "resumed" / "train_features.npy").exists()  # never looks complete
    resumed = subprocess.run(_extract_cmd(2, ckpt, out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    man = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert man["complete"] and man["world_size"] == 2 and man["dtype"] == "float16"
    for split in ("train", "val", "test"):
        a = np.load(os.path.join(ref, f"{split}_features.npy"))
        b = np.load(os.path.join(out, f"{split}_features.npy"))
        assert a.dtype == np.float16 and a.shape == b.shape
        assert not np.all(b == 0, axis=1).any()  # no row lost (a zero row would be one never written)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.load(os.path.join(ref, f"{split}_labels.npy")),
                                      np.load(os.path.join(out, f"{split}_labels.npy")))


@pytest.mark.parametrize("tokens,problem", [
    (np.full((3, 64), 512), "token id 512 is outside [0, 512)"),
    (np.full((3, 64), -2), "token id -2 is outside [0, 512)"),
    (np.zeros((3, 64), np.float32), "integer palette ids, got dtype torch.float32"),
    (np.zeros(64, np.int64), "[batch, positions], got shape (64,)"),
    (np.zeros((3, 80), np.int64), "80 tokens per row exceed the model's 64 positions"),
])
def test_extract_refuses_bad_tokens(tokens, problem):
    model = random_model()
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        extract(model, tokens, [1])
    # a bad row anywhere is found before any batch runs, not after the good batches
    rows = np.zeros((9, 64), np.int64)
    rows[8, 5] = 600
    with pytest.raises(ConfigError, match="token id 600"):
        extract(model, rows, [3], batch_size=2)
