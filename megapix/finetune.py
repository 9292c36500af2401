"""Classification fine-tuning with the joint loss: `megapix finetune`.

The paper's recipe (section 3.4): a linear classifier on the average-pooled output of the final norm;
loss = L_gen + L_clf (unweighted sum); early stopping on validation accuracy; CIFAR augmentation (4-pixel
reflection pad, random crop, random horizontal flip) applied to the images before palette encoding (token
sources get the same crop/flip on their id grid; ImageNet-layout folders their own resize/crop).
BERT models: the generative term is the masked-token loss on a 15% mask, the classifier sees that same
masked forward during training and the unmasked input at evaluation.

Layouts: runs under torchrun / deepspeed / mpiexec / srun / plain python through DeepSpeed's engine with data
parallelism and ZeRO 0-3 (deepspeed.initialize). Tensor- or pipeline-parallel fine-tuning is NOT implemented
and is refused; a checkpoint of any layout loads here (it is consolidated first), so a model pre-trained with
TP/PP is fine-tuned data-parallel (with ZeRO-3 when it does not fit one device).

`--lr 3e-4,1e-4,3e-5` runs one early-stopped fine-tune per rate and keeps the best by validation accuracy;
`--from-scratch` re-initialises the weights (same architecture and palette): the random-init baseline.
Writes DIR/finetune_results.json, DIR/metrics.jsonl, and the best model as an HF ImageGPT directory
DIR/best_model/ plus its classifier (DIR/best_model/classifier.safetensors + classifier.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megapix.config import ConfigError


class Classifier(nn.Module):
    """ImageGPT + a linear head on the mean over positions of norm_f's output. forward -> (loss, l_gen, l_clf,
    class logits)."""

    def __init__(self, model, num_classes: int):
        super().__init__()
        self.model = model
        self.clf = nn.Linear(model.config.d_model, num_classes)
        nn.init.zeros_(self.clf.weight)
        nn.init.zeros_(self.clf.bias)

    def forward(self, tokens, labels, mask=None):
        from megapix.model.igpt import lm_loss

        m = self.model
        z = m.hidden(tokens, mask)  # the head's input: norm_f of the last block's output
        l_gen = lm_loss(m.head(z), tokens, mask if m.config.objective == "bert" else None)
        logits = self.clf(z.float().mean(dim=1))
        l_clf = F.cross_entropy(logits, labels)
        return l_gen + l_clf, l_gen.detach(), l_clf.detach(), logits.detach()


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------
class LabelledData:
    """A split as (tokens, labels) batches, with the paper's augmentation on request."""

    def __init__(self, split, palette, n_ctx: int, name: str):
        from megapix.data.loader import TokenData

        if split.labels is None:
            raise ConfigError(f"{name} has no labels; fine-tuning needs a labelled source")
        self.td = TokenData(split, n_ctx, palette, name)  # validates sizes and the palette
        self.split, self.palette, self.n_ctx = split, palette, n_ctx
        self.labels = np.asarray(split.labels, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def batch(self, idx: np.ndarray, epoch: int = 0, seed: int = 0, augment: bool = False):
        from megapix.data.augment import cifar_augment

        idx = np.asarray(idx, dtype=np.int64)
        y = torch.from_numpy(self.labels[idx])
        s = self.split
        if not augment:
            return self.td.tokens(idx), y
        if s.tokens is not None:  # crop/flip the id grid itself: the same augmentation, after encoding
            side = int(round(math.sqrt(self.n_ctx)))
            grid = np.asarray(s.tokens[idx]).reshape(len(idx), side, side, 1)
            return torch.from_numpy(cifar_augment(grid, idx, epoch, seed).reshape(len(idx), -1).astype(np.int64)), y
        if hasattr(s.images, "batch"):  # ImageNet-layout folders: the paper's random resize/crop
            return self.td.tokens(idx, epoch, seed), y
        images = cifar_augment(np.asarray(s.images[idx]), idx, epoch, seed)
        return torch.from_numpy(self.palette.encode(images)), y


# ----------------------------------------------------------------------------------------------------------
# one fine-tuning run
# ----------------------------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return dist, on, (dist.get_rank() if on else 0), (dist.get_world_size() if on else 1)


def _sum(values, device):
    dist, on, _, world = _dist()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if on and world > 1:
        dist.all_reduce(t)
    return t.tolist()


def make_model(base_state, config, num_classes: int, seed: int, from_scratch: bool):
    from megapix.model import ImageGPT

    model = ImageGPT(config, seed=seed)
    if not from_scratch:
        model.load_state_dict(base_state, strict=True)
    return Classifier(model, num_classes)


def ds_config(args, world: int, bf16: bool) -> dict:
    from megapix.engine import load_ds_config

    ds = load_ds_config(args.deepspeed_config)
    micro = args.micro_batch or args.global_batch // world
    if args.global_batch % world or (args.global_batch // world) % micro:
        raise ConfigError(f"global batch {args.global_batch} does not split into {world} ranks x micro-batches of "
                          f"{micro}; pick a global batch divisible by both")
    ds["train_batch_size"] = args.global_batch
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = args.global_batch // (micro * world)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("gradient_clipping", args.grad_clip)
    zero = ds.setdefault("zero_optimization", {})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero.setdefault("stage", 0)
    if not torch.cuda.is_available() and zero.get("offload_optimizer"):
        ds["zero_force_ds_cpu_optimizer"] = False
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.pop("fp16", None)
    return ds


def run_one(lr: float, args, data, base_state, config, num_classes: int, log, out_rank0: bool) -> dict:
    """One early-stopped fine-tune at learning rate lr. Returns its record (best state kept on rank 0)."""
    import deepspeed
    from tqdm import tqdm

    from megapix.data.loader import GlobalBatches, bert_mask

    dist, on, rank, world = _dist()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and torch.cuda.is_available())
    ds = ds_config(args, world, bf16)
    stage = ds["zero_optimization"]["stage"]
    module = make_model(base_state, config, num_classes, args.seed, args.from_scratch)
    train, val, test = data["train"], data["val"], data["test"]
    schedule = GlobalBatches(len(train), args.global_batch, args.seed)
    spe = schedule.steps_per_epoch()
    max_steps = args.max_steps or args.max_epochs * spe
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, min(spe, max_steps // 10))
    eval_every = args.eval_every or spe

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, max_steps - warmup))))

    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds)
    device = engine.device
    per_rank = args.global_batch // world
    micro = ds["train_micro_batch_size_per_gpu"]
    bert = config.objective == "bert"

    @torch.no_grad()
    def accuracy(split) -> float:
        n = len(split)
        share = -(-n // world)
        lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
        eb = args.eval_batch
        n_batches = -(-share // eb)  # the same count on every rank (ZeRO-3 gathers need every rank)
        engine.eval()
        correct = 0
        for j in range(n_batches):
            a, b = lo + j * eb, min(hi, lo + (j + 1) * eb)
            idx = np.arange(a, b) if b > a else np.array([0])
            tokens, y = split.batch(idx)
            _, _, _, logits = engine(tokens.to(device), y.to(device))
            if b > a:
                correct += int((logits.argmax(1).cpu() == y).sum())
        engine.train()
        return _sum([correct], device)[0] / n

    def snapshot():
        params = list(engine.module.parameters())
        import contextlib

        gather = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
        with gather:
            if rank == 0:
                return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
        return None

    rec = {"lr": lr, "from_scratch": args.from_scratch, "best_val_acc": -1.0, "best_step": 0, "stopped_early": False}
    best_state, bad, step = None, 0, 0
    bar = tqdm(total=max_steps, disable=rank != 0, desc=f"finetune lr={lr:g}", dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < max_steps:
        idx, epochs = schedule.indices(step)
        mine, ep = idx[rank * per_rank:(rank + 1) * per_rank], epochs[rank * per_rank:(rank + 1) * per_rank]
        tot = torch.zeros(3)
        for a in range(0, per_rank, micro):
            parts = [train.batch(mine[a:a + micro][ep[a:a + micro] == e], int(e), args.seed, args.augment)
                     for e in np.unique(ep[a:a + micro])]
            tokens = torch.cat([p[0] for p in parts]).to(device)
            y = torch.cat([p[1] for p in parts]).to(device)
            mask = None
            if bert:
                mask = bert_mask(step, args.global_batch, config.n_ctx, config.mask_rate, args.seed)
                mask = mask[rank * per_rank + a: rank * per_rank + a + micro].to(device)
            loss, l_gen, l_clf, _ = engine(tokens, y, mask)
            engine.backward(loss)
            engine.step()
            tot += torch.stack([loss.detach().float().cpu(), l_gen.float().cpu(), l_clf.float().cpu()])
        step += 1
        tot = _sum((tot / (per_rank // micro)).tolist(), device)
        r = {"lr_run": lr, "step": step, "epoch": step / spe, "lr": sched.get_last_lr()[0],
             "loss": tot[0] / world, "l_gen": tot[1] / world, "l_clf": tot[2] / world}
        bar.update(1)
        bar.set_postfix(loss=f"{r['loss']:.3f}", clf=f"{r['l_clf']:.3f}")
        if step % eval_every == 0 or step == max_steps:
            r["val_acc"] = accuracy(val)
            if r["val_acc"] > rec["best_val_acc"]:
                rec.update(best_val_acc=r["val_acc"], best_step=step)
                if test is not None:
                    rec["test_acc_at_best"] = r["test_acc"] = accuracy(test)
                best_state, bad = snapshot(), 0
            else:
                bad += 1
            if out_rank0:
                tqdm.write(f"  lr {lr:g} step {step}: val acc {100 * r['val_acc']:.2f}%"
                           + (f", test {100 * r['test_acc']:.2f}%" if "test_acc" in r else "")
                           + (f" (no gain {bad}/{args.patience})" if bad else ""))
        log(r)
        if bad >= args.patience:
            rec["stopped_early"] = True
            break
    bar.close()
    rec.update(steps=step, steps_per_epoch=spe, seconds=round(time.perf_counter() - t0, 1), zero_stage=stage,
               world=world)
    del engine, opt
    return rec, best_state


# ----------------------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megapix finetune", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="pre-trained model: training --out folder, tag folder, or HF/megapix export")
    p.add_argument("--model", help="preset for --from-scratch without a --checkpoint (e.g. tiny)")
    p.add_argument("--from-scratch", action="store_true", help="random initialisation: the baseline")
    p.add_argument("--data", help="labelled source (default: the checkpoint's); digits, cifar10:PATH, ...")
    p.add_argument("--palette", help="kmeans_centers.npy (default: the checkpoint's)")
    p.add_argument("--out", required=True)
    p.add_argument("--lr", default="3e-4,1e-4,3e-5", help="one rate or a comma-separated sweep")
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, help="overrides --max-epochs")
    p.add_argument("--patience", type=int, default=3, help="evaluations without val improvement before stopping")
    p.add_argument("--eval-every", type=int, help="steps between val evaluations (default: one epoch)")
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, help="per rank")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--no-augment", dest="augment", action="store_false", help="skip the pad/crop/flip augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--pipeline-parallel", type=int, default=1)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _load(args):
    from megapix.config import model_preset

    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise ConfigError(f"checkpoint {args.checkpoint!r} does not exist")
        from megapix.checkpoint import load_model_and_palette

        model, palette, data = load_model_and_palette(args.checkpoint, args.palette, args.data)
        return model.config, {k: v.detach().float() for k, v in model.state_dict().items()}, palette, data
    if not args.from_scratch:
        raise ConfigError("pass --checkpoint (a pre-trained model), or --from-scratch with --model PRESET")
    from megapix.data.palette import Palette

    config = model_preset(args.model or "tiny")
    palette = Palette.load(args.palette) if args.palette else None
    return config, None, palette, args.data or "digits"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.tensor_parallel != 1 or args.pipeline_parallel != 1:
        raise ConfigError("tensor/pipeline-parallel fine-tuning is not supported; fine-tuning runs data-parallel "
                          "with ZeRO 0-3 (a TP/PP checkpoint loads consolidated): drop --tensor-parallel/"
                          "--pipeline-parallel and use --zero-stage 3 if the model does not fit one device")
    try:
        lrs = [float(x) for x in args.lr.split(",") if x]
    except ValueError:
        raise ConfigError(f"cannot parse --lr {args.lr!r}; use e.g. 3e-4,1e-4,3e-5") from None
    if not lrs or any(x <= 0 for x in lrs):
        raise ConfigError("--lr needs one or more positive rates")
    if args.patience < 1 or args.global_batch < 1:
        raise ConfigError("--patience and --global-batch must be >= 1")
    from megapix.data.sources import open_source
    from megapix.parallel.launch import init_distributed

    init_distributed()
    dist, on, rank, world = _dist()
    config, base_state, palette, data_spec = _load(args)
    source = open_source(data_spec, config.resolution, args.val_fraction, args.seed, augment=True)
    splits = {s: source.split(s) for s in ("train", "val", "test")}
    out = os.path.abspath(args.out)
    if palette is None and splits["train"].images is not None:
        from megapix.data.palette import Palette
        from megapix.engine import barrier, fit_palette

        saved = os.path.join(out, "palette.npy")
        if rank == 0 and not os.path.isfile(saved):
            os.makedirs(out, exist_ok=True)
            fit_palette(splits["train"].images, args.seed).save(saved)
        barrier()
        palette = Palette.load(saved)
    data = {s: LabelledData(sp, palette, config.n_ctx, f"{data_spec} [{s}]") for s, sp in splits.items()}
    if len(data["test"]) == 0:
        data["test"] = None
    num_classes = source.num_classes or int(max(data["train"].labels.max(), data["val"].labels.max())) + 1
    if len(data["val"]) == 0:
        raise ConfigError("the validation split is empty; early stopping needs one (--val-fraction > 0)")
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if rank == 0 and os.path.isfile(metrics_path):
        os.remove(metrics_path)

    def log(rec):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    runs, best, best_state = [], None, None
    for lr in lrs:
        rec, state = run_one(lr, args, data, base_state, config, num_classes, log, rank == 0)
        runs.append(rec)
        if best is None or rec["best_val_acc"] > best["best_val_acc"]:
            best, best_state = rec, state
        del state
    if rank == 0:
        from safetensors.torch import save_file

        from megapix.model.hf import save_state_dict_pretrained
        from megapix.utils import write_json

        target = os.path.join(out, "best_model")
        model_sd = {k.removeprefix("model."): v for k, v in best_state.items() if k.startswith("model.")}
        save_state_dict_pretrained(model_sd, config, target)
        save_file({"weight": best_state["clf.weight"].contiguous(), "bias": best_state["clf.bias"].contiguous()},
                  os.path.join(target, "classifier.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(target, "classifier.json"),
                   {"num_classes": num_classes, "input": "mean over positions of norm_f output",
                    "d_model": config.d_model})
        if palette is not None:
            palette.save(os.path.join(target, "palette.npy"))
        result = {"checkpoint": args.checkpoint and os.path.abspath(args.checkpoint), "data": data_spec,
                  "from_scratch": args.from_scratch, "lrs": lrs, "runs": runs, "best_lr": best["lr"],
                  "best_val_acc": best["best_val_acc"], "test_acc": best.get("test_acc_at_best"),
                  "selection": "best validation accuracy over the sweep; test accuracy at that run's best step",
                  "loss": "L_gen + L_clf (unweighted)", "augment": args.augment, "world": world,
                  "best_model": target, "num_classes": num_classes}
        write_json(os.path.join(out, "finetune_results.json"), result)
        print(f"megapix finetune: best lr {best['lr']:g}: val acc {100 * best['best_val_acc']:.2f}%"
              + (f", test acc {100 * best['test_acc_at_best']:.2f}%" if "test_acc_at_best" in best else "")
              + f" -> {out}", flush=True)
        for r in runs:
            print(f"  lr {r['lr']:<8g} best val {100 * r['best_val_acc']:6.2f}% at step {r['best_step']}/{r['steps']}"
                  + (" (early stop)" if r["stopped_early"] else ""), flush=True)
    if on:
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
