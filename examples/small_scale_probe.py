"""The paper's linear-probe and fine-tuning findings at CPU scale, over several seeds, from one command.

    python examples/small_scale_probe.py --out runs/probe_study --report docs/probe_study --seeds 0,1,2

On the embedded `shapes` data (megapix/data/embedded.py: 4 outlines, square / ring / plus / cross, small, at
random places and in random colours on a 16x16 canvas, with a clutter bar; no download), for each seed:
1. fits the seed's palette, then pre-trains (300 steps, batch 32) an 8-layer d64 iGPT with the AR objective and,
   side by side with the same settings, with BERT (megapix/train.py, one thread each; a rerun resumes finished
   runs), saving a checkpoint and measuring validation loss every --ckpt-every steps;
2. extracts every layer's mean-pooled feature (megapix.features.extract, what `megapix extract` writes: layers
   0..8, 8 = after the final norm) of the AR model, the BERT model, the same architecture at random init (the
   control) and every saved AR checkpoint;
3. fits L-BFGS logistic probes (megapix.probe.probe: l2 picked on val, test from a train+val refit) on every layer,
   on raw pixels, and on the 3- and 5-layer concatenations centred on the best layer (by val);
4. fine-tunes (`megapix finetune`, L_gen + L_clf) the final AR model and, side by side, the same architecture from
   scratch, for the same number of steps (200, lr 3e-3), and counts the steps the pre-trained run needs to reach
   the scratch run's final validation accuracy;
5. runs `megapix probe --attentive` (the CLI, a subprocess) over the final AR model at the best linear layer and its
   neighbours, and checks the claim "attentive >= best linear + 5 points".
`--data outlines` is the same task in grey with hard edges (no colour-histogram cue; its 14 greys get an exact
palette, fit_palette); `--data outlines-large` the same, drawn larger (the third attempt's task, docs/probe_study).
On a shared machine `--parallel-seeds` runs each seed in its own process; `--probe-rows` and `--probe-iters` cut
the probes' cost (extraction of every checkpoint's layers is the largest serial part).
Each seed's numbers go to OUT/seed<S>/result.json (a rerun skips finished seeds). Then REPORT/probe_study.md
(mean +- standard deviation over the seeds, the paper's claims checked one by one), probe_study.json and
probe_study.png (error bars: one standard deviation over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megapix.utils import read_json, read_metrics, write_json  # noqa: E402 (after the repository is on sys.path)

L2_GRID = [1e-4, 1e-3, 1e-2, 1e-1]


def model_spec(args) -> dict:
    return {"preset": "tiny", "n_layer": args.layers, "d_model": args.d_model, "n_head": args.heads,
            "resolution": args.resolution}


def fit_palette(out: str, data: str, resolution: int, seed: int) -> str:
    """One palette for both runs of a seed (k-means on the training pixels, as training would fit it), so that the
    AR and BERT models read the same ids and can train side by side. Data with fewer than 512 colours (outlines)
    gets them exactly, padded with colours of an RGB grid it never uses."""
    from megapix.data.palette import Palette
    from megapix.data.sources import open_source

    path = os.path.join(out, "palette.npy")
    if not os.path.isfile(path):
        t0 = time.perf_counter()
        images = open_source(data, resolution, None, seed, augment=False).split("train").images
        colours = np.unique(images.reshape(-1, 3), axis=0)
        if len(colours) < 512:  # too few to fit (outlines: 14 greys): each colour its own id, the rest unused
            grid = np.stack(np.meshgrid(*[np.linspace(0, 255, 8).round()] * 3, indexing="ij"), -1).reshape(-1, 3)
            fill = grid[~(grid[:, None] == colours[None]).all(-1).any(1)]
            Palette(np.concatenate([colours, fill])[:512] / 127.5 - 1).save(path)
        else:
            Palette.fit(images.reshape(-1, 3), k=512, seed=seed).save(path)
        print(f"palette: fitted on {len(images)} training images in {time.perf_counter() - t0:.0f}s -> {path}",
              flush=True)
    return path


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["OMP_NUM_THREADS"] = "1"  # two runs side by side on two cores
    return env


def run_side_by_side(jobs: list[tuple[str, list[str], str]]) -> None:
    """jobs: (name, argv, log path); all start at once, each on one thread; any failure ends the study."""
    procs = []
    for name, cmd, log_path in jobs:
        print("+", " ".join(cmd), f"> {log_path}", flush=True)
        log = open(log_path, "a")
        procs.append((name, subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log,
                      log_path))
    for name, proc, log, log_path in procs:
        rc = proc.wait()
        log.close()
        if rc != 0:
            sys.exit(f"small_scale_probe: {name} failed (exit {rc}); see {log_path}")


def pretrain(out: str, objectives, palette: str, seed: int, args) -> dict[str, str]:
    """Train one model per objective with megapix/train.py, side by side."""
    runs, jobs = {}, []
    for objective in objectives:
        cfg = os.path.join(out, f"config_{objective}.json")
        with open(cfg, "w") as f:
            json.dump({"model": {**model_spec(args), "objective": objective},
                       "data": {"source": args.data, "palette": palette},
                       "train": {"global_batch": args.batch, "lr": args.lr, "seed": seed}}, f)
        runs[objective] = run = os.path.join(out, f"pretrain_{objective}")
        jobs.append((f"the {objective} pre-training",
                     [sys.executable, "megapix/train.py", "--config", cfg, "--max-steps", str(args.steps), "--out", run,
                      "--no-samples", "--eval-every", str(args.ckpt_every), "--save-every", str(args.ckpt_every),
                      "--keep-last", "0", "--resume-if-exists"], run + ".log"))  # every checkpoint is probed
    run_side_by_side(jobs)
    return runs


def finetune_done(run: str, args) -> bool:
    """A finished `megapix finetune` in `run` with this study's steps and rate."""
    res = read_json(os.path.join(run, "finetune_results.json"))
    done = res.get("runs") if isinstance(res, dict) else None
    return bool(done) and done[0].get("steps") == args.ft_steps and res.get("lrs") == [args.ft_lr]


def finetune_pair(out: str, checkpoint: str, seed: int, args) -> dict:
    """`megapix finetune` from the pre-trained AR model and from scratch (same architecture and palette), side by
    side, the same steps, rate and evaluation period; returns both validation curves and the steps ratio."""
    runs, jobs = {}, []
    for name in ("pretrained", "scratch"):
        runs[name] = run = os.path.join(out, f"finetune_{name}")
        if finetune_done(run, args):
            continue
        if os.path.isdir(run):  # interrupted (a fine-tune does not resume) or of other settings: start it again
            import shutil

            shutil.rmtree(run)
        cmd = [sys.executable, "-m", "megapix", "finetune", "--checkpoint", checkpoint, "--out", run,
               "--lr", str(args.ft_lr), "--max-steps", str(args.ft_steps), "--eval-every", str(args.ft_eval_every),
               "--patience", str(10 ** 6), "--global-batch", str(args.batch), "--seed", str(seed), "--augment", "none"]
        jobs.append((f"the {name} fine-tune", cmd + (["--from-scratch"] if name == "scratch" else []), run + ".log"))
    run_side_by_side(jobs)
    curves = {}
    for name, run in runs.items():
        rows = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r.get("val_acc") is not None]
        curves[name] = [(int(r["step"]), float(r["val_acc"])) for r in rows]
        curves[name + "_test"] = read_json(os.path.join(run, "finetune_results.json")).get("test_acc")
    target = curves["scratch"][-1][1]  # the scratch run's final validation accuracy
    reached = next((s for s, a in curves["pretrained"] if a >= target), None)
    return {"curves": {k: curves[k] for k in ("pretrained", "scratch")}, "scratch_final_val": target,
            "pretrained_final_val": curves["pretrained"][-1][1], "scratch_test": curves["scratch_test"],
            "pretrained_test": curves["pretrained_test"], "steps": args.ft_steps, "steps_to_scratch_final": reached,
            "fraction": None if reached is None else reached / args.ft_steps, "lr": args.ft_lr}


def attentive_probe(out: str, checkpoint: str, layers: list[int], seed: int, args, name: str = "attentive") -> dict:
    """`megapix probe --attentive` (the CLI, a subprocess) over `checkpoint` (the final AR model, or the exported
    control) at `layers`, on the study's data and holdout (the same --seed), into OUT/seed<S>/`name`; its row best
    by val, with the layer, lr and epoch val picked."""
    folder = os.path.join(out, name)
    path = os.path.join(folder, "probe_results.json")

    def reusable() -> bool:  # a finished probe of these layers and epochs; otherwise its rows are replaced
        if not os.path.isfile(path):
            return False
        summary = read_json(path)
        done = sorted({r["layers"][0] for r in summary.get("results", []) if r.get("probe") == "attentive"})
        return done == sorted(layers) and (summary.get("attentive") or {}).get("epochs") == args.attentive_epochs

    if not reusable():
        cmd = [sys.executable, "-m", "megapix", "probe", "--attentive", "--checkpoint", checkpoint, "--data",
               args.data, "--seed", str(seed), "--layers", ",".join(map(str, layers)), "--attentive-epochs",
               str(args.attentive_epochs), "--out", folder]
        print("+", " ".join(cmd), f"> {folder}.log", flush=True)
        with open(folder + ".log", "a") as log:
            rc = subprocess.run(cmd, env={**_env(), "OMP_NUM_THREADS": str(args.threads)}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit(f"small_scale_probe: the attentive probe failed (exit {rc}); see {folder}.log")
    rows = [r for r in read_json(path)["results"] if r.get("probe") == "attentive"]
    best = max(rows, key=lambda r: r["val_acc"])
    return {"layers": layers, "layer": best["layers"][0], "lr": best["lr"], "epoch": best["epoch"],
            "val_acc": best["val_acc"], "test_acc": best["test_acc"], "epochs": args.attentive_epochs}


def random_init_model(seed: int, args):
    """The random-init control: the study's model at initialisation under `seed` (the same weights every call)."""
    import torch

    from megapix.config import ModelConfig
    from megapix.model import ImageGPT

    torch.manual_seed(seed)
    return ImageGPT(ModelConfig(**{k: v for k, v in model_spec(args).items() if k != "preset"}))


def control_attentive(out: str, res: dict, seed: int, args) -> dict:
    """The attentive probe over the random-init control, at the layers the AR model's attentive probe took: the
    control exported as a checkpoint folder (its weights and the seed's palette) for `megapix probe --attentive`.
    Without this row an attention readout's own gain passes for pre-training's."""
    folder = os.path.join(out, "random_init")
    if not os.path.isfile(os.path.join(folder, "palette.npy")):
        random_init_model(seed, args).save_pretrained(folder)
        shutil.copyfile(os.path.join(out, "palette.npy"), os.path.join(folder, "palette.npy"))
    return attentive_probe(out, folder, res["attentive"]["layers"], seed, args, name="attentive_control")


def val_losses(run: str) -> dict[int, float]:
    return {int(row["step"]): float(row["val_loss"]) for row in read_metrics(os.path.join(run, "metrics.jsonl"))
            if row.get("val_loss") is not None}


def checkpoint_tags(run: str) -> list[tuple[int, str]]:
    ck = os.path.join(run, "checkpoints")
    tags = [t for t in os.listdir(ck) if t.startswith("global_step") and os.path.isdir(os.path.join(ck, t))]
    return sorted((int(t.removeprefix("global_step")), os.path.join(ck, t)) for t in tags)


def centred_span(best: int, span: int, n_layer: int) -> list[int]:
    """`span` contiguous layers centred on `best`, clipped to 0..n_layer (megapix extract's --center/--span)."""
    from megapix.features import parse_layers

    return parse_layers(None, n_layer, center=best, span=span)


class Study:
    """One seed's data, palette ids and labels; probes of pooled features (megapix.features / megapix.probe)."""

    def __init__(self, data: str, resolution: int, palette_path: str, seed: int, device: str, probe_iters: int = 300,
                 probe_rows: int = 0):
        import torch

        from megapix.data.loader import TokenData
        from megapix.data.palette import Palette
        from megapix.data.sources import open_source

        self.palette = Palette.load(palette_path)
        src = open_source(data, resolution, None, seed, augment=False)
        self.splits = {s: src.split(s) for s in ("train", "val", "test")}
        if probe_rows:  # the first probe_rows training images (the split is already shuffled by the holdout)
            tr = self.splits["train"]
            self.splits["train"] = type(tr)(tr.images[:probe_rows], labels=np.asarray(tr.labels)[:probe_rows],
                                            num_classes=tr.num_classes)
        self.tokens = {s: TokenData(sp, resolution ** 2, self.palette).tokens(np.arange(len(sp)))
                       for s, sp in self.splits.items()}
        self.labels = {s: torch.from_numpy(np.asarray(sp.labels, dtype=np.int64)) for s, sp in self.splits.items()}
        self.num_classes = src.num_classes
        self.device = device
        self.probe_iters = probe_iters

    def probe(self, feats: dict) -> dict:
        from megapix.probe import probe

        r = probe(*[(feats[s], self.labels[s]) for s in ("train", "val", "test")], self.num_classes, L2_GRID,
                  "lbfgs", self.device, max_iter=self.probe_iters)
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
                ls = centred_span(best["layer"], span, n)
                out[f"concat{span}"] = self.probe(sl(ls)) | {"layers": ls}
        print(f"  {label}: best layer {best['layer']} of 0..{n}: val {100 * best['val_acc']:.1f} test "
              f"{100 * best['test_acc']:.1f}" + "".join(f", {s}-layer concat {100 * out[f'concat{s}']['test_acc']:.1f}"
                                                         for s in (3, 5) if f"concat{s}" in out)
              + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
        return out

    def raw_pixels(self) -> dict:
        import torch

        f = {s: torch.from_numpy(sp.images.reshape(len(sp), -1).astype("float32")) for s, sp in self.splits.items()}
        return self.probe(f)


class StudyError(Exception):
    """A bad input of the study: main prints it as one line and exits 2."""


def fail(line: str):
    raise StudyError(line)


def result_problem(res, seed: int, args) -> str | None:
    """Why a cached OUT/seed<S>/result.json cannot be reused for this study (torn, partial, another seed or other
    settings), or None."""
    if not isinstance(res, dict):
        return "is torn or not a JSON object"
    want = ["seed", "chance", "counts", "raw_pixels", "random_init", "checkpoints", "ar", "timings"]
    want += [] if args.no_bert else ["bert"]
    want += [] if args.no_attentive else ["attentive"]
    missing = [k for k in want if k not in res]
    if missing:
        return f"is partial (no {', '.join(map(repr, missing))})"
    ar = res["ar"] if isinstance(res["ar"], dict) else {}
    if res["seed"] != seed or ar.get("step") != args.steps or len(ar.get("layers") or []) != args.layers + 1:
        return (f"was written by other settings (seed {res['seed']!r}, last step {ar.get('step')!r}, "
                f"{len(ar.get('layers') or [])} layer probes; this study: seed {seed}, --steps {args.steps}, "
                f"--layers {args.layers})")
    return None


def cached_result(seed: int, args) -> dict | None:
    """OUT/seed<S>/result.json of an earlier run of this study, or None; one line when it cannot be reused."""
    cached = os.path.join(os.path.abspath(args.out), f"seed{seed}", "result.json")
    if not os.path.lexists(cached):
        return None
    res = read_json(cached)
    why = result_problem(res, seed, args)
    if why is not None:
        fail(f"{cached} {why}: move it away to rerun seed {seed} (its finished training runs are reused)")
    return res


def check_folder(flag: str, path: str) -> None:
    """--out and --report name folders: one line when the path, or a folder above it, is a file."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        fail(f"{flag} {path}: {probe} is a file, not a folder; choose another {flag}")


def run_seed(seed: int, args) -> dict:
    """Everything for one seed; cached in OUT/seed<S>/result.json."""
    import torch

    out = os.path.join(os.path.abspath(args.out), f"seed{seed}")
    cached = os.path.join(out, "result.json")
    res = cached_result(seed, args)
    if res is not None:
        print(f"seed {seed}: done before, read {cached}", flush=True)
        ft = res.get("finetune") if isinstance(res.get("finetune"), dict) else {}
        if not args.no_finetune and (ft.get("steps"), ft.get("lr")) != (args.ft_steps, args.ft_lr):
            t1 = time.perf_counter()  # none (a --no-finetune study) or of other steps or rate: (re)run just this
            res["finetune"] = finetune_pair(out, os.path.join(out, "pretrain_ar"), seed, args)
            res["timings"]["finetune_s"] = round(time.perf_counter() - t1, 1)
            write_json(cached, res)
        if not args.no_attentive and "attentive_control" not in res:  # a study from before that row: add it
            t1 = time.perf_counter()
            res["attentive_control"] = control_attentive(out, res, seed, args)
            res["timings"]["attentive_control_s"] = round(time.perf_counter() - t1, 1)
            write_json(cached, res)
        return res
    os.makedirs(out, exist_ok=True)
    print(f"=== seed {seed} ===", flush=True)
    t_start = time.perf_counter()
    timings = {}
    palette = fit_palette(out, args.data, args.resolution, seed)
    runs = pretrain(out, ["ar"] if args.no_bert else ["ar", "bert"], palette, seed, args)
    timings["pretrain_s"] = round(time.perf_counter() - t_start, 1)
    res = {"seed": seed}
    if not args.no_finetune:
        t0 = time.perf_counter()
        res["finetune"] = ft = finetune_pair(out, runs["ar"], seed, args)
        timings["finetune_s"] = round(time.perf_counter() - t0, 1)
        print(f"  fine-tune: scratch reaches {100 * ft['scratch_final_val']:.1f}% val in {ft['steps']} steps; from "
              f"pre-trained {100 * ft['pretrained_final_val']:.1f}%, scratch's final reached at step "
              f"{ft['steps_to_scratch_final']}", flush=True)

    from megapix.checkpoint import load_model

    torch.set_num_threads(max(1, args.threads))  # training is over: the probes may use every core given
    t0 = time.perf_counter()
    study = Study(args.data, args.resolution, palette, seed, args.device, args.probe_iters, args.probe_rows)
    res.update(counts={s: len(v) for s, v in study.labels.items()}, chance=1.0 / study.num_classes)
    res["raw_pixels"] = study.raw_pixels()
    print(f"  raw pixels: test {100 * res['raw_pixels']['test_acc']:.1f}", flush=True)
    res["random_init"] = study.layer_probes(random_init_model(seed, args), "random init", concat=True)
    vl = val_losses(runs["ar"])
    res["checkpoints"] = []
    for step, tag in checkpoint_tags(runs["ar"]):
        model, _ = load_model(tag)
        r = study.layer_probes(model, f"AR step {step}", concat=step == args.steps)
        r.update(step=step, val_loss=vl.get(step))
        res["checkpoints"].append(r)
    res["ar"] = res["checkpoints"][-1]
    if not args.no_attentive:  # the best linear layer (by val) and its neighbours
        t1 = time.perf_counter()
        ls = centred_span(res["ar"]["best_layer"], 3, args.layers)
        res["attentive"] = a = attentive_probe(out, runs["ar"], ls, seed, args)
        timings["attentive_s"] = round(time.perf_counter() - t1, 1)
        print(f"  attentive probe (layers {ls}): layer {a['layer']} test {100 * a['test_acc']:.1f}", flush=True)
        t1 = time.perf_counter()
        res["attentive_control"] = c = control_attentive(out, res, seed, args)
        timings["attentive_control_s"] = round(time.perf_counter() - t1, 1)
        print(f"  attentive probe, random-init control: layer {c['layer']} test {100 * c['test_acc']:.1f}", flush=True)
    if "bert" in runs:
        model, _ = load_model(checkpoint_tags(runs["bert"])[-1][1])
        res["bert"] = study.layer_probes(model, "BERT", concat=True)
        res["bert"]["val_loss"] = val_losses(runs["bert"]).get(args.steps)
    timings["probe_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    res["timings"] = timings
    res["threads"] = torch.get_num_threads()
    write_json(cached, res)
    return res


# ----------------------------------------------------------------------------------------------------------
# over seeds: mean and spread, and the claims checked
# ----------------------------------------------------------------------------------------------------------
def mean_sd(xs) -> tuple[float, float]:
    """Mean and sample standard deviation of the non-None values; the sd is nan for one value (no spread
    measured, not a spread of 0), both are nan for none."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")


def aggregate(per_seed: list[dict]) -> dict:
    """Per-figure mean and standard deviation over seeds (accuracies as fractions), and the claims."""
    agg = {"n_seeds": len(per_seed), "seeds": [r["seed"] for r in per_seed], "chance": per_seed[0]["chance"]}
    acc = lambda rows: dict(zip(("mean", "sd"), mean_sd(rows)))
    agg["raw_pixels"] = acc([r["raw_pixels"]["test_acc"] for r in per_seed])
    n = len(per_seed[0]["ar"]["layers"]) - 1
    for key in ("ar", "bert", "random_init"):
        if key not in per_seed[0]:
            continue
        m = {"layers": [acc([r[key]["layers"][l]["test_acc"] for r in per_seed]) for l in range(n + 1)],
             "best_layers": [r[key]["best_layer"] for r in per_seed],
             "best": acc([r[key]["layers"][r[key]["best_layer"]]["test_acc"] for r in per_seed])}
        for span in (3, 5):
            m[f"concat{span}"] = acc([r[key][f"concat{span}"]["test_acc"] for r in per_seed])
            m[f"concat{span}_gain"] = acc([r[key][f"concat{span}"]["test_acc"]
                                           - r[key]["layers"][r[key]["best_layer"]]["test_acc"] for r in per_seed])
        agg[key] = m
    steps = [c["step"] for c in per_seed[0]["checkpoints"]]
    agg["checkpoints"] = [{"step": s, "val_loss": acc([r["checkpoints"][i]["val_loss"] for r in per_seed]),
                           "best": acc([r["checkpoints"][i]["layers"][r["checkpoints"][i]["best_layer"]]["test_acc"]
                                        for r in per_seed])} for i, s in enumerate(steps)]
    if "finetune" in per_seed[0]:
        fts = [r["finetune"] for r in per_seed]
        agg["finetune"] = {"steps": fts[0]["steps"], "lr": fts[0]["lr"],
                           "scratch_final_val": acc([f["scratch_final_val"] for f in fts]),
                           "pretrained_final_val": acc([f["pretrained_final_val"] for f in fts]),
                           "scratch_test": acc([f["scratch_test"] for f in fts]),
                           "pretrained_test": acc([f["pretrained_test"] for f in fts]),
                           "steps_to_scratch_final": [f["steps_to_scratch_final"] for f in fts],
                           "fraction": acc([f["fraction"] for f in fts])}
    if "attentive" in per_seed[0]:
        ats = [r["attentive"] for r in per_seed]
        agg["attentive"] = {"test": acc([a["test_acc"] for a in ats]), "layers": [a["layer"] for a in ats],
                            "gain": acc([a["test_acc"] - r["ar"]["layers"][r["ar"]["best_layer"]]["test_acc"]
                                         for a, r in zip(ats, per_seed)]), "epochs": ats[0]["epochs"]}
    if "attentive_control" in per_seed[0]:
        cts = [r["attentive_control"] for r in per_seed]
        agg["attentive_control"] = {"test": acc([c["test_acc"] for c in cts]), "layers": [c["layer"] for c in cts],
                                    "gap": acc([r["attentive"]["test_acc"] - c["test_acc"]
                                                for c, r in zip(cts, per_seed)])}
    agg["claims"] = claims(agg, per_seed, n)
    return agg


def deep_layer_gain(result: dict) -> float:
    """One seed's AR layers 1..n minus the random-init control's same layers, mean test accuracy, in points (what
    the guard test in tests/test_eval.py asserts)."""
    mean = lambda key: np.mean([x["test_acc"] for x in result[key]["layers"][1:]])
    return float(100 * (mean("ar") - mean("random_init")))


FT_ABOVE_CHANCE = 0.05  # the scratch fine-tune's final val must beat chance by this for its steps to be a target


def claims(agg: dict, per_seed: list[dict], n: int) -> list[dict]:
    """The issue's goals, each measured on the seed means (and, where it is per seed, on every seed)."""
    ar, pix, ctl = agg["ar"], agg["raw_pixels"], agg["random_init"]
    pts = lambda x: 100 * x
    inside = lambda l: n / 4 <= l <= 3 * n / 4  # not in the first or last quarter of 0..n
    out = [
        {"claim": "best AR layer >= 5 points above raw pixels",
         "measured": f"{pts(ar['best']['mean'] - pix['mean']):+.1f} points",
         "holds": ar["best"]["mean"] - pix["mean"] >= 0.05},
        {"claim": "best AR layer >= 10 points above the random-init control's best layer",
         "measured": f"{pts(ar['best']['mean'] - ctl['best']['mean']):+.1f} points",
         "holds": ar["best"]["mean"] - ctl["best"]["mean"] >= 0.10},
        {"claim": f"best AR layer strictly inside the network (in {int(np.ceil(n / 4))}..{int(3 * n // 4)} of 0..{n})"
                  " for every seed", "measured": f"best layers {ar['best_layers']}",
         "holds": all(inside(l) for l in ar["best_layers"])},
        {"claim": "3- and 5-layer concatenations centred on the best layer >= the best single layer",
         "measured": f"{pts(ar['concat3_gain']['mean']):+.1f} / {pts(ar['concat5_gain']['mean']):+.1f} points",
         "holds": ar["concat3_gain"]["mean"] >= 0 and ar["concat5_gain"]["mean"] >= 0},
    ]
    mu, sd = mean_sd([deep_layer_gain(r) for r in per_seed])
    out.append({"claim": f"(not a paper claim; what the guard test checks) AR layers 1..{n} above the same layers at "
                         "random init, mean over the layers",
                "measured": f"{mu:+.1f}" + ("" if sd != sd else f" ± {sd:.1f}") + " points",
                "holds": mu > 0 and (sd != sd or mu > 2 * sd)})
    if "bert" in agg:
        out.append({"claim": "AR above BERT under linear probes (best layer)",
                    "measured": f"{pts(ar['best']['mean'] - agg['bert']['best']['mean']):+.1f} points",
                    "holds": ar["best"]["mean"] > agg["bert"]["best"]["mean"]})
    if "attentive" in agg:
        g = agg["attentive"]["gain"]
        out.append({"claim": "attentive probe (best of the best linear layer and its neighbours, by val) >= 5 points "
                             "above the best linear layer", "measured": f"{pts(g['mean']):+.1f} points",
                    "holds": g["mean"] >= 0.05})
    if "attentive_control" in agg:  # not an issue goal: what the attentive gain above owes to pre-training
        g = agg["attentive_control"]["gap"]
        out.append({"claim": "(not a paper claim) the attentive probe above the same probe over the random-init "
                             "control, same layers", "measured": f"{pts(g['mean']):+.1f}"
                    + ("" if g["sd"] != g["sd"] else f" ± {pts(g['sd']):.1f}") + " points",
                    "holds": g["mean"] > 0 and (g["sd"] != g["sd"] or g["mean"] > 2 * g["sd"])})
    ck = agg["checkpoints"]
    loss = [c["val_loss"]["mean"] for c in ck]
    probe = [c["best"]["mean"] for c in ck]
    out.append({"claim": f"probe accuracy rises as validation loss falls over the {len(ck)} checkpoints (seed means)",
                "measured": " -> ".join(f"{lo:.3f}: {pts(p):.1f}%" for lo, p in zip(loss, probe)),
                "holds": len(ck) >= 4 and all(b < a for a, b in zip(loss, loss[1:]))
                and all(b > a for a, b in zip(probe, probe[1:]))})
    if "finetune" in agg:
        ft = agg["finetune"]
        reached = ft["steps_to_scratch_final"]
        # a scratch run still at chance sets no target: the pre-trained run "reaches" it by noise
        learned = [r["finetune"]["scratch_final_val"] >= agg["chance"] + FT_ABOVE_CHANCE for r in per_seed]
        measured = f"steps {reached} of {ft['steps']}"
        if not all(learned):
            finals = ", ".join(f"{pts(r['finetune']['scratch_final_val']):.1f}%" for r in per_seed)
            measured += (f", but the scratch run ends within {pts(FT_ABOVE_CHANCE):.0f} points of chance on "
                         f"{learned.count(False)} of {len(learned)} seeds (final val {finals}): nothing learned to "
                         f"reach; more --ft-steps")
        out.append({"claim": "fine-tuning from the pre-trained model reaches the from-scratch run's final accuracy "
                             "in a fraction of its steps (every seed)", "measured": measured,
                    "holds": all(learned) and all(s is not None and s < ft["steps"] for s in reached)})
    return out


def _pm(a: dict) -> str:
    if a["mean"] != a["mean"]:
        return "-"
    return f"{100 * a['mean']:.1f}" + ("" if a["sd"] != a["sd"] else f" ± {100 * a['sd']:.1f}")  # one seed: no sd


def write_report(per_seed: list[dict], config: dict, folder: str) -> list[str]:
    agg = aggregate(per_seed)
    paths = [os.path.join(folder, n) for n in ("probe_study.json", "probe_study.md", "probe_study.png")]
    write_json(paths[0], {"config": config, "summary": agg, "per_seed": per_seed})
    m = config["model"]
    n = m["n_layer"]
    models = [(name, agg[k]) for k, name in (("ar", "AR (pretrained)"), ("bert", "BERT (pretrained)"),
                                              ("random_init", "random init")) if k in agg]
    r0 = per_seed[0]
    seeds = ", ".join(map(str, agg["seeds"]))
    lines = [f"# The paper's probe claims at CPU scale ({config['data']}, seeds {seeds})", "",
             f"Model: {n} layers, d={m['d_model']}, {m['n_head']} heads, {m['resolution']}x{m['resolution']} pixels; "
             f"{config['steps']} steps of batch {config['batch']}, lr {config['lr']}. Rows: {r0['counts']}. "
             f"Chance {100 * r0['chance']:.0f}%. Every figure: test accuracy in %, mean ± sample standard "
             f"deviation over {agg['n_seeds']} seed(s), no ± with one seed (the seed sets the palette fit, the val "
             "holdout, the initialisation and the batch order; the data is fixed). Probes: L-BFGS logistic "
             f"regression ({config.get('probe_iters', 300)} iterations), l2 picked on val, test from a "
             f"train+val refit. Layer l = the mean-pooled input of block l after its first norm; {n} = after the "
             "final norm.", "", f"Command: `{config['command']}`", "", "## The claims", "",
             "| claim | measured | holds |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {'yes' if c['holds'] else '**no**'} |" for c in agg["claims"]]
    lines += ["", "## Probe accuracy by layer", "", f"Raw pixels: {_pm(agg['raw_pixels'])}.", "",
              "| layer | " + " | ".join(name for name, _ in models) + " |", "|---" * (len(models) + 1) + "|"]
    for l in range(n + 1):
        lines.append(f"| {l} | " + " | ".join(_pm(a["layers"][l]) for _, a in models) + " |")
    lines.append("| best layer (by val), per seed | " + " | ".join(", ".join(map(str, a["best_layers"]))
                                                                  for _, a in models) + " |")
    lines.append("| best layer's test accuracy | " + " | ".join(_pm(a["best"]) for _, a in models) + " |")
    for span in (3, 5):
        lines.append(f"| {span} layers centred on the best, concatenated | "
                     + " | ".join(f"{_pm(a[f'concat{span}'])} (gain {_pm(a[f'concat{span}_gain'])})"
                                  for _, a in models) + " |")
    if "attentive" in agg:
        at = agg["attentive"]
        lines.append(f"| attentive probe (`megapix probe --attentive`, {at['epochs']} epochs), layer by val per seed "
                     f"{', '.join(map(str, at['layers']))} | {_pm(at['test'])} (gain {_pm(at['gain'])})"
                     + "".join(f" | {_pm(agg['attentive_control']['test'])}, layers "
                               f"{', '.join(map(str, agg['attentive_control']['layers']))}"
                               if k == "random init" and "attentive_control" in agg else " | -"
                               for k, _ in models[1:]) + " |")
    lines += ["", "## AR checkpoints: validation loss against the best layer's probe", "",
              "| step | val loss (nats/token) | best layer's test % |", "|---|---|---|"]
    for c in agg["checkpoints"]:
        v = c["val_loss"]
        lines.append(f"| {c['step']} | {v['mean']:.3f}" + ("" if v["sd"] != v["sd"] else f" ± {v['sd']:.3f}")
                     + f" | {_pm(c['best'])} |")
    if "finetune" in agg:
        ft = agg["finetune"]
        lines += ["", "## Fine-tuning (`megapix finetune`, L_gen + L_clf) from the AR model vs from scratch", "",
                  f"{ft['steps']} steps each at lr {ft['lr']}, batch {config['batch']}, no augmentation; validation "
                  f"every {config['ft_eval_every']} steps.", "",
                  "| | final val % | test % (at the best val step) |", "|---|---|---|",
                  f"| from scratch | {_pm(ft['scratch_final_val'])} | {_pm(ft['scratch_test'])} |",
                  f"| from the pre-trained AR model | {_pm(ft['pretrained_final_val'])} | "
                  f"{_pm(ft['pretrained_test'])} |",
                  "", f"Steps the pre-trained run needs to reach the scratch run's final val accuracy, per seed: "
                  f"{ft['steps_to_scratch_final']} of {ft['steps']} (fraction {_pm(ft['fraction'])} %)."]
    t = [r["timings"] for r in per_seed]
    lines += ["", "Wall time per seed (s): " + "; ".join(
        f"seed {r['seed']}: {x['total_s']:.0f} ({x['pretrain_s']:.0f} pre-training, {x.get('finetune_s', 0):.0f} "
        f"fine-tuning, {x['probe_s']:.0f} extraction and probes, {x.get('attentive_s', 0):.0f} of them the attentive "
        "probe)" for r, x in zip(per_seed, t))
        + f"; {r0['threads']} thread(s) for the probes, one per training run."]
    if config.get("load"):
        lines.append(f"Load average while it ran (1 min, at the start of each seed): {config['load']}.")
    with open(paths[1], "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_study(agg, per_seed, paths[2])
    return paths


def plot_study(agg: dict, per_seed: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "finetune" in agg else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.4), dpi=110)
    ax, bx = axes[0], axes[1]
    n = len(agg["ar"]["layers"]) - 1
    xs = np.arange(n + 1)
    pc = lambda a: (100 * a["mean"], 100 * np.nan_to_num(a["sd"]))  # one seed: no error bar
    for key, label, style in (("ar", "AR pretrained", "o-"), ("bert", "BERT pretrained", "s-"),
                              ("random_init", "random init (control)", "^--")):
        if key in agg:
            mu, sd = np.array([pc(a) for a in agg[key]["layers"]]).T
            ax.errorbar(xs, mu, yerr=sd, fmt=style, capsize=3, label=label)
    best = int(np.argmax([a["mean"] for a in agg["ar"]["layers"]]))
    for span, marker in ((3, "D"), (5, "*")):
        mu, sd = pc(agg["ar"][f"concat{span}"])
        ax.errorbar([best + 0.15 * (span - 4)], [mu], yerr=[sd], fmt=marker, markersize=9, capsize=3,
                    label=f"AR, {span} layers around the best, concatenated")
    if "attentive" in agg:  # drawn at the layer most seeds' val picked; the control's beside it, to compare
        at = agg["attentive"]
        x = max(set(at["layers"]), key=at["layers"].count)
        mu, sd = pc(at["test"])
        ax.errorbar([x], [mu], yerr=[sd], fmt="P", markersize=10, capsize=3, label="AR, attentive probe")
        if "attentive_control" in agg:
            mu, sd = pc(agg["attentive_control"]["test"])
            ax.errorbar([x + 0.25], [mu], yerr=[sd], fmt="X", markersize=10, capsize=3,
                        label="random init, attentive probe (same layers)")
    mu, sd = pc(agg["raw_pixels"])
    ax.axhspan(mu - sd, mu + sd, color="gray", alpha=0.2)
    ax.axhline(mu, color="gray", linestyle="-.", label="raw pixels (± sd)")
    ax.axhline(100 * agg["chance"], color="black", linestyle=":", label=f"chance ({100 * agg['chance']:.0f}%)")
    ax.set_xticks(xs)
    ax.set_xlabel(f"layer (0 = embeddings, {n} = after the final norm)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"probe accuracy by depth ({agg['n_seeds']} seeds, ± 1 sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ck = agg["checkpoints"]
    bx.errorbar([c["val_loss"]["mean"] for c in ck], [100 * c["best"]["mean"] for c in ck],
                xerr=np.nan_to_num([c["val_loss"]["sd"] for c in ck]),
                yerr=100 * np.nan_to_num([c["best"]["sd"] for c in ck]), fmt="o-", capsize=3)
    for c in ck:
        bx.annotate(f"step {c['step']}", (c["val_loss"]["mean"], 100 * c["best"]["mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    bx.axhline(100 * agg["raw_pixels"]["mean"], color="gray", linestyle="-.", label="raw pixels")
    bx.set_ylim(0, 100)  # the same scale as the depth curve: noise must not look like a trend
    bx.set_xlabel("validation loss (nats/token)")
    bx.set_ylabel("best layer's probe test accuracy (%)")
    bx.set_title("AR checkpoints: generative loss vs probe")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    if panels == 3:
        cx = axes[2]
        for name, style in (("pretrained", "o-"), ("scratch", "s--")):
            curves = [r["finetune"]["curves"][name] for r in per_seed]
            steps = [s for s, _ in curves[0]]
            accs = np.array([[a for _, a in c[:len(steps)]] for c in curves if len(c) >= len(steps)])
            cx.errorbar(steps, 100 * accs.mean(0), yerr=100 * (accs.std(0, ddof=1) if len(accs) > 1 else 0 * accs[0]),
                        fmt=style, capsize=3, label="fine-tune from " + ("the AR model" if name == "pretrained"
                                                                         else "scratch"))
        cx.set_ylim(0, 100)
        cx.set_xlabel("fine-tuning step")
        cx.set_ylabel("validation accuracy (%)")
        cx.set_title("fine-tuning: pre-trained vs from scratch")
        cx.grid(alpha=0.3)
        cx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/probe_study",
                   help="working folder (training runs, checkpoints, per-seed results)")
    p.add_argument("--report", default=None, help="folder for probe_study.{md,json,png} (default: --out)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--data", default="shapes", help="source spec")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=75, help="checkpoint (and val loss) interval")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-bert", action="store_true", help="skip the BERT run")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning comparison")
    p.add_argument("--ft-steps", type=int, default=200, help="fine-tuning steps, each of the two runs")
    p.add_argument("--ft-eval-every", type=int, default=20)
    p.add_argument("--ft-lr", type=float, default=3e-3)
    p.add_argument("--no-attentive", action="store_true", help="skip the attentive probe")
    p.add_argument("--attentive-epochs", type=int, default=100, help="epochs of the attentive probe (megapix probe "
                   "--attentive-epochs)")
    p.add_argument("--probe-iters", type=int, default=300, help="L-BFGS iterations of each linear probe fit")
    p.add_argument("--probe-rows", type=int, default=0, help="probe on the first N training images only (0: all); "
                   "extraction of every checkpoint's layers is the study's largest serial cost")
    p.add_argument("--parallel-seeds", action="store_true", help="run the seeds at once, one process each (then "
                   "the report over their cached results): on a shared machine each process gets its own share")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads for extraction and probes")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {args.seeds!r}: a comma-separated list of integers >= 0, e.g. 0,1,2")
    if not args.seed_list or min(args.seed_list) < 0 or len(set(args.seed_list)) != len(args.seed_list):
        fail(f"--seeds {args.seeds!r}: name one or more distinct seeds >= 0, e.g. 0,1,2")
    for name in ("steps", "layers", "batch", "ckpt_every", "ft_steps", "ft_eval_every", "attentive_epochs", "threads",
                 "probe_iters", "resolution", "d_model", "heads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 1 or more")
    if args.probe_rows < 0:
        fail(f"--probe-rows {args.probe_rows}: 0 (all) or a number of training images")
    return args


def main(argv=None) -> int:
    try:
        return study(parse_args(argv), argv)
    except StudyError as e:
        print(f"small_scale_probe.py: error: {e}", file=sys.stderr)
        return 2


def run_seeds_at_once(args, argv) -> None:
    """Each seed in its own process of this script (its output in OUT/seed<S>.log); each caches its result.json,
    which the report then reads."""
    argv = list(sys.argv[1:] if argv is None else argv)
    base, skip = [], False
    for a in argv:  # the same arguments without --seeds, --out, --report and --parallel-seeds
        if skip:
            skip = False
        elif a in ("--seeds", "--out", "--report"):
            skip = True
        elif a != "--parallel-seeds" and not a.startswith(("--seeds=", "--out=", "--report=")):
            base.append(a)
    out = os.path.abspath(args.out)  # each seed's own report goes beside its results
    jobs = [(f"seed {s}", [sys.executable, os.path.abspath(__file__), *base, "--seeds", str(s), "--out", out,
                           "--report", os.path.join(out, f"seed{s}")], os.path.join(out, f"seed{s}.log"))
            for s in args.seed_list]
    run_side_by_side(jobs)


def study(args, argv) -> int:
    import torch

    torch.set_num_threads(1)
    out = os.path.abspath(args.out)
    report = os.path.abspath(args.report or out)
    check_folder("--out", out)
    check_folder("--report", report)
    for seed in args.seed_list:  # a cached result that cannot be reused is refused before any seed runs
        cached_result(seed, args)
    os.makedirs(out, exist_ok=True)
    os.makedirs(report, exist_ok=True)
    t0 = time.perf_counter()
    if args.parallel_seeds and len(args.seed_list) > 1:
        run_seeds_at_once(args, argv)
    per_seed, loads = [], []
    for seed in args.seed_list:
        loads.append(f"{os.getloadavg()[0]:.1f}")
        per_seed.append(run_seed(seed, args))
        torch.set_num_threads(1)
    config = {"command": " ".join(["python", "examples/small_scale_probe.py"]
                                  + list(sys.argv[1:] if argv is None else argv)),
              "data": args.data, "model": {**model_spec(args)}, "steps": args.steps, "batch": args.batch,
              "lr": args.lr, "ckpt_every": args.ckpt_every, "ft_eval_every": args.ft_eval_every, "l2_grid": L2_GRID,
              "probe_iters": args.probe_iters, "probe_rows": args.probe_rows, "parallel_seeds": args.parallel_seeds,
              "wall_s": round(time.perf_counter() - t0, 1), "load": ", ".join(loads)}
    paths = write_report(per_seed, config, report)
    for path in paths:
        print(f"wrote {path}")
    for c in aggregate(per_seed)["claims"]:
        print(f"  [{'holds' if c['holds'] else 'FAILS'}] {c['claim']}: {c['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
