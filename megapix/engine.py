"""Build the DeepSpeed engine for a layout and run training: steps, evaluation, checkpoints, metrics.

DeepSpeed owns the optimizer wrapping (ZeRO), the pipeline schedule, gradient accumulation, checkpoint
files and the monitor (TensorBoard/CSV); this module decides the batch geometry, feeds data, and records
what a user wants to read: loss, lr, tokens/s, TFLOP/s, MFU, peak memory.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import time

import torch
import torch.distributed as dist

from megapix.config import Config, ConfigError
from megapix.data.loader import GlobalBatches, MicroBatches, TokenData, fixed_batches
from megapix.dsconfig import load_ds_config, make_ds_config, resolve, zero_stage_of  # noqa: F401 (finetune)
from megapix.parallel.layout import build_layout
from megapix.utils import write_json

EXIT_PREEMPTED = 75  # "checkpoint saved, requeue me" (EX_TEMPFAIL); slurm/ scripts rely on it

# Dense bf16 peak TFLOP/s per device, for MFU. Override with --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0, "V100": 125.0}


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class LossModel(torch.nn.Module):
    """The plain model plus its loss, as one module DeepSpeed can wrap: forward(tokens, mask) -> loss."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, tokens, mask=None):
        logits = self.model(tokens, mask)
        return self.loss_fn(logits, tokens, mask)


def load_data(cfg: Config, out: str, is_rank0: bool):
    """Open the source, fit or load the palette (rank 0 fits once, the others wait and read it), and return
    (train, val, test) as TokenData, plus the palette."""
    from megapix.data.palette import Palette
    from megapix.data.sources import open_source

    m, d = cfg.model, cfg.data
    source = open_source(d.source, m.resolution, d.val_fraction, cfg.train.seed, d.augment)
    splits = {name: source.split(name) for name in ("train", "val", "test")}
    palette = None
    if splits["train"].images is not None:
        saved = os.path.join(out, "palette.npy")
        if d.palette:
            palette = Palette.load(d.palette)
        elif os.path.isfile(saved):
            palette = Palette.load(saved)
        else:
            if is_rank0:
                fit_palette(splits["train"].images, cfg.train.seed).save(saved)
            barrier()
            palette = Palette.load(saved)
    return {name: TokenData(s, m.n_ctx, palette, f"{d.source} [{name}]") for name, s in splits.items()}, palette


def fit_palette(images, seed: int, max_pixels: int = 4_000_000):
    """k=512 k-means on (a seeded sample of at most max_pixels of) the training pixels."""
    import numpy as np

    from megapix.data.palette import Palette

    n = len(images)
    per_image = images.shape[1] * images.shape[2]
    take = min(n, max(1, max_pixels // per_image))
    idx = np.sort(np.random.default_rng(seed).choice(n, take, replace=False))
    return Palette.fit(np.asarray(images[idx]).reshape(-1, 3), k=512, seed=seed)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StopRequest:
    """SIGUSR1/SIGTERM (preemption) or the time budget: stop at the next step boundary, on every rank together."""

    def __init__(self, time_budget: float):
        self.signalled = False
        self.deadline = time.time() + time_budget if time_budget > 0 else None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signalled = True

    def should_stop(self) -> bool:
        local = self.signalled or (self.deadline is not None and time.time() > self.deadline)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's signal stops all of them at the same step
        return bool(flag.item())


class MetricsLog:
    """<out>/metrics.jsonl, one JSON record per step (rank 0 writes). On resume, records past the checkpoint
    are dropped so the file is exactly the curve of the run that continues."""

    def __init__(self, path: str, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and resume_step >= 0 and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        elif enabled and resume_step < 0 and os.path.isfile(path):
            os.remove(path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    """Everything one training run needs, built in order: layout, data, model, DeepSpeed engine."""

    def __init__(self, cfg: Config, ds_config_path: str | None = None):
        import deepspeed

        from megapix import parallel

        self.cfg = cfg
        t = cfg.train
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_rank0 = rank == 0
        cfg, ds_base = resolve(cfg, ds_config_path, world)  # the JSON's settings taken in; conflicts refused
        self.cfg, t = cfg, cfg.train
        self.layout = build_layout(world, rank, cfg.model, t, zero_stage_of(cfg, ds_base))
        self.out = os.path.abspath(t.out)
        os.makedirs(self.out, exist_ok=True)
        self.ckpt_dir = os.path.join(self.out, "checkpoints")

        self.splits, self.palette = load_data(cfg, self.out, self.is_rank0)
        self.schedule = GlobalBatches(len(self.splits["train"]), t.global_batch, t.seed)
        per_rank = t.global_batch // self.layout.dp
        self.micro_batch = t.micro_batch or per_rank
        bert_rate = cfg.model.mask_rate if cfg.model.objective == "bert" else None
        self.batches = MicroBatches(self.splits["train"], self.schedule, self.layout.dp_rank, self.layout.dp,
                                    self.micro_batch, bert_rate, t.seed)
        self.eval_batches = fixed_batches(self.splits["val"], t.eval_batches, self.micro_batch, bert_rate, t.seed)
        warmup = t.warmup_steps if t.warmup_steps is not None else min(self.schedule.steps_per_epoch(),
                                                                       max(1, t.max_steps // 10))
        self.warmup = warmup

        module, self.is_pipeline = parallel.build_module(cfg, self.layout)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                                      **({"fused": True} if torch.cuda.is_available() else {"foreach": True}))

        def scheduler(opt):  # linear warm-up from lr/warmup, then cosine decay to 0 (the paper)
            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min(1.0, (step - warmup) / max(1, t.max_steps - warmup))
                return 0.5 * (1.0 + math.cos(math.pi * progress))

            return torch.optim.lr_scheduler.LambdaLR(opt, factor)

        self.ds_config = ds_config = make_ds_config(cfg, ds_base, self.layout, self.micro_batch)
        mpu = self.layout.grid if (self.layout.tp > 1 and not self.is_pipeline) else None
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, mpu=mpu)
        self.device = self.engine.device
        self.peak_tflops = device_peak_tflops(t.peak_tflops)
        self.step = 0

    # ---- checkpoints ----
    def save(self) -> None:
        """A DeepSpeed checkpoint of this step (megapix.checkpoint.save: staged, renamed, `latest` moves last)."""
        from megapix import checkpoint

        checkpoint.save(self.engine, self.ckpt_dir, self.step, self.cfg, self.layout)

    def layout_record(self) -> dict:
        lay = self.layout
        return {"step": self.step, "world": lay.world, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
                "zero_stage": lay.zero_stage}

    def resume(self) -> bool:
        """Continue from `latest` in any layout (megapix.checkpoint.resume); False when there is none."""
        from megapix import checkpoint

        step = checkpoint.resume(self.engine, self.ckpt_dir, self.cfg, self.layout, self.is_pipeline)
        if step is None:
            return False
        self.step = step
        return True

    # ---- one step ----
    def train_step(self) -> float:
        micro = self.batches(self.step)
        if self.is_pipeline:
            loss = self.engine.train_batch(data_iter=iter(self._pipe_inputs(micro)))
            return float(loss)
        total = 0.0
        for tokens, mask in micro:
            loss = self.engine(tokens.to(self.device), None if mask is None else mask.to(self.device))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self._dp_mean(total / len(micro))

    def _pipe_inputs(self, micro):
        from megapix import parallel

        return parallel.pipeline_inputs(micro, self.device)

    def _dp_mean(self, value) -> float:
        v = torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(1)
        if self.layout.dp > 1:
            dist.all_reduce(v, group=self.layout.dp_group)
            v /= self.layout.dp
        return float(v.item())

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_batches:
            return None
        if self.is_pipeline:
            from megapix import parallel

            return parallel.pipeline_eval(self.engine, self.eval_batches, self.device)
        self.engine.eval()
        losses = [self.engine(tok.to(self.device), None if m is None else m.to(self.device)).float()
                  for tok, m in self.eval_batches]
        self.engine.train()
        return float(torch.stack(losses).mean())

    # ---- the loop ----
    def fit(self, resume: bool = False) -> int:
        """Train to max_steps. Returns 0, or EXIT_PREEMPTED after saving on a signal or the time budget."""
        from tqdm import tqdm

        t = self.cfg.train
        resumed = self.resume() if resume else False
        log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), self.is_rank0, self.step if resumed else -1)
        stop = StopRequest(t.time_budget)
        tokens_per_step = t.global_batch * self.cfg.model.n_ctx
        flops_per_step = tokens_per_step * self.cfg.model.flops_per_token()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.is_rank0, desc="train", dynamic_ncols=True)
        last = time.perf_counter()
        while self.step < t.max_steps:
            lr = self.engine.get_lr()[0]
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step + 1}; lower --lr")
            self.step += 1
            now = time.perf_counter()
            dt, last = now - last, now
            tflops = flops_per_step / dt / self.layout.world / 1e12
            rec = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                   "tflops_per_device": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                   "peak_mem_gb": peak_memory_gb(), "step_time_s": dt}
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                rec["val_loss"] = self.evaluate()
                last = time.perf_counter()  # evaluation time is not training throughput
            log.write(rec)
            self._monitor(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                self.save()
                last = time.perf_counter()
            if self.step < t.max_steps and stop.should_stop():
                bar.close()
                self.save()
                if self.is_rank0:
                    print(f"stop requested: saved step {self.step} to {self.ckpt_dir}; exiting {EXIT_PREEMPTED} "
                          "so the job can be requeued and resumed with --resume", flush=True)
                return EXIT_PREEMPTED
        bar.close()
        self.save()
        return 0

    def _monitor(self, rec: dict) -> None:
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and mon.enabled and self.is_rank0:
            mon.write_events([(f"megapix/{k}", v, self.step) for k, v in rec.items()
                              if isinstance(v, (int, float)) and k != "step"])

    def write_samples(self, n: int = 8) -> str | None:
        """<out>/samples.png: completions of held-out images and unconditional samples (AR models)."""
        if self.cfg.model.objective != "ar" or self.palette is None or self.is_pipeline or self.layout.tp > 1:
            return None  # sharded layouts: `megapix export` then `megapix sample` on the export
        import contextlib

        import deepspeed
        import numpy as np

        from megapix.sample import completion_grid, save_png

        model = self.engine.module.model
        gather = (deepspeed.zero.GatheredParameters(list(model.parameters()))
                  if self.layout.zero_stage == 3 else contextlib.nullcontext())
        path = os.path.join(self.out, "samples.png")
        with gather:
            if self.is_rank0:
                test = self.splits["test"]
                held = test.tokens(np.arange(min(n, len(test)))).to(self.device)
                model.eval()
                save_png(completion_grid(model, self.palette, held, seed=self.cfg.train.seed), path)
                model.train()
        barrier()
        return path
