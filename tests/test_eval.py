"""The evaluation pieces: the embedded probe dataset, the probe against scikit-learn, the probe plot, and the
HF-native export (processor ids, classifier logits, file modes, config validation)."""
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from megapix.config import ConfigError, ModelConfig
from megapix.data.palette import Palette
from megapix.model import ImageGPT


# ---------------------------------------------------------------------------------------------------------
# digits-shifted
# ---------------------------------------------------------------------------------------------------------
def test_digits_shifted_is_deterministic_split_by_digit_and_hard_for_raw_pixels():
    from sklearn.linear_model import LogisticRegression

    from megapix.data.sources import open_source

    a = open_source("digits-shifted:2", 12, None, 0)
    b = open_source("digits-shifted:2", 12, None, 0)
    tr, va, te = (a.split(s) for s in ("train", "val", "test"))
    assert tr.images.shape[1:] == (12, 12, 3) and tr.images.dtype == np.uint8
    assert len(tr) + len(va) == 2 * 1500 and len(te) == 2 * 297
    np.testing.assert_array_equal(tr.images, b.split("train").images)
    # both placements of a digit sit on the same side of the holdout: no val image is a train image moved
    assert len(va) % 2 == 0 and set(np.unique(tr.labels)) == set(range(10))
    # enough distinct colours for a 512-centre palette, but few in any one image (no pixel noise): the digit's
    # 17 grey levels and at most one fragment's, blended between that image's background and stroke colours
    assert len(np.unique(tr.images.reshape(-1, 3), axis=0)) > 512
    assert max(len(np.unique(im.reshape(-1, 3), axis=0)) for im in tr.images[:200]) <= 35
    # raw pixels are far from the ceiling (plain 8x8 digits give ~98%), but above chance
    X = lambda s: s.images.reshape(len(s), -1).astype(np.float32) / 255
    clf = LogisticRegression(C=0.1, max_iter=300).fit(X(tr), tr.labels)
    acc = clf.score(X(te), te.labels)
    assert 0.12 < acc < 0.6, acc
    with pytest.raises(ConfigError, match="placements"):
        open_source("digits-shifted:x", 12)


def test_shapes_is_deterministic_balanced_and_decided_by_shape():
    from megapix.data.embedded import SHAPES, render_shapes
    from megapix.data.sources import open_source

    a, b = open_source("shapes:400", 16, None, 0), open_source("shapes:400", 16, None, 1)
    tr, va, te = (a.split(s) for s in ("train", "val", "test"))
    assert tr.images.shape[1:] == (16, 16, 3) and tr.images.dtype == np.uint8 and a.num_classes == len(SHAPES) == 4
    assert len(tr) + len(va) == 400 and len(te) == 80 and len(va) == 40
    # the data is fixed (the seed picks only the holdout): the same test set, the same train+val images
    np.testing.assert_array_equal(te.images, b.split("test").images)
    both = lambda s: np.concatenate([s.split("train").images, s.split("val").images])
    np.testing.assert_array_equal(np.sort(both(a).reshape(400, -1), 0), np.sort(both(b).reshape(400, -1), 0))
    # one generator state draws one set of images
    big, y_big = render_shapes(600, 16, np.random.default_rng(5))
    again, y_again = render_shapes(600, 16, np.random.default_rng(5))
    np.testing.assert_array_equal(big, again)
    np.testing.assert_array_equal(y_big, y_again)
    assert np.bincount(y_big).tolist() == [150] * 4  # balanced classes
    # enough distinct colours for a 512-centre palette (soft edges), few in any one image
    assert len(np.unique(tr.images.reshape(-1, 3), axis=0)) > 512
    assert max(len(np.unique(im.reshape(-1, 3), axis=0)) for im in tr.images[:100]) <= 24
    # the same ink per class (outline size and stroke scaled by class), so a colour count does not give it away
    ink = np.array([(im.astype(np.float32).max(-1) > im.astype(np.float32).max(-1).min() + 20).sum() for im in big])
    per_class = [ink[y_big == k].mean() for k in range(4)]
    assert max(per_class) / min(per_class) < 1.35, per_class
    # raw pixels are weak: the place varies more than the outline is large (measured 47% test on shapes:3000)
    from sklearn.linear_model import LogisticRegression

    X = lambda s: s.images.reshape(len(s), -1).astype(np.float32) / 255
    assert LogisticRegression(C=0.1, max_iter=300).fit(X(tr), tr.labels).score(X(te), te.labels) < 0.6
    with pytest.raises(ConfigError, match="number of train"):
        open_source("shapes:x", 16)
    with pytest.raises(ConfigError, match="canvas of at least 8"):
        render_shapes(4, 6, np.random.default_rng(0))


def test_outlines_are_grey_hard_edged_and_hard_for_raw_pixels():
    from sklearn.linear_model import LogisticRegression

    from megapix.data.embedded import OUTLINE_LEVELS, render_outlines
    from megapix.data.sources import open_source

    a, b = open_source("outlines:1500", 16, None, 0), open_source("outlines:1500", 16, None, 1)
    tr, te = a.split("train"), a.split("test")
    assert len(tr) + len(a.split("val")) == 1500 and len(te) == 300 and a.num_classes == 4
    np.testing.assert_array_equal(te.images, b.split("test").images)  # fixed data; the seed picks the holdout
    img, y = render_outlines(400, 16, np.random.default_rng(3))
    assert np.bincount(y).tolist() == [100] * 4
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()  # grey: no hue
    levels = np.rint(255 * OUTLINE_LEVELS)
    for im in img[:, :, :, 0].astype(np.float64):
        u, counts = np.unique(im, return_counts=True)
        bg = u[counts.argmax()]
        fg = u[np.abs(u - bg).argmax()]
        # hard edges: background, stroke and the clutter bar's grey halfway between them, nothing else
        assert bg in levels and fg in levels and abs(fg - bg) >= np.rint(255 * 3 / 7) - 1  # 3 levels apart at least
        assert all(abs(v - (bg + fg) / 2) <= 1 for v in u if v not in (bg, fg)) and len(u) <= 3
    signs = [np.sign(im.max() - np.bincount(im.ravel()).argmax()) for im in img[:, :, :, 0].astype(np.int64)]
    assert 0.3 < np.mean(np.array(signs) > 0) < 0.7  # both polarities, about equally often
    # raw pixels near chance (measured 30.5% test on outlines:3000): a template cannot follow the contrast's sign.
    # One channel (the image is grey) and 100 iterations: 1 s where 768 columns and 300 took 14 s, same accuracy
    X = lambda s: s.images[..., 0].reshape(len(s), -1).astype(np.float32) / 255
    assert LogisticRegression(C=0.1, max_iter=100).fit(X(tr), tr.labels).score(X(te), te.labels) < 0.4
    with pytest.raises(ConfigError, match="outlines:x: N is the number"):
        open_source("outlines:x", 16)
    with pytest.raises(ConfigError, match="canvas of at least 8"):
        render_outlines(4, 6, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------------
# the probe against scikit-learn
# ---------------------------------------------------------------------------------------------------------
def test_probe_matches_sklearn_logistic_regression_within_one_point():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from megapix.probe import Standardizer, probe

    d = load_digits()
    rng = np.random.default_rng(0)
    # features with structure and noise: a random projection of the digits plus noise
    X = d.data @ rng.normal(size=(64, 48)) + rng.normal(scale=8.0, size=(len(d.data), 48))
    X = torch.from_numpy(X.astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, va, te = slice(0, 1200), slice(1200, 1500), slice(1500, None)
    l2 = 1e-2
    r = probe((X[tr], y[tr]), (X[va], y[va]), (X[te], y[te]), 10, [l2], "lbfgs", "cpu")
    # same model: mean CE + l2/2 |W|^2 on train+val standardised with train+val statistics <=> C = 1/(l2 n)
    Xall, yall = X[:1500], y[:1500]
    std = Standardizer(Xall)
    sk = LogisticRegression(C=1.0 / (l2 * len(yall)), max_iter=5000, tol=1e-8)
    sk.fit(std(Xall).numpy(), yall.numpy())
    sk_acc = sk.score(std(X[te]).numpy(), y[te].numpy())
    assert 0.3 < r["test_acc"] < 0.99  # not a degenerate problem
    assert abs(r["test_acc"] - sk_acc) <= 0.01, (r["test_acc"], sk_acc)


# ---------------------------------------------------------------------------------------------------------
# the probe plot
# ---------------------------------------------------------------------------------------------------------
def _summary(accs, concat=None):
    res = [{"name": f"layer {l}", "layers": [l], "val_acc": a, "test_acc": a} for l, a in enumerate(accs)]
    if concat:
        res.append({"name": "concat5@2", "layers": concat, "val_acc": 0.6, "test_acc": 0.6})
    return {"results": res, "num_classes": 10, "model": {"n_layer": len(accs) - 1, "d_model": 8}}


def test_probe_plot_has_chance_line_integer_ticks_labels_and_control(tmp_path, monkeypatch):
    import matplotlib

    from megapix import probe_results as probe

    def refuse(*a, **k):
        raise AssertionError("probe changed the caller's matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    summary, control = _summary([0.2, 0.4, 0.5, 0.45, 0.3], [0, 1, 2, 3, 4]), _summary([0.15, 0.2, 0.2, 0.18, 0.16])
    path = str(tmp_path / "p.png")
    out = probe.plot(summary, path, control=control)
    assert out == path and open(path, "rb").read(4) == b"\x89PNG"
    ax = probe.figure(summary, control).axes[0]
    seen = {"ticks": list(ax.get_xticks()), "ylim": ax.get_ylim(),
            "labels": [t.get_text() for t in ax.get_legend().get_texts()]}
    assert seen["ticks"] == [0, 1, 2, 3, 4]
    assert seen["ylim"] == (0.0, 100.0)
    assert any(l.startswith("chance (10%)") for l in seen["labels"])
    assert any("random init" in l for l in seen["labels"])
    assert any(l.startswith("layers 0-4 concatenated") for l in seen["labels"])
    assert probe.probe_label([1, 3, 5]) == "layers 1,3,5 concatenated" and probe.probe_label([2]) == "layer 2"


# ---------------------------------------------------------------------------------------------------------
# HF-native export
# ---------------------------------------------------------------------------------------------------------
CFG = dict(n_layer=2, d_model=32, n_head=4, resolution=8)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = ImageGPT(ModelConfig(**{**CFG, **kw}))
    with torch.no_grad():  # the head and norms start at 0 / 1: give every tensor values so a mix-up shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _palette(seed=0, k=512):
    rng = np.random.default_rng(seed)
    return Palette(rng.uniform(-1, 1, size=(k, 3)).astype(np.float32))


def test_export_writes_processor_generation_card_provenance_with_0644(tmp_path):
    from megapix.model.hf import read_provenance, save_state_dict_pretrained

    m, pal = _model(), _palette()
    out = str(tmp_path / "export")
    card = {"preset": "tiny", "data": "digits-shifted", "steps": 300, "loss": 1.3125, "layout": "TP1 PP1 DP1",
            "command": "megapix train --max-steps 300"}
    save_state_dict_pretrained(m.state_dict(), m.config, out, palette=pal, card=card,
                               provenance={"data": "digits-shifted"})
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "generation_config.json", "README.md",
            "megapix.json", "palette.npy"} <= names
    for n in names:
        assert stat.S_IMODE(os.stat(os.path.join(out, n)).st_mode) == 0o644, n
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    readme = open(os.path.join(out, "README.md")).read()
    for v in ("tiny", "digits-shifted", "300", "1.3125", "TP1 PP1 DP1", "`megapix train --max-steps 300`"):
        assert v in readme, v
    prov = read_provenance(out)
    assert prov["data"] == "digits-shifted" and prov["resolution"] == 8
    np.testing.assert_array_equal(np.load(prov["palette_path"]), pal.centres)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["bos_token_id"] == 512 and gen["max_length"] == 65 and gen["top_k"] == 0
    # the old three-argument call still works and writes no palette files
    save_state_dict_pretrained(m.state_dict(), m.config, str(tmp_path / "plain"))
    assert "preprocessor_config.json" not in os.listdir(tmp_path / "plain")
    back = ImageGPT.from_pretrained(out)
    t = torch.randint(0, 512, (2, 64))
    torch.testing.assert_close(back(t), m(t), atol=1e-5, rtol=0)


def test_hf_image_processor_gives_palette_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megapix.model.hf import save_pretrained

    pal, res = _palette(1), 8
    m = _model(resolution=res)
    out = str(tmp_path / "export")
    save_pretrained(m, out, palette=pal)
    proc = transformers.ImageGPTImageProcessor.from_pretrained(out)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(6, res, res, 3), dtype=np.uint8)
    ids = proc([im for im in images], return_tensors="pt")["input_ids"]
    np.testing.assert_array_equal(np.asarray(ids), pal.encode(images))


def test_classifier_export_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megapix.finetune import Classifier
    from megapix.model.hf import save_classifier_pretrained

    clf = Classifier(_model(2), 10)
    with torch.no_grad():
        clf.clf.weight.normal_()
    out = str(tmp_path / "clf")
    sd = clf.model.state_dict()
    save_classifier_pretrained(sd, clf.model.config, clf.clf.weight, out, bias=clf.clf.bias,
                               labels=[f"digit {i}" for i in range(10)], palette=_palette())
    hf, info = transformers.ImageGPTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] or info["missing_keys"] == set(), info
    assert not info.get("mismatched_keys"), info
    hf.eval()
    tokens = torch.randint(0, 512, (3, 64))
    _, _, _, ours = clf.eval()(tokens, torch.zeros(3, dtype=torch.long))
    sos = torch.full((3, 1), 512)
    with torch.no_grad():
        theirs = hf(input_ids=torch.cat([sos, tokens[:, :-1]], 1)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert hf.config.id2label[3] == "digit 3"
    # megapix reads it back as a backbone: the same pooled features as the fine-tuned model
    back = ImageGPT.from_pretrained(out)
    from megapix.features import extract

    torch.testing.assert_close(extract(back, tokens, [2]), extract(clf.model, tokens, [2]), atol=1e-5, rtol=0)
    # a head with a bias (another trainer's) has no exact HF form: refused, nothing written
    with pytest.raises(ConfigError, match="bias"):
        save_classifier_pretrained(sd, clf.model.config, clf.clf.weight, str(tmp_path / "b"),
                                   bias=torch.full((clf.clf.weight.shape[0],), 0.5))
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("key", ["n_layer", "n_embd", "n_head", "n_positions"])
def test_from_pretrained_names_a_missing_config_key(tmp_path, key):
    m = _model()
    out = str(tmp_path / "export")
    m.save_pretrained(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    del cfg[key]
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ConfigError, match=f"'{key}'"):
        ImageGPT.from_pretrained(out)


def test_from_pretrained_names_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model()
    out = str(tmp_path / "export")
    m.save_pretrained(out)
    st = os.path.join(out, "model.safetensors")
    sd = load_file(st)
    del sd["transformer.h.1.ln_2.weight"]
    save_file(sd, st)
    with pytest.raises(ConfigError, match="h.1.ln_2.weight"):
        ImageGPT.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------------
# the study's report writer (the study itself takes minutes: examples/small_scale_probe.py)
# ---------------------------------------------------------------------------------------------------------
def study_module():
    """examples/small_scale_probe.py, imported (it is a script, not a package module)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("small_scale_probe",
                                                  os.path.join(root, "examples", "small_scale_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_report_means_spreads_claims_and_figure(tmp_path):
    mod = study_module()

    def model(accs, best, concat=True, shift=0.0):
        r = {"layers": [{"layer": l, "val_acc": a + shift, "test_acc": a + shift - 0.01, "l2": 1e-3}
                        for l, a in enumerate(accs)], "best_layer": best}
        if concat:
            r["concat3"] = {"layers": [best - 1, best, best + 1], "val_acc": 0.7, "test_acc": 0.69 + shift}
            r["concat5"] = {"layers": list(range(best - 2, best + 3)), "val_acc": 0.72, "test_acc": 0.71 + shift}
        return r

    def seed(s, shift):
        ckpts = [dict(model([0.3, 0.4, 0.5, 0.4, 0.3], 2, concat=False, shift=shift), step=50, val_loss=3.0 - shift),
                 dict(model([0.3, 0.5, 0.65, 0.5, 0.4], 2, shift=shift), step=100, val_loss=2.5 - shift)]
        ft = {"curves": {"pretrained": [(10, 0.5), (20, 0.7)], "scratch": [(10, 0.3), (20, 0.45)]},
              "scratch_final_val": 0.45, "pretrained_final_val": 0.7, "scratch_test": 0.44, "pretrained_test": 0.69,
              "steps": 20, "steps_to_scratch_final": 10, "fraction": 0.5, "lr": 1e-3}
        return {"seed": s, "counts": {"train": 10, "val": 2, "test": 3}, "chance": 0.25,
                "raw_pixels": {"val_acc": 0.25, "test_acc": 0.24 + shift}, "checkpoints": ckpts, "ar": ckpts[-1],
                "random_init": model([0.2, 0.22, 0.2, 0.2, 0.19], 1, shift=shift), "finetune": ft,
                "bert": dict(model([0.3, 0.45, 0.5, 0.45, 0.35], 2, shift=shift), val_loss=2.9),
                "timings": {"total_s": 10.0, "pretrain_s": 5.0, "finetune_s": 2.0, "probe_s": 3.0}, "threads": 1,
                "attentive": {"layers": [1, 2, 3], "layer": 2, "lr": 1e-2, "epoch": 9, "val_acc": 0.7,
                              "test_acc": 0.69 + 2 * shift, "epochs": 10},
                "attentive_control": {"layers": [1, 2, 3], "layer": 1, "lr": 1e-2, "epoch": 5, "val_acc": 0.6,
                                      "test_acc": 0.6 + shift, "epochs": 10}}

    config = {"command": "python examples/small_scale_probe.py --seeds 0,1", "data": "shapes", "steps": 100,
              "model": {"n_layer": 4, "d_model": 8, "n_head": 2, "resolution": 12}, "batch": 64, "lr": 3e-3,
              "ft_eval_every": 10, "load": "1.0, 1.2"}
    paths = mod.write_report([seed(0, 0.0), seed(1, 0.02)], config, str(tmp_path))
    md = open(paths[1]).read()
    # layer 2: AR 64 and 66 -> 65.0 +- 1.4 (sample sd); BERT 49/51; control 19/21
    assert "| 2 | 65.0 ± 1.4 | 50.0 ± 1.4 | 20.0 ± 1.4 |" in md
    assert "| 5 layers centred on the best, concatenated | 72.0 ± 1.4 (gain 7.0 ± 0.0)" in md
    assert "| 100 | 2.490 ± 0.014 | 65.0 ± 1.4 |" in md
    assert "Raw pixels: 25.0 ± 1.4." in md
    claims = {c["claim"]: c for c in json.load(open(paths[0]))["summary"]["claims"]}
    assert claims["best AR layer >= 5 points above raw pixels"]["holds"]
    assert claims["AR above BERT under linear probes (best layer)"]["holds"]
    deep = next(c for k, c in claims.items() if k.startswith("(not a paper claim"))
    assert deep["measured"] == "+31.0 ± 0.0 points" and deep["holds"]  # (.5+.65+.5+.4)/4 - (.22+.2+.2+.19)/4
    assert not any(c["holds"] for k, c in claims.items() if k.startswith("probe accuracy rises"))  # 2 checkpoints
    assert ("| best AR layer strictly inside the network (in 1..3 of 0..4) for every seed | best layers [2, 2] | yes |"
            in md)
    assert "Steps the pre-trained run needs to reach the scratch run's final val accuracy, per seed: [10, 10]" in md
    # the attentive row: 69 and 73 against best layers 64 and 66 -> gain 6.0 +- 1.4: the +5 claim holds
    # beside it the control's: 60 and 62 (layers 1, 1), so the attentive gap over the control is 9 and 11
    assert "epochs), layer by val per seed 2, 2 | 71.0 ± 2.8 (gain 6.0 ± 1.4) | - | 61.0 ± 1.4, layers 1, 1 |" in md
    att = next(c for k, c in claims.items() if k.startswith("attentive probe"))
    assert att["measured"] == "+6.0 points" and att["holds"]
    ctl = next(c for k, c in claims.items() if k.startswith("(not a paper claim) the attentive probe above"))
    assert ctl["measured"] == "+10.0 ± 1.4 points" and ctl["holds"]
    assert open(paths[2], "rb").read(4) == b"\x89PNG"
    ft = next(c for k, c in claims.items() if k.startswith("fine-tuning"))
    assert ft["measured"] == "steps [10, 10] of 20" and ft["holds"]
    # a scratch fine-tune that ends near chance (25%) sets no target: the claim fails and says why
    stuck = [seed(0, 0.0), seed(1, 0.02)]
    stuck[1]["finetune"]["scratch_final_val"] = 0.27
    (tmp_path / "stuck").mkdir()
    paths = mod.write_report(stuck, config, str(tmp_path / "stuck"))
    ft = next(c for c in json.load(open(paths[0]))["summary"]["claims"] if c["claim"].startswith("fine-tuning"))
    assert not ft["holds"] and "ends within 5 points of chance on 1 of 2 seeds (final val 45.0%, 27.0%)" in ft[
        "measured"]


def test_outlines_large_are_outlines_drawn_larger_and_still_hard_for_raw_pixels():
    from sklearn.linear_model import LogisticRegression

    from megapix.data.sources import open_source

    small, large = open_source("outlines:600", 16, None, 0), open_source("outlines-large:600", 16, None, 0)
    for name in ("train", "val", "test"):  # the same classes and holdout: only the sizes differ
        np.testing.assert_array_equal(small.split(name).labels, large.split(name).labels)
    te_s, te_l = small.split("test").images[..., 0], large.split("test").images[..., 0]
    assert (te_l == te_s).all(axis=(1, 2)).mean() < 0.05  # redrawn, not copied
    ink = lambda im: np.mean([(x != np.bincount(x.ravel()).argmax()).sum() for x in im.astype(np.int64)])
    assert ink(te_l) > 1.3 * ink(te_s)  # more of each image is the outline
    assert (large.split("train").images[..., 0] == large.split("train").images[..., 2]).all()  # grey
    # raw pixels near chance (measured 31.2% on outlines-large:3000, scikit-learn, one channel)
    more = open_source("outlines-large:1500", 16, None, 0)
    tr, te = more.split("train"), more.split("test")
    X = lambda s: s.images[..., 0].reshape(len(s), -1).astype(np.float32) / 255
    assert LogisticRegression(C=0.1, max_iter=100).fit(X(tr), tr.labels).score(X(te), te.labels) < 0.4
    with pytest.raises(ConfigError, match="outlines-large:x: N is the number"):
        open_source("outlines-large:x", 16)


def test_study_probe_rows_cap_the_probes_training_rows(tmp_path):
    mod = study_module()
    path = mod.fit_palette(str(tmp_path), "outlines:100", 16, 0)
    full, capped = (mod.Study("outlines:100", 16, path, 0, "cpu", 20, rows) for rows in (0, 30))
    assert len(full.labels["train"]) == 90 and len(capped.labels["train"]) == 30
    assert torch.equal(capped.tokens["train"][:30], full.tokens["train"][:30])
    assert torch.equal(capped.tokens["test"], full.tokens["test"])  # val and test untouched
    assert len(capped.splits["train"]) == 30 and len(capped.splits["val"]) == len(full.splits["val"])


def test_study_parallel_seeds_runs_one_process_per_seed(tmp_path, monkeypatch):
    """--parallel-seeds: each seed is this script with the same arguments, its own --seeds, the absolute --out and
    a report beside its results; the report over all seeds then reads their cached results."""
    mod = study_module()
    seen = []
    monkeypatch.setattr(mod, "run_side_by_side", seen.extend)
    args = mod.parse_args(["--out", "rel/out", "--seeds", "3,5", "--parallel-seeds", "--steps", "7"])
    mod.run_seeds_at_once(args, ["--out", "rel/out", "--seeds", "3,5", "--parallel-seeds", "--steps", "7"])
    out = os.path.abspath("rel/out")
    assert [name for name, _, _ in seen] == ["seed 3", "seed 5"]
    for (_, cmd, log), s in zip(seen, (3, 5)):
        assert cmd[2:] == ["--steps", "7", "--seeds", str(s), "--out", out, "--report", os.path.join(out, f"seed{s}")]
        assert log == os.path.join(out, f"seed{s}.log")


def test_study_palette_keeps_every_colour_of_data_under_512_colours(tmp_path):
    """outlines has 14 greys, too few for k-means' 512 centres: the study gives each its own id (exact round trip)
    and pads the palette with colours the data never uses."""
    from megapix.data.sources import open_source

    path = study_module().fit_palette(str(tmp_path), "outlines:100", 16, 0)
    pal = Palette.load(path)
    images = open_source("outlines:100", 16, None, 0, augment=False).split("test").images
    ids = pal.encode(images)
    np.testing.assert_array_equal(pal.decode(ids, 16, 16), images)
    assert len(np.unique(pal.centres, axis=0)) == 512  # no two ids share a colour


@pytest.mark.slow
def test_study_runs_the_attentive_probe_cli_and_reuses_it(tmp_path):
    """A tiny study on outlines (2 layers x d32, 10 steps; four runs): the attentive row comes from
    `megapix probe --attentive` at the best linear layer and its neighbours; a rerun reads the cached seed; a seed
    whose result.json is gone reuses the attentive probe's folder, unless the epochs differ; the fine-tune pair is
    filled into a finished seed, and run again for other steps."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "study"
    cmd = [sys.executable, os.path.join(root, "examples", "small_scale_probe.py"), "--data", "outlines:200", "--out",
           str(out), "--seeds", "0", "--layers", "2", "--d-model", "32", "--heads", "2", "--steps", "10",
           "--ckpt-every", "5", "--no-bert", "--no-finetune", "--attentive-epochs", "1", "--threads", "1"]
    first = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    r = json.load(open(out / "seed0" / "result.json"))
    assert r["attentive"]["layers"] == [0, 1, 2]  # 3 layers around the best of 0..2: all of them
    rows = json.load(open(out / "seed0" / "attentive" / "probe_results.json"))["results"]
    top = max((x for x in rows if x["probe"] == "attentive"), key=lambda x: x["val_acc"])
    assert r["attentive"]["test_acc"] == top["test_acc"] and r["attentive"]["layer"] in r["attentive"]["layers"]
    md = (out / "probe_study.md").read_text()
    assert "| attentive probe (`megapix probe --attentive`, 1 epochs)" in md and "attentive probe (best of" in md
    # the same probe over the random-init control, exported with the seed's palette, at the same layers
    ctl = json.load(open(out / "seed0" / "attentive_control" / "probe_results.json"))
    assert ctl["checkpoint"] == str(out / "seed0" / "random_init") and r["attentive_control"]["layers"] == [0, 1, 2]
    assert r["attentive_control"]["test_acc"] == max((x for x in ctl["results"] if x["probe"] == "attentive"),
                                                     key=lambda x: x["val_acc"])["test_acc"]
    assert "the same probe over the random-init control" in md
    # a rerun over a result.json from before the control's row: the seed is done before, the row is added, and
    # nothing else runs again (one run for both cases: each costs a process start and the imports)
    old = json.load(open(out / "seed0" / "result.json"))
    del old["attentive_control"]
    json.dump(old, open(out / "seed0" / "result.json", "w"))
    shutil.rmtree(out / "seed0" / "attentive_control")
    added = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert added.returncode == 0, added.stdout[-2000:] + added.stderr[-2000:]
    assert added.stdout.count("probe --attentive") == 1 and "seed 0: done before" in added.stdout
    assert json.load(open(out / "seed0" / "result.json"))["attentive_control"] == r["attentive_control"]
    (out / "seed0" / "result.json").unlink()
    third = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "probe --attentive" not in third.stdout  # the finished attentive probe is read, not run again
    assert json.load(open(out / "seed0" / "result.json"))["attentive"] == r["attentive"]
    (out / "seed0" / "result.json").unlink()  # other epochs: the attentive probe runs again, its rows replaced
    fourth = subprocess.run([*cmd[:-3], "2", *cmd[-2:]], cwd=root, capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0 and "probe --attentive" in fourth.stdout, fourth.stderr[-2000:]
    assert json.load(open(out / "seed0" / "result.json"))["attentive"]["epochs"] == 2
    # the fine-tune pair added to a --no-finetune study: only it runs; other steps run it again
    for steps in ("4", "6"):
        with_ft = [*cmd[:-3], "2", *cmd[-2:]]
        i = with_ft.index("--no-finetune")
        with_ft[i:i + 1] = ["--ft-steps", steps, "--ft-eval-every", "2"]
        ft = subprocess.run(with_ft, cwd=root, capture_output=True, text=True, timeout=600)
        assert ft.returncode == 0, ft.stdout[-2000:] + ft.stderr[-2000:]
        assert "seed 0: done before" in ft.stdout and "probe --attentive" not in ft.stdout
        assert ft.stdout.count("-m megapix finetune") == 2, ft.stdout[-2000:]
        r = json.load(open(out / "seed0" / "result.json"))
        assert r["finetune"]["steps"] == int(steps) and r["finetune"]["curves"]["scratch"][-1][0] == int(steps)
    assert "Fine-tuning" in (out / "probe_study.md").read_text()


# the guard: the study at a reduced size, calibrated over seeds 0, 1, 2; a change to training, extraction or the
# probes that loses what pre-training learns fails here.
# shapes named: the guard was calibrated on it. Not moved to the third attempt's outlines-large: there the random-init
# control probes above raw pixels and above the pre-trained layers at 200 steps (docs/probe_study), and a reduced run
# of it could not be calibrated over 3 seeds on the shared machine in the time (docs/evaluation.md#the-guard-test);
# no attentive probe: it would add minutes and the guard does not check it
GUARD_ARGS = ["--data", "shapes", "--seeds", "0", "--layers", "4", "--steps", "150", "--ckpt-every", "150",
              "--no-bert", "--no-finetune", "--no-attentive", "--threads", "2"]
# seeds 0, 1, 2 of GUARD_ARGS (probes on 1 thread): gain of AR layers 1..4 over the control's, in points
GUARD_MEASURED = {"gains": [9.0, 6.3, 6.0], "mean": 7.1, "sd": 1.6}
GUARD_MARGIN = 3.0  # about the mean minus 2.5 sd, twice the sd: an untrained model (gain ~0) fails it


@pytest.mark.slow
def test_study_guard_pretrained_layers_beat_the_random_init_control(tmp_path):
    """The reduced study (4 layers x d64, 16x16 shapes, 150 AR steps, seed 0; ~4 min on 2 cores): its pre-trained
    layers 1..4 probe above the same layers of the random-init control by more than the spread over seeds.

    Measured over seeds 0, 1, 2 (GUARD_MEASURED): the AR-minus-control gain of layers 1..4 averages 7.1 points
    with a sample sd of 1.6; the test asks for more than GUARD_MARGIN (3 points). Raw pixels are not part of the
    assertion: at this scale no pooled layer beats them reliably (docs/probe_study_shapes), so asserting it would
    fail on a healthy tree."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "small_scale_probe.py"), "--out", str(out),
                           *GUARD_ARGS], cwd=root, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.load(open(out / "seed0" / "result.json"))
    gain = study_module().deep_layer_gain(r)  # the report's row, computed once
    ar, ctl = ([x["test_acc"] for x in r[k]["layers"][1:]] for k in ("ar", "random_init"))
    assert gain > GUARD_MARGIN, (f"pre-trained layers 1..4 only {gain:+.1f} points above the random-init control "
                                 f"(AR {ar}, control {ctl}); expected > {GUARD_MARGIN} (measured {GUARD_MEASURED})")
    assert (out / "probe_study.md").is_file() and (out / "probe_study.png").is_file()
