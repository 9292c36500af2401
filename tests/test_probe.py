"""Linear probes: high accuracy on separable features, both solvers, the CLI's outputs."""
import json
import os

import numpy as np
import pytest
import torch

from megapix.probe import fit_logreg, probe, Standardizer


def blobs(n, d=16, classes=4, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, d)) * scale
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(size=(n, d))
    return torch.tensor(x * 5 + 40, dtype=torch.float32), torch.tensor(y)  # off-centre, scaled: needs standardising


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_probe_separable(solver):
    torch.set_num_threads(1)
    r = probe(blobs(600), blobs(200, seed=1), blobs(400, seed=2), 4, [1e-4, 1e-2], solver,
              max_iter=100, epochs=5, batch_size=128, lr=0.5)
    assert r["val_acc"] > 0.97 and r["test_acc"] > 0.97
    assert set(r["val_acc_by_l2"]) == {"0.0001", "0.01"}


def test_l2_shrinks_weights():
    X, y = blobs(300)
    Z = Standardizer(X)(X)
    w_small = fit_logreg(Z, y, 4, 1e-4, max_iter=100)[0].norm()
    w_big = fit_logreg(Z, y, 4, 1.0, max_iter=100)[0].norm()
    assert w_big < 0.5 * w_small


def _dump(path, layers, d, splits):
    """A feature dump in the `megapix extract` format (layer 2 separable, the others noise)."""
    os.makedirs(path, exist_ok=True)
    files, counts = {}, {}
    for i, (split, n) in enumerate(splits.items()):
        x, y = blobs(n, d=d, seed=i)
        noise = np.random.default_rng(10 + i).normal(size=(n, len(layers) * d)).astype(np.float16)
        noise[:, layers.index(2) * d:(layers.index(2) + 1) * d] = x.numpy()
        np.save(os.path.join(path, f"{split}_features.npy"), noise)
        np.save(os.path.join(path, f"{split}_labels.npy"), y.numpy())
        files[split] = {"features": f"{split}_features.npy", "labels": f"{split}_labels.npy"}
        counts[split] = n
    man = {"format": "megapix-features", "complete": True, "layers": layers, "d_model": d, "files": files,
           "counts": counts, "num_classes": 4, "model": {"n_layer": 6, "d_model": d}, "dtype": "float16"}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(man, f)


def test_probe_cli(tmp_path):
    from megapix.cli import main

    _dump(str(tmp_path), [0, 1, 2, 3, 4, 5], 8, {"train": 300, "val": 100, "test": 200})
    assert main(["probe", str(tmp_path), "--max-iter", "60", "--l2", "1e-3,1e-1"]) == 0
    res = json.loads((tmp_path / "probe_results.json").read_text())
    names = [r["name"] for r in res["results"]]
    assert names == [f"layer {i}" for i in range(6)] + ["concat5@2", "concat all"]
    by = {r["name"]: r for r in res["results"]}
    assert res["best_layer_by_val"] == 2 and by["layer 2"]["test_acc"] > 0.95 and by["layer 0"]["test_acc"] < 0.6
    assert by["concat5@2"]["layers"] == [0, 1, 2, 3, 4] and res["refit_on"] == "train+val"
    assert "| concat5@2 | 0..4 | 40 |" in (tmp_path / "probe_results.md").read_text()
    assert (tmp_path / "probe_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["probe", str(tmp_path), "--solver", "sgd", "--layers", "2", "--epochs", "3"]) == 0
    res = json.loads((tmp_path / "probe_results.json").read_text())
    assert res["solver"] == "sgd" and res["results"][0]["test_acc"] > 0.95


def test_probe_cli_errors(tmp_path, capsys):
    from megapix.cli import main

    assert main(["probe", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    _dump(str(tmp_path), [1, 2], 4, {"train": 40, "val": 20})
    assert main(["probe", str(tmp_path), "--layers", "3"]) == 2


def _truncate(p, keep):
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[:keep(len(data))])


@pytest.mark.parametrize("damage", ["features_truncated", "features_header", "labels_empty", "labels_pickled",
                                    "labels_short", "features_width", "test_truncated", "manifest_torn"])
def test_probe_damaged_dump_is_one_line(tmp_path, capsys, damage):
    """Truncated, corrupt or mismatched files of a feature dump: exit 2, one line naming the file and the fix;
    nothing is unpickled; a damaged test split is an error, not silently dropped."""
    from megapix.cli import main

    d = str(tmp_path)
    _dump(d, [1, 2], 4, {"train": 40, "val": 20, "test": 10})
    marker = tmp_path / "marker"
    target = {"features_truncated": "train_features.npy", "features_header": "val_features.npy",
              "labels_empty": "train_labels.npy", "labels_pickled": "val_labels.npy",
              "labels_short": "train_labels.npy", "features_width": "train_features.npy",
              "test_truncated": "test_features.npy", "manifest_torn": "manifest.json"}[damage]
    p = os.path.join(d, target)
    if damage in ("features_truncated", "test_truncated"):
        _truncate(p, lambda n: n - 50)
    elif damage == "features_header":
        _truncate(p, lambda n: 20)
    elif damage == "labels_empty":
        _truncate(p, lambda n: 0)
    elif damage == "labels_pickled":
        class Payload:
            def __reduce__(self):
                return (exec, (f"open({str(marker)!r}, 'w').close()",))
        np.save(p, np.array([Payload()] * 20, dtype=object), allow_pickle=True)
    elif damage == "labels_short":
        np.save(p, np.zeros(39, np.int64))
    elif damage == "features_width":
        np.save(p, np.zeros((40, 7), np.float32))
    elif damage == "manifest_torn":
        _truncate(p, lambda n: n // 2)
    assert main(["probe", d, "--max-iter", "5", "--l2", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and target in err and "megapix extract" in err, err
    assert not marker.exists()


def test_concatenations_centre_five_layers_on_the_best_and_add_all_unless_the_same():
    from megapix.probe import concatenations

    def singles(best, layers):
        return [{"layers": [l], "val_acc": 0.9 if l == best else 0.5} for l in layers]

    assert concatenations(list(range(9)), singles(0, range(9))) == [("concat5@0", [0, 1, 2, 3, 4]),
                                                                   ("concat all", list(range(9)))]
    assert concatenations(list(range(9)), singles(5, range(9)))[0] == ("concat5@5", [3, 4, 5, 6, 7])
    assert concatenations([2, 3, 4, 5, 6], singles(4, [2, 3, 4, 5, 6])) == [("concat5@4", [2, 3, 4, 5, 6])]
    assert concatenations([1, 3, 5], singles(3, [1, 3, 5])) == [("concat all", [1, 3, 5])]
    assert concatenations([0, 2, 4, 6, 8, 10], singles(4, [0, 2, 4, 6, 8, 10])) == [("concat all",
                                                                                      [0, 2, 4, 6, 8, 10])]
