"""`megapix probe --features DIR`: linear probes over a feature dump (megapix.probe), for every dumped layer and
the concatenations; `megapix probe --attentive --checkpoint RUN`: attention-pooling probes trained over the frozen
model (megapix.attentive). Both write probe_results.json/.md and probe_accuracy.png, merged with any rows there."""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch

from megapix import runfolder
from megapix.attentive import WEIGHT_DECAY, default_layers, open_splits, parse_lrs, train_probes
from megapix.cliargs import parse_command
from megapix.commands.options import PROBE_L2_GRID, ProbeConfig
from megapix.commands.runner import out_flag, run
from megapix.config import ConfigError
from megapix.features import model_summary, parse_layers
from megapix.model.compile import compile_blocks
from megapix.parallel import dist as pdist
from megapix.parallel.dist import World
from megapix.probe import concatenations, load_split, probe
from megapix.probe_results import merge_results, write_outputs
from megapix.utils import read_record


def main(argv=None) -> int:
    return run("megapix probe", lambda: _probe(argv), out_flag(argv))


def parse_args(argv=None) -> ProbeConfig:
    return parse_command("megapix probe", "Linear probes over dumped features: `megapix probe DIR`.", ProbeConfig,
                         argv)


def _probe(argv) -> int:
    args = parse_args(argv)
    return _attentive(args) if args.attentive else _linear(args)


# ---- linear probes over a feature dump ----
def _l2_grid(text: str) -> list[float]:
    try:
        grid = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ConfigError(f"cannot parse --l2 {text!r}; use e.g. {PROBE_L2_GRID}") from None
    if not grid or any(g < 0 for g in grid):
        raise ConfigError("--l2 needs one or more non-negative values")
    return grid


def _labels(y, split):
    if y is None:
        raise ConfigError(f"the {split} split has no labels; a probe needs labelled train and val splits")
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def _dump(args) -> dict:
    """The feature dump's splits (a missing test split is left out; a damaged one is an error like any other
    file), its labels, class count, layers and the layers to probe."""
    Xtr, ytr, man = load_split(args.dir, "train")
    Xva, yva, _ = load_split(args.dir, "val")
    Xte, yte = load_split(args.dir, "test")[:2] if "test" in man["files"] else (None, None)
    ytr, yva = _labels(ytr, "train"), _labels(yva, "val")
    yte = None if yte is None else torch.from_numpy(np.asarray(yte, dtype=np.int64))
    layers, chosen = man["layers"], man["layers"]
    if args.layers:
        chosen = parse_layers(args.layers, man["model"]["n_layer"])
        missing = [l for l in chosen if l not in layers]
        if missing:
            raise ConfigError(f"layer {missing[0]} was not dumped in {args.dir}; it holds {layers}")
    return {"X": (Xtr, Xva, Xte), "y": (ytr, yva, yte), "manifest": man, "layers": layers, "chosen": chosen,
            "d": man["d_model"], "num_classes": int(man.get("num_classes") or int(max(ytr.max(), yva.max())) + 1)}


def _linear(args) -> int:
    grid = _l2_grid(args.l2)
    dump = _dump(args)
    (Xtr, Xva, Xte), (ytr, yva, yte), layers, d = dump["X"], dump["y"], dump["layers"], dump["d"]
    solver = args.solver if args.solver != "auto" else "sgd" if len(ytr) >= args.sgd_threshold else "lbfgs"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and len(ytr) * Xtr.shape[1] < 20_000_000 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)  # small problems: intra-op threads only add synchronisation (30x slower on 2 cores)
    fit_kw = dict(max_iter=args.max_iter, epochs=args.epochs, lr=args.sgd_lr, batch_size=args.batch_size)

    def cols(X, ls):
        idx = np.concatenate([np.arange(layers.index(l) * d, (layers.index(l) + 1) * d) for l in ls])
        sub = X[:, idx[0]:idx[-1] + 1] if np.all(np.diff(idx) == 1) else X[:, idx]
        return torch.from_numpy(np.array(sub, dtype=np.float32))

    def one(name, ls):
        t0 = time.perf_counter()
        r = probe((cols(Xtr, ls), ytr), (cols(Xva, ls), yva), None if Xte is None else (cols(Xte, ls), yte),
                  dump["num_classes"], grid, solver, device, **fit_kw)
        r.update(probe="linear", name=name, layers=ls, dim=len(ls) * d, seconds=round(time.perf_counter() - t0, 2))
        print(f"  {name:<14} dim {r['dim']:>6}  l2 {r['l2']:<7g} val {100 * r['val_acc']:6.2f}"
              + (f"  test {100 * r['test_acc']:6.2f}" if "test_acc" in r else ""), flush=True)
        return r

    n_test = 0 if yte is None else len(yte)
    print(f"megapix probe: {len(ytr)} train / {len(yva)} val / {n_test} test rows, {dump['num_classes']} classes, "
          f"solver {solver} on {device}, l2 grid {grid}", flush=True)
    chosen = dump["chosen"]
    results = [one(f"layer {l}", [l]) for l in chosen]
    if args.concat and len(chosen) > 1:
        results += [one(name, ls) for name, ls in concatenations(chosen, results)]
    man = dump["manifest"]
    info = {"dir": os.path.abspath(args.dir), "checkpoint": man.get("checkpoint"), "model": man.get("model"),
            "solver": solver, "l2_grid": grid, "refit_on": "train+val",
            "selection": "l2 chosen by val accuracy of a train-only fit; test from a train+val refit",
            "counts": {"train": len(ytr), "val": len(yva), "test": n_test}, "num_classes": dump["num_classes"],
            "best_layer_by_val": max(results[:len(chosen)], key=lambda r: r["val_acc"])["layers"][0]}
    out = args.out or args.dir
    control = _control(args.control)
    os.makedirs(out, exist_ok=True)
    write_outputs(out, merge_results(out, results, info), control)
    return 0


def _control(folder: str | None) -> dict | None:
    """A random-init model's probe results (--control), drawn as the control curve."""
    if not folder:
        return None
    path = os.path.join(folder, "probe_results.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--control {folder}: no probe_results.json there; run `megapix probe --features "
                          f"{folder}` on the random-init dump first")
    return read_record(path)


# ---- attentive probes over the frozen model ----
def default_out(checkpoint: str) -> str:
    """Beside the model, never inside a run or an export (those folders belong to their own commands)."""
    return os.path.abspath(checkpoint).rstrip(os.sep) + "_attentive_probe"


def _attentive(args) -> int:
    world = World()
    out = args.out or default_out(args.checkpoint)
    try:
        runfolder.claim(out, "probe", "megapix probe --attentive")
        prepared, error = None, None
        try:
            lrs = parse_lrs(args.attentive_lr)
            model, splits, num_classes, device, data = open_splits(args, world)
            n_layer = model.config.n_layer
            layers = parse_layers(args.layers, n_layer) if args.layers else default_layers(n_layer)
            d, heads = model.config.d_model, args.attentive_heads
            if d % heads:
                raise ConfigError(f"--attentive-heads {heads} does not divide the model width {d}; pass a "
                                  f"divisor of {d}, e.g. {math.gcd(d, heads)}")
            prepared = (model, splits, num_classes, device, data, layers, lrs)
        except ConfigError as e:
            error = e
        error = pdist.shared_error(error)  # one rank's bad input stops every rank, with the same line
        if error is not None:
            raise error
        model, splits, num_classes, device, data, layers, lrs = prepared
        note = compile_blocks(model, args.compile, device)
        if note is not None and world.rank == 0:
            print(f"megapix probe --attentive: {note}", flush=True)
        how = "--layers" if args.layers else f"val accuracy among {len(layers)} layers spread over depth"
        if world.rank == 0:
            print(f"megapix probe --attentive: {args.checkpoint} ({n_layer} layers, d={model.config.d_model}) on "
                  f"{data}: {len(splits['train'])} train / {len(splits['val'])} val / "
                  f"{len(splits['test']) if 'test' in splits else 0} test rows, {num_classes} classes, layers "
                  f"{layers} (by {how}), lrs {lrs}, {args.attentive_epochs} epochs, {args.attentive_heads} heads, "
                  f"{world.world} rank(s) on {device}", flush=True)
        rows = train_probes(model, splits, layers, lrs, num_classes, args, device)
        if world.rank == 0:
            best = max(rows, key=lambda r: r["val_acc"])
            info = {"checkpoint": os.path.abspath(args.checkpoint), "data": data, "model": model_summary(model),
                    "num_classes": num_classes,
                    "attentive": {"selection": how, "best_layer_by_val": best["layers"][0], "lrs": lrs,
                                  "epochs": args.attentive_epochs, "heads": args.attentive_heads,
                                  "batch_size": args.attentive_batch_size,
                                  "weight_decay": WEIGHT_DECAY, "world_size": world.world, "seed": args.seed}}
            write_outputs(out, merge_results(out, rows, info), None, prefix="megapix probe --attentive")
        return 0
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
