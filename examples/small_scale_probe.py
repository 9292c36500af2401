"""The paper's linear-probe findings at CPU scale, from one command.

    python examples/small_scale_probe.py --out runs/probe_study --report docs/probe_study [--seed 0]

On the embedded `digits-shifted:2` data (two placements of each digit at random offsets on a 10x10 canvas, with
clutter; no download):
1. fits one palette, then pre-trains (300 steps, batch 32) an 8-layer, d=64 iGPT with the AR objective and, side by side with the
   same settings, with BERT (megapix/train.py, one thread each; rerunning resumes finished runs), saving a
   checkpoint (and measuring validation loss) every --ckpt-every steps;
2. extracts every layer's pooled feature (0..8; 8 = after the final norm) of the AR model, the BERT model,
   the same architecture at random init (the control) and every saved AR checkpoint;
3. fits L-BFGS logistic probes (megapix.probe.probe: l2 picked on val, test from a train+val refit), on raw
   pixels too, and on the 3- and 5-layer concatenations centred on the AR model's best layer (by val);
4. writes REPORT/probe_study.md (tables), REPORT/probe_study.json and REPORT/probe_study.png (accuracy by depth
   against the control, raw pixels and chance; probe accuracy of each checkpoint against its validation loss).

The paper's questions: is probe accuracy unimodal in depth with the best layer in the middle; does a
concatenation around the best layer beat it; does lower generative loss go with better features; AR vs BERT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megapix.utils import read_metrics  # noqa: E402 (after the repository is on sys.path)

MODEL = {"preset": "tiny", "n_layer": 8, "d_model": 64, "n_head": 4, "resolution": 10}
L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1]


def fit_palette(out: str, data: str, seed: int) -> str:
    """One palette for both runs (k-means on the training pixels, as training would fit it), so that the AR and
    BERT models read the same ids and can train side by side."""
    from megapix.data.palette import Palette
    from megapix.data.sources import open_source

    path = os.path.join(out, "palette.npy")
    if not os.path.isfile(path):
        t0 = time.perf_counter()
        images = open_source(data, MODEL["resolution"], None, seed, augment=False).split("train").images
        Palette.fit(images.reshape(-1, 3), k=512, seed=seed).save(path)
        print(f"palette: fitted on {len(images)} training images in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return path


def pretrain(out: str, objectives, palette: str, args) -> dict[str, str]:
    """Train one model per objective, side by side (one thread each: two cores, two runs)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    runs, procs = {}, []
    for objective in objectives:
        cfg = os.path.join(out, f"config_{objective}.json")
        with open(cfg, "w") as f:
            json.dump({"model": {**MODEL, "objective": objective}, "data": {"source": args.data, "palette": palette},
                       "train": {"global_batch": args.batch, "lr": args.lr, "seed": args.seed}}, f)
        runs[objective] = run = os.path.join(out, f"pretrain_{objective}")
        cmd = [sys.executable, "megapix/train.py", "--config", cfg, "--max-steps", str(args.steps), "--out", run,
               "--no-samples", "--eval-every", str(args.ckpt_every), "--save-every", str(args.ckpt_every), "--resume-if-exists"]
        print("+", " ".join(cmd), f"> {run}.log", flush=True)
        log = open(run + ".log", "a")
        procs.append((objective, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    for objective, proc, log in procs:
        rc = proc.wait()
        log.close()
        if rc != 0:
            sys.exit(f"small_scale_probe: the {objective} pre-training failed (exit {rc}); see {runs[objective]}.log")
    return runs


def val_losses(run: str) -> dict[int, float]:
    return {int(row["step"]): float(row["val_loss"]) for row in read_metrics(os.path.join(run, "metrics.jsonl"))
            if row.get("val_loss") is not None}


def checkpoint_tags(run: str) -> list[tuple[int, str]]:
    ck = os.path.join(run, "checkpoints")
    tags = [t for t in os.listdir(ck) if t.startswith("global_step") and os.path.isdir(os.path.join(ck, t))]
    return sorted((int(t.removeprefix("global_step")), os.path.join(ck, t)) for t in tags)


class Study:
    def __init__(self, data: str, palette_path: str, seed: int, device: str):
        import numpy as np
        import torch

        from megapix.data.loader import TokenData
        from megapix.data.palette import Palette
        from megapix.data.sources import open_source

        self.palette = Palette.load(palette_path)
        src = open_source(data, MODEL["resolution"], None, seed, augment=False)
        n_ctx = MODEL["resolution"] ** 2
        self.splits = {s: src.split(s) for s in ("train", "val", "test")}
        self.tokens = {s: TokenData(sp, n_ctx, self.palette).tokens(np.arange(len(sp))) for s, sp in self.splits.items()}
        self.labels = {s: torch.from_numpy(np.asarray(sp.labels, dtype=np.int64)) for s, sp in self.splits.items()}
        self.num_classes = src.num_classes
        self.device = device

    def probe(self, feats: dict) -> dict:
        from megapix.probe import probe

        r = probe(*[(feats[s], self.labels[s]) for s in ("train", "val", "test")], self.num_classes, L2_GRID,
                  "lbfgs", self.device, max_iter=300)
        return {k: r[k] for k in ("l2", "val_acc", "test_acc")}

    def features(self, model) -> dict:
        from megapix.features import extract

        n = model.config.n_layer
        model = model.to(self.device).eval()
        return {s: extract(model, t, list(range(n + 1)), 512, self.device).cpu() for s, t in self.tokens.items()}

    def layer_probes(self, model, label: str, concat: bool = False) -> dict:
        t0 = time.perf_counter()
        f = self.features(model)
        d, n = model.config.d_model, model.config.n_layer
        sl = lambda ls: {s: x[:, ls[0] * d:(ls[-1] + 1) * d] for s, x in f.items()}  # contiguous layers
        layers = [self.probe(sl([l])) | {"layer": l} for l in range(n + 1)]
        best = max(layers, key=lambda r: r["val_acc"])  # ties: the shallower layer
        out = {"layers": layers, "best_layer": best["layer"]}
        if concat:
            for span in (3, 5):
                lo = max(0, min(best["layer"] - span // 2, n + 1 - span))
                ls = list(range(lo, lo + span))
                out[f"concat{span}"] = self.probe(sl(ls)) | {"layers": ls}
        print(f"  {label}: best layer {best['layer']} of 0..{n}: val {100 * best['val_acc']:.1f} test "
              f"{100 * best['test_acc']:.1f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return out

    def raw_pixels(self) -> dict:
        import torch

        f = {s: torch.from_numpy(sp.images.reshape(len(sp), -1).astype("float32")) for s, sp in self.splits.items()}
        return self.probe(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/probe_study", help="working folder (training runs, checkpoints)")
    p.add_argument("--report", default=None, help="folder for probe_study.{md,json,png} (default: --out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="digits-shifted:2", help="source spec (default: 2 placements per digit)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint (and val loss) interval")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-bert", action="store_true", help="skip the BERT run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads for extraction and probes (after training)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    torch.manual_seed(args.seed)
    out = os.path.abspath(args.out)
    report = os.path.abspath(args.report or out)
    os.makedirs(out, exist_ok=True)
    os.makedirs(report, exist_ok=True)
    t_start = time.perf_counter()
    timings = {}
    palette = fit_palette(out, args.data, args.seed)
    runs = pretrain(out, ["ar"] if args.no_bert else ["ar", "bert"], palette, args)
    timings["pretrain_s"] = round(time.perf_counter() - t_start, 1)

    from megapix.checkpoint import load_model
    from megapix.config import ModelConfig
    from megapix.model import ImageGPT

    torch.set_num_threads(max(1, args.threads))  # training is over: the probes may use every core given
    t0 = time.perf_counter()
    study = Study(args.data, palette, args.seed, args.device)
    res = {"command": " ".join(["python", "examples/small_scale_probe.py"] + list(sys.argv[1:] if argv is None else argv)),
           "seed": args.seed, "data": args.data, "model": MODEL, "steps": args.steps, "batch": args.batch,
           "lr": args.lr, "counts": {s: len(v) for s, v in study.labels.items()}, "l2_grid": L2_GRID,
           "chance": 1.0 / study.num_classes}
    res["raw_pixels"] = study.raw_pixels()
    print(f"  raw pixels: test {100 * res['raw_pixels']['test_acc']:.1f}", flush=True)
    torch.manual_seed(args.seed)
    rnd = ImageGPT(ModelConfig(**{k: v for k, v in MODEL.items() if k != "preset"}))
    res["random_init"] = study.layer_probes(rnd, "random init", concat=True)
    vl = val_losses(runs["ar"])
    res["checkpoints"] = []
    for step, tag in checkpoint_tags(runs["ar"]):
        model, _ = load_model(tag)
        r = study.layer_probes(model, f"AR step {step}", concat=step == args.steps)
        r.update(step=step, val_loss=vl.get(step))
        res["checkpoints"].append(r)
    res["ar"] = res["checkpoints"][-1]
    if "bert" in runs:
        model, _ = load_model(checkpoint_tags(runs["bert"])[-1][1])
        res["bert"] = study.layer_probes(model, "BERT", concat=True)
        res["bert"]["val_loss"] = val_losses(runs["bert"]).get(args.steps)
    timings["probe_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    res["timings"] = timings
    res["threads"] = torch.get_num_threads()
    paths = write_report(res, report)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def write_report(res: dict, folder: str) -> list[str]:
    from megapix.utils import write_json

    paths = [os.path.join(folder, n) for n in ("probe_study.json", "probe_study.md", "probe_study.png")]
    write_json(paths[0], res)
    models = [("AR (pretrained)", res["ar"]), ("random init", res["random_init"])]
    if "bert" in res:
        models.insert(1, ("BERT (pretrained)", res["bert"]))
    n = len(res["ar"]["layers"]) - 1
    lines = [f"# Linear probes at CPU scale ({res['data']}, seed {res['seed']})", "",
             f"Model: {res['model']['n_layer']} layers, d={res['model']['d_model']}, "
             f"{res['model']['resolution']}x{res['model']['resolution']} pixels; {res['steps']} steps of batch "
             f"{res['batch']}, lr {res['lr']}. Rows: {res['counts']}. Chance {_pct(res['chance'])}%, raw-pixel "
             f"probe {_pct(res['raw_pixels']['test_acc'])}% test. Accuracy in % (test, from a train+val refit; "
             "val in brackets, which picks l2 and the best layer). Layer l = input of block l, normed; "
             f"{n} = after the final norm.", "", f"Command: `{res.get('command', '?')}`", "",
             "| layer | " + " | ".join(name for name, _ in models) + " |", "|---" * (len(models) + 1) + "|"]
    for l in range(n + 1):
        lines.append(f"| {l} | " + " | ".join(f"{_pct(m['layers'][l]['test_acc'])} ({_pct(m['layers'][l]['val_acc'])})"
                                              for _, m in models) + " |")
    for span in (3, 5):
        cells = []
        for _, m in models:
            c = m.get(f"concat{span}")
            cells.append("-" if c is None else f"{_pct(c['test_acc'])} ({_pct(c['val_acc'])}), layers "
                         f"{c['layers'][0]}-{c['layers'][-1]}")
        lines.append(f"| {span} layers concatenated | " + " | ".join(cells) + " |")
    lines.append("| best layer (by val) | " + " | ".join(f"{m['best_layer']} of 0..{n}" for _, m in models) + " |")
    lines += ["", "Checkpoints of the AR run: validation loss (nats/token) against the best layer's probe.", "",
              "| step | val loss | best layer | test % | val % |", "|---|---|---|---|---|"]
    for c in res["checkpoints"]:
        b = c["layers"][c["best_layer"]]
        vl = "-" if c["val_loss"] is None else f"{c['val_loss']:.3f}"
        lines.append(f"| {c['step']} | {vl} | {c['best_layer']} | {_pct(b['test_acc'])} | {_pct(b['val_acc'])} |")
    t = res["timings"]
    lines += ["", f"Wall time: {t['total_s']:.0f}s ({t['pretrain_s']:.0f}s pre-training, {t['probe_s']:.0f}s "
              f"extraction and probes), {res['threads']} thread(s)."]
    with open(paths[1], "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_study(res, paths[2])
    return paths


def plot_study(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    n = len(res["ar"]["layers"]) - 1
    xs = list(range(n + 1))
    for key, label, style in (("ar", "AR pretrained", "o-"), ("bert", "BERT pretrained", "s-"),
                              ("random_init", "random init (control)", "^--")):
        if key in res:
            ax.plot(xs, [100 * r["test_acc"] for r in res[key]["layers"]], style, label=label)
    for span, marker in ((3, "D"), (5, "*")):
        c = res["ar"].get(f"concat{span}")
        if c:
            ax.plot([res["ar"]["best_layer"]], [100 * c["test_acc"]], marker, markersize=10, linestyle="none",
                    label=f"AR layers {c['layers'][0]}-{c['layers'][-1]} concatenated")
    ax.axhline(100 * res["raw_pixels"]["test_acc"], color="gray", linestyle="-.", label="raw pixels")
    ax.axhline(100 * res["chance"], color="black", linestyle=":", label=f"chance ({100 * res['chance']:.0f}%)")
    ax.set_xticks(xs)
    ax.set_xlabel(f"layer (0 = embeddings, {n} = after the final norm)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("probe accuracy by depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    pts = [(c["val_loss"], 100 * c["layers"][c["best_layer"]]["test_acc"], c["step"]) for c in res["checkpoints"]
           if c["val_loss"] is not None]
    if pts:
        bx.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for vl, acc, step in pts:
            bx.annotate(f"step {step}", (vl, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    bx.axhline(100 * res["chance"], color="black", linestyle=":", label=f"chance ({100 * res['chance']:.0f}%)")
    bx.axhline(100 * res["raw_pixels"]["test_acc"], color="gray", linestyle="-.", label="raw pixels")
    bx.set_ylim(0, 100)  # the same scale as the depth curve: noise must not look like a trend
    bx.set_xlabel("validation loss (nats/token)")
    bx.set_ylabel("best layer's probe test accuracy (%)")
    bx.set_title("AR checkpoints: generative loss vs probe")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
