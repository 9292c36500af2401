"""The training loop: build the DeepSpeed engine for a layout and a task, then steps, evaluation, early
stopping, checkpoints and metrics.

DeepSpeed owns the optimizer wrapping (ZeRO), the pipeline schedule, gradient accumulation, checkpoint
files and the monitor (TensorBoard/CSV); this module decides the batch geometry, feeds the task's batches, and
records what a user wants to read: loss and bits/dim, lr, gradient norm, tokens/s, TFLOP/s, MFU, peak memory,
loss.png, the best checkpoint. What is trained (the module, its loss, its evaluation) is a task
(megapix/tasks.py): pre-training and fine-tuning run this same loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from megapix.config import Config, ConfigError
from megapix.data import load_splits
from megapix.data.loader import GlobalBatches
from megapix.dsconfig import make_ds_config, resolve, zero_stage_of
from megapix.parallel.dist import barrier
from megapix.parallel import watchdog
from megapix.parallel.layout import build_layout
from megapix.runlog import (MetricsLog, StopRequest, measured_matmul_tflops, peak_memory, read_metrics,
                            refuse_existing_run, write_loss_plot)
from megapix.tasks import LMTask

EXIT_PREEMPTED = 75  # "checkpoint saved, requeue me" (EX_TEMPFAIL); slurm/ scripts rely on it

# Dense bf16 peak TFLOP/s per device, for MFU. Override with --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0, "V100": 125.0}


def device_peak_tflops(override: float | None, device="cuda", dtype: torch.dtype = torch.bfloat16
                       ) -> tuple[float | None, str]:
    """(peak TFLOP/s per rank that MFU divides by, where it comes from; or None and why there is no MFU).
    --peak-tflops wins; a GPU is looked up in PEAK_TFLOPS; a CPU rank is measured (rank 0 runs a ~1 s matmul
    probe in the training dtype, every rank uses its result): MFU on CPU is an estimate against what this machine
    reaches on a large matmul, not a datasheet number."""
    if override:
        return override, "--peak-tflops"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak is None:
            return None, f"no peak TFLOP/s known for {name!r}: pass --peak-tflops for MFU"
        return peak, f"{name} dense bf16 datasheet peak"
    box = [measured_matmul_tflops(dtype) if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    kind = str(dtype).removeprefix("torch.")
    return box[0], f"measured {kind} matmul peak of this CPU, an estimate"


class Trainer:
    """One training run, built in order: layout, task data, module, DeepSpeed engine. `task` defaults to
    pre-training (LMTask on the data of cfg.data); `log` lets several runs share one metrics file (a sweep)."""

    def __init__(self, cfg: Config, ds_config_path: str | None = None, task=None, log: MetricsLog | None = None,
                 resume: bool = False):
        import deepspeed

        self.cfg = cfg
        t = cfg.train
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_rank0 = rank == 0
        cfg, ds_base = resolve(cfg, ds_config_path, world)  # the JSON's settings taken in; conflicts refused
        self.cfg, t = cfg, cfg.train
        self.layout = build_layout(world, rank, cfg.model, t, zero_stage_of(cfg, ds_base))
        self.out = os.path.abspath(t.out)
        self.shown_out = t.out
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.shared_log = log
        # Before anything is written into --out: a run already there is continued only with --resume, and the
        # checkpoint to resume is checked (complete, nothing but allowed types) now, not after the data is loaded.
        self.resume_tag = None
        if log is None:
            if resume:
                from megapix import checkpoint

                self.resume_tag = checkpoint.resumable_tag(self.ckpt_dir, cfg)
            else:
                refuse_existing_run(self.out, self.shown_out)
            barrier()
        made = []  # the folders this run creates for --out, innermost first
        path = self.out
        while not os.path.exists(path):
            made.append(path)
            path = os.path.dirname(path)
        os.makedirs(self.out, exist_ok=True)
        if task is None:
            try:
                task = LMTask(*load_splits(cfg, self.out, self.is_rank0))
            except ConfigError:
                if self.is_rank0:  # a data error leaves no empty --out behind (only folders this run made)
                    with contextlib.suppress(OSError):
                        for folder in made:
                            os.rmdir(folder)  # fails, and stops, at the first one that is not empty
                raise
        self.task = task
        self.palette = getattr(task, "palette", None)
        self.splits = getattr(task, "splits", None)
        self.schedule = GlobalBatches(task.train_size, t.global_batch, t.seed)
        per_rank = t.global_batch // self.layout.dp
        self.micro_batch = t.micro_batch or per_rank
        warmup = t.warmup_steps if t.warmup_steps is not None else min(self.schedule.steps_per_epoch(),
                                                                       max(1, t.max_steps // 10))
        self.warmup = warmup

        # The DeepSpeed config before the module: under ZeRO-3, construction partitions with it (build_module)
        self.ds_config = ds_config = make_ds_config(cfg, ds_base, self.layout, self.micro_batch)
        self.layout.ds_config = ds_config
        module, self.is_pipeline = task.build(cfg, self.layout)
        task.setup(self)
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

        mpu = self.layout.grid if (self.layout.tp > 1 and not self.is_pipeline) else None
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, mpu=mpu)
        self.device = self.engine.device
        self.peak_tflops, self.peak_source = device_peak_tflops(
            t.peak_tflops, self.device, torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32)
        self.grad_norm_note = None  # why grad_norm is null, once known
        self._local_grad_norm = None
        if self.layout.zero_stage == 0 and not ds_config["bf16"]["enabled"]:
            # ZeRO-0 in fp32: DeepSpeed steps torch's AdamW itself and keeps no norm (get_global_grad_norm() is
            # None); it is computed just before that step (and before DeepSpeed clips them), when DeepSpeed has
            # all-reduced the gradients.
            def before_step(opt, args, kwargs):
                if self._local_grad_norm is None:  # not measured yet by the clipping below
                    self._measure_grad_norm(params)

            optimizer.register_step_pre_hook(before_step)
            clip = self.engine.clip_fp32_gradients

            def measured_clip():
                self._measure_grad_norm(params)
                return clip()

            self.engine.clip_fp32_gradients = measured_clip
        self.step = 0
        self.saved_step = None  # the step of the checkpoint this process last wrote or resumed

    # ---- checkpoints ----
    @watchdog.protected  # a SIGTERM while blocked never cuts a save short
    def save(self) -> None:
        """A DeepSpeed checkpoint of this step (megapix.checkpoint.save: staged, renamed, `latest` moves last)."""
        from megapix import checkpoint

        checkpoint.save(self.engine, self.ckpt_dir, self.step, self.cfg, self.layout)

    def _save_if_best(self, metrics: dict) -> None:
        """A new best validation score (task.score, higher is better) saves this step's checkpoint (if not saved
        already) and names it in <out>/checkpoints/best.json. Collective: rank 0's decision is every rank's."""
        from megapix.checkpoint.store import _agree, prune, tag_for, write_best

        score = self.task.score(metrics)
        best = self.best_checkpoint
        if not _agree(score is not None and (best is None or score > best["score"])):
            return
        if self.saved_step != self.step:
            self.save()
            self.saved_step = self.step
        tag = tag_for(self.step)
        self.best_checkpoint = {"tag": tag, "step": self.step, "score": score, **metrics}
        if self.is_rank0:
            write_best(self.ckpt_dir, tag, self.step, metrics, score)
            prune(self.ckpt_dir, self.cfg.train.keep_last, self.step)  # the previous best is an ordinary tag now
        barrier()

    def resume(self) -> bool:
        """Continue from the checkpoint checked at construction (megapix.checkpoint.resume, any layout)."""
        from megapix import checkpoint

        step = checkpoint.resume(self.engine, self.ckpt_dir, self.cfg, self.layout, self.is_pipeline,
                                 tag=self.resume_tag)
        if step is None:
            return False
        self.step = step
        return True

    def _measure_grad_norm(self, params) -> None:
        """The global L2 norm of the gradients (before clipping), over every rank: each rank's squared sum of
        its own gradients, with a tensor-parallel replicated parameter counted on TP rank 0 only, summed over the
        world and divided by the data-parallel replicas (which hold the same averaged gradients). Collective:
        every rank steps its optimizer at the same time."""
        tp0 = self.layout.tp == 1 or self.layout.tp_rank == 0
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            if p.grad is not None and (tp0 or getattr(p, "tensor_model_parallel", False)):
                sq += p.grad.detach().double().pow(2).sum()
        if self.layout.world > 1:
            dist.all_reduce(sq)
            sq /= self.layout.dp * self.layout.cp  # DeepSpeed's data axis: context-parallel ranks are replicas too
        self._local_grad_norm = float(sq.sqrt())

    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm (before clipping): DeepSpeed's (ZeRO-1/2/3, bf16),
        else megapix's own (ZeRO-0 fp32); None (with self.grad_norm_note saying why) when neither has one."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._local_grad_norm
        if norm is None:
            self.grad_norm_note = ("DeepSpeed reported no gradient norm for this step (ZeRO-1/2 computes none when "
                                   "its overflow check is off)")
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    # ---- one step ----
    def train_step(self, micro) -> dict:
        """One global batch; returns the task's metrics for it (token-weighted over every rank)."""
        task = self.task
        task.meter.reset()
        self._local_grad_norm = None
        if self.is_pipeline:
            self.engine.train_batch(data_iter=iter([self._to_device(task.pipe_batch(b)) for b in micro]))
        else:
            for b in micro:
                loss = task.forward(self.engine, self._to_device(b))
                self.engine.backward(loss)
                self.engine.step()
        return task.meter.reduce(self.device)

    def _to_device(self, obj):
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._to_device(x) for x in obj)
        return obj.to(self.device) if isinstance(obj, torch.Tensor) else obj

    def _next_batches(self):
        """This rank's micro-batches of the next step. A data error on any rank (a corrupt image) is shared with
        every rank before anyone enters a collective: all save the last completed step, then all raise it."""
        error = None
        try:
            micro = self.task.train_batches(self.step)
        except ConfigError as e:
            error, micro = e, None
        failed = error is not None
        if self.layout.world > 1:
            flag = torch.tensor([1.0 if failed else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                messages = [None] * self.layout.world
                dist.all_gather_object(messages, None if error is None else str(error))
                error = ConfigError(next(m for m in messages if m is not None))
                failed = True
        if failed:
            if self.step > 0 and self.saved_step != self.step and self.save_enabled:
                self.save()
                error = ConfigError(f"{error} (step {self.step} was saved first: fix the data, then --resume)")
            raise error
        return micro

    @torch.no_grad()
    def evaluate_rows(self, n: int, make_batch) -> dict:
        """The task's meter over rows 0..n-1 of an evaluation set: rows sharded over data-parallel ranks in
        contiguous shares, micro-batches of at most micro_batch rows, and the same number of forward calls on
        every rank (a rank out of rows runs row 0 unrecorded: ZeRO-3 and pipelines need every rank)."""
        task, lay = self.task, self.layout
        share = -(-n // lay.dp)
        lo, hi = min(n, lay.dp_rank * share), min(n, (lay.dp_rank + 1) * share)
        mb = self.micro_batch
        task.meter.reset()
        if not self.is_pipeline:
            self.engine.eval()
        try:
            for j in range(-(-share // mb)):
                a, b = lo + j * mb, min(hi, lo + (j + 1) * mb)
                task.meter.enabled = b > a
                batch = self._to_device(make_batch(np.arange(a, b) if b > a else np.arange(1)))
                if self.is_pipeline:
                    self.engine.reset_activation_shape()  # eval batches may be shorter than training ones
                    self.engine.eval_batch(iter([task.pipe_batch(batch)]), num_micro_batches=1)
                else:
                    task.forward(self.engine, batch)
        finally:
            task.meter.enabled = True
            if self.is_pipeline:
                self.engine.reset_activation_shape()
            else:
                self.engine.train()
        return task.meter.reduce(self.device)

    def evaluate(self) -> dict:
        return self.task.evaluate(self)

    @property
    def save_enabled(self) -> bool:
        return self.shared_log is None

    # ---- the loop ----
    def fit(self, patience: int | None = None, on_best=None, extra: dict | None = None,
            desc: str = "train") -> int:
        """Train to max_steps; evaluate every eval_every steps and at the end. Returns 0, or EXIT_PREEMPTED after
        saving on a signal or the time budget.

        Every evaluation's metrics go through task.score (higher is better): `on_best(trainer, record)` runs on
        each new best, and `patience` evaluations without a new best stop the run early (self.stopped_early).
        Runs that share a metrics log (`log=` at construction: a sweep) write no checkpoints; their result is
        what on_best keeps."""
        from tqdm import tqdm

        t = self.cfg.train
        resumed = False
        self.best_checkpoint = None  # best.json's record: the checkpoint of the best validation score so far
        self.loss_png = None
        if self.shared_log is None:
            if self.resume_tag is not None:
                resumed = self.resume()
                self.saved_step = self.step
                if resumed:  # the best of the steps before the resumed one stays the one to beat
                    from megapix.checkpoint.store import _agree, read_best

                    best = _agree(read_best(self.ckpt_dir) if self.is_rank0 else None)
                    self.best_checkpoint = best if best and best.get("step", 1 << 62) <= self.step else None
            log = MetricsLog(os.path.join(self.out, "metrics.jsonl"), self.is_rank0, self.step if resumed else -1)
            if self.is_rank0:  # loss.png's curves: the records kept from before a resume, then this run's
                self._curve = ([], [])
                for r in read_metrics(log.path):
                    self._add_to_curve(r)
        else:
            log = self.shared_log
        stop = StopRequest(t.time_budget)
        self.best_score, self.best_step, self.stopped_early, bad = None, 0, False, 0
        tokens_per_step = t.global_batch * self.cfg.model.n_ctx
        flops_per_step = tokens_per_step * self.cfg.model.flops_per_token()
        # A terminal gets a bar; a log file (SLURM, nohup, a pipe) gets one plain line every log_every steps instead
        # of hundreds of carriage-return redraws.
        interactive = sys.stdout.isatty()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (self.is_rank0 and interactive), desc=desc,
                   dynamic_ncols=True)
        last_val = None
        self.summary = {"first_step": self.step}
        last = time.perf_counter()
        try:  # the bar ends its line before any error is printed
            while self.step < t.max_steps:
                watchdog.step_begins(self.step + 1)
                lr = self.engine.get_lr()[0]
                stats = self.train_step(self._next_batches())
                loss = stats["loss"]
                if loss is None or not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step + 1}; lower --lr")
                self.step += 1
                now = time.perf_counter()
                dt, last = now - last, now
                tflops = flops_per_step / dt / self.layout.world / 1e12
                mem_key, mem = peak_memory(torch.device(self.device))
                rec = {**(extra or {}), "step": self.step, **stats, "lr": lr, "grad_norm": self.grad_norm(),
                       "tokens_per_s": tokens_per_step / dt, "tflops_per_device": tflops,
                       "mfu": tflops / self.peak_tflops if self.peak_tflops else None, mem_key: mem,
                       "step_time_s": dt}
                evaluated = t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps)
                if evaluated:
                    metrics = self.evaluate()
                    rec.update(metrics)
                    score = self.task.score(metrics)
                    if score is not None and (self.best_score is None or score > self.best_score):
                        self.best_score, self.best_step, bad = score, self.step, 0
                        if on_best is not None:
                            on_best(self, rec)
                    else:
                        bad += 1
                    last = time.perf_counter()  # evaluation time is not training throughput
                self._add_bits_per_dim(rec)
                log.write(rec)
                self._add_to_curve(rec)
                self._monitor(rec)
                self._remember(rec)
                if evaluated and self.save_enabled:
                    if t.save_best:
                        self._save_if_best(metrics)
                    self._plot()
                    last = time.perf_counter()
                if "val_loss" in rec:
                    last_val = rec["val_loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", **({"val": f"{last_val:.4f}"} if last_val is not None else {}),
                                tok_s=f"{rec['tokens_per_s']:.0f}")
                if self.is_rank0 and not interactive and (self.step % max(1, t.log_every) == 0
                                                          or self.step == t.max_steps):
                    bpd = f" ({rec['bpd']:.3f} bits/dim)" if rec.get("bpd") is not None else ""
                    val_bpd = f" ({rec['val_bpd']:.3f} bits/dim)" if rec.get("val_bpd") is not None else ""
                    norm = f", grad_norm {rec['grad_norm']:.3g}" if rec["grad_norm"] is not None else ""
                    print(f"{desc} step {self.step}/{t.max_steps}: loss {loss:.4f}{bpd}"
                          + (f", val_loss {rec['val_loss']:.4f}{val_bpd}" if rec.get("val_loss") is not None else "")
                          + f", lr {lr:.3g}{norm}, {rec['tokens_per_s']:.0f} tokens/s", flush=True)
                if evaluated and patience and bad >= patience:
                    self.stopped_early = True
                    break
                if (self.save_enabled and t.save_every and self.step % t.save_every == 0
                        and self.step < t.max_steps and self.saved_step != self.step):
                    self.save()
                    self.saved_step = self.step
                    last = time.perf_counter()
                if self.step < t.max_steps and stop.should_stop():
                    bar.close()  # before the message below
                    if self.save_enabled:
                        if self.saved_step != self.step:
                            self.save()
                            self.saved_step = self.step
                        self._plot()
                        if self.is_rank0:
                            print(f"stop requested: saved step {self.step} to {self.ckpt_dir}; exiting "
                                  f"{EXIT_PREEMPTED} so the job can be requeued and resumed with --resume", flush=True)
                    return EXIT_PREEMPTED
        finally:
            bar.close()
        if self.save_enabled and self.saved_step != self.step:
            self.save()
            self.saved_step = self.step
        if self.save_enabled:
            self._plot()
        return 0

    def _add_to_curve(self, rec: dict) -> None:
        curve = getattr(self, "_curve", None)
        if curve is not None and isinstance(rec.get("step"), int):
            for points, key in zip(curve, ("loss", "val_loss")):
                if isinstance(rec.get(key), (int, float)):
                    points.append((rec["step"], rec[key]))

    def _plot(self) -> None:
        """<out>/loss.png (rank 0): at each evaluation and at the end of a run."""
        if self.is_rank0:
            self.loss_png = write_loss_plot(*self._curve, os.path.join(self.out, "loss.png"))

    def _add_bits_per_dim(self, rec: dict) -> None:
        """Bits per dim, the iGPT paper's unit: the mean negative log-likelihood of a token (one pixel's colour
        cluster out of 512) in bits, i.e. the loss in nats per token / ln 2. (A 9-bit palette token is one "dim";
        this is not bits per RGB subpixel.) Added for the metrics the task names (LMTask: loss, val_loss)."""
        for key, bpd_key in getattr(self.task, "bits_per_dim", {}).items():
            if rec.get(key) is not None:
                rec[bpd_key] = rec[key] / math.log(2)

    def _remember(self, rec: dict) -> None:
        """What the end-of-run summary reports: the last train loss and the best validation loss, and a warning
        when validation loss has risen three evaluations in a row while training goes on (overfitting)."""
        s = self.summary
        s["last_step"], s["last_loss"], s["last"] = rec["step"], rec["loss"], rec
        if rec.get("grad_norm", 0) is None and self.grad_norm_note and self.is_rank0 and not s.get("norm_told"):
            s["norm_told"] = True
            print(f"megapix: grad_norm is null in metrics.jsonl: {self.grad_norm_note}", flush=True)
        val = rec.get("val_loss")
        if val is None:
            return
        vals = s.setdefault("val_losses", [])
        vals.append(val)
        if s.get("best_val_loss") is None or val < s["best_val_loss"]:
            s["best_val_loss"], s["best_val_step"] = val, rec["step"]
        if len(vals) >= 4 and vals[-1] > vals[-2] > vals[-3] > vals[-4] and self.is_rank0 and not s.get("warned"):
            s["warned"] = True
            print(f"megapix: warning: val_loss has risen for 3 evaluations ({vals[-4]:.4f} -> {vals[-1]:.4f}; best "
                  f"{s['best_val_loss']:.4f} at step {s['best_val_step']}): the model is overfitting this data; "
                  "fewer --max-steps or more data", flush=True)

    def _monitor(self, rec: dict) -> None:
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and mon.enabled and self.is_rank0:
            mon.write_events([(f"megapix/{k}", v, self.step) for k, v in rec.items()
                              if isinstance(v, (int, float)) and k != "step"])

    # ---- the weights, whole ----
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The module's parameters under their canonical names (ImageGPT's, plus a task's own such as clf.*),
        fp32 on CPU, whole: ZeRO-3 partitions gathered, TP shards merged, pipeline stages joined. Collective:
        every rank calls it; rank 0 gets the dict, the others None."""
        import deepspeed

        from megapix.checkpoint.names import canonical_name
        from megapix.parallel.tensor import merge_shards

        lay, module = self.layout, self.engine.module
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()))
                  if lay.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            local = {canonical_name(n, self.is_pipeline, self.cfg.model.n_layer): p.detach().float().cpu().clone()
                     for n, p in module.named_parameters()}
        if lay.world == 1:
            return local
        parts = [None] * lay.world if self.is_rank0 else None
        dist.gather_object((lay.dp_rank, lay.tp_rank, local if lay.dp_rank == 0 else {}), parts, dst=0)
        if not self.is_rank0:
            return None
        shards: dict[str, dict[int, torch.Tensor]] = {}
        for dp_rank, tp_rank, sd in parts:
            for name, v in sd.items():
                shards.setdefault(name, {})[tp_rank] = v
        return {name: merge_shards(name, [by[r] for r in sorted(by)]) for name, by in shards.items()}

    def write_samples(self, n: int = 8) -> str | None:
        """<out>/samples.png: completions of held-out images and unconditional samples (AR models), from a
        consolidated copy of the weights on rank 0, so every layout writes them and no rank waits in a
        collective while rank 0 samples. Returns the path (rank 0), or None with a line saying why not."""
        if self.cfg.model.objective != "ar" or self.palette is None:
            if self.is_rank0:
                why = "BERT models do not generate" if self.cfg.model.objective != "ar" else "token data has no palette"
                print(f"megapix: no samples.png ({why})", flush=True)
            return None
        state = self.full_state_dict()
        if not self.is_rank0:
            return None
        from megapix.model import ImageGPT
        from megapix.sample import completion_grid, save_png

        with torch.device("meta"):
            model = ImageGPT(self.cfg.model)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True, strict=True)
        model = model.to(self.device).eval()
        test = self.splits["test"]
        held = test.tokens(np.arange(min(n, len(test)))).to(self.device)
        path = os.path.join(self.out, "samples.png")
        save_png(completion_grid(model, self.palette, held, seed=self.cfg.train.seed), path, run_folder=True)
        return path
