"""The training loop: build the DeepSpeed engine for a layout and a task, then steps, evaluation and early
stopping, with the run's checkpoints and log as components the loop calls.

DeepSpeed owns the optimizer wrapping (ZeRO), the pipeline schedule, gradient accumulation, checkpoint files and
the monitor (TensorBoard/CSV); this module decides the batch geometry, feeds the task's batches and measures each
step (loss and bits/dim, lr, gradient norm, tokens/s, TFLOP/s, MFU, peak memory). What is saved when and what a
resume restores is megapix.checkpoint.manager.CheckpointManager; metrics.jsonl, loss.png, the progress line and
the summary are megapix.runlog.RunLog; what a non-finite or spiking step does (stop, roll back), and the ranks'
time spread, is megapix.divergence.StepGuard. What is trained (the module, its loss, its evaluation) is a task
(megapix/tasks.py): pre-training and fine-tuning run this same loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from megapix.checkpoint.manager import CheckpointManager, NonFiniteWeights
from megapix.checkpoint.names import canonical_name
from megapix.checkpoint.schedule import Schedule, continuation, default_decay, default_warmup
from megapix.config import Config, ConfigError
from megapix.data import load_splits
from megapix.data.loader import GlobalBatches
from megapix.divergence import NonFiniteStep, StepGuard, batch_index
from megapix.dsconfig import make_ds_config, resolve, zero_stage_of
from megapix.errors import EXIT_REQUEUE
from megapix.parallel import dist as pdist
from megapix.parallel import watchdog
from megapix.parallel.layout import build_layout
from megapix.parallel.tensor import merge_shards
from megapix.plan.comms import CommsProfile, planned_bytes
from megapix.plan.devices import device_for
from megapix.runlog import RunLog, StopRequest, cached_matmul_tflops, peak_memory
from megapix.tasks import LMTask
from megapix import tracking

EXIT_PREEMPTED = EXIT_REQUEUE  # checkpoint saved, requeue me


def device_peak_tflops(override: float | None, device="cuda", dtype: torch.dtype = torch.bfloat16
                       ) -> tuple[float | None, str]:
    """(peak TFLOP/s per rank that MFU divides by, where it comes from; or None and why there is no MFU).
    --peak-tflops wins; a GPU is looked up in megapix.plan.devices; a CPU rank is measured (rank 0 runs a ~1 s matmul
    probe in the training dtype once per machine, kept in runlog.peak_cache_file(); every rank uses its result): MFU
    on CPU is an estimate against what this machine reaches on a large matmul, not a datasheet number."""
    if override:
        return override, "--peak-tflops"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        dev = device_for(name)
        if dev is None:
            return None, f"no peak TFLOP/s known for {name!r}: pass --peak-tflops for MFU"
        return dev.peak_tflops, f"{name} dense bf16 datasheet peak"
    peak, kept = pdist.from_rank0(cached_matmul_tflops(dtype) if pdist.is_rank0() else None)
    kind = str(dtype).removeprefix("torch.")
    return peak, f"measured {kind} matmul peak of this CPU, an estimate kept in {kept}"


def adamw(params, **kw) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over all tensors) on CUDA and on CPU, where the small preset's update took
    45 ms against foreach's 254 ms on this 2-core machine under load (benchmarks/bench_compile.py --optimizer);
    foreach where fused cannot run (other devices)."""
    devices = {p.device.type for p in params}
    fused = devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(params, **kw, **({"fused": True} if fused else {"foreach": True}))

class Trainer:
    """One training run, built in order: config and layout, checkpoints (checked before --out is written), task
    data, batch geometry, module, DeepSpeed engine, run log. `task` defaults to pre-training (LMTask on the data
    of cfg.data). `run_log` lets several runs share one metrics file (a sweep); `checkpoints=False` writes no
    checkpoints (a sweep's runs, a benchmark)."""

    def __init__(self, cfg: Config, ds_config_path: str | None = None, task=None, run_log: RunLog | None = None,
                 resume: bool = False, checkpoints: bool = True, resume_tag: str | None = None,
                 reset_optimizer: bool = False):
        self._resolve(cfg, ds_config_path)
        self.checkpoints = CheckpointManager(self.out, self.shown_out, self.cfg, self.layout, resume=resume,
                                             enabled=checkpoints, resume_tag=resume_tag,
                                             reset_optimizer=reset_optimizer)
        self.task = task if task is not None else self._pretraining_task()
        self._batch_geometry()
        module = self._build_module()
        self.engine = self._build_engine(module)
        self.device = self.engine.device
        self.peak_tflops, self.peak_source = device_peak_tflops(
            self.cfg.train.peak_tflops, self.device,
            torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32)
        self.owns_log = run_log is None
        self.log = RunLog(self.out, self.is_rank0) if run_log is None else run_log
        self.guard = StepGuard(self.cfg.train.on_nonfinite, self.cfg.train.spike_factor, self.layout.rank,
                               self.layout.world, self.device)
        self.step, self.batch, self.busy_s = 0, 0, 0.0  # the step, its global-batch index, this rank's busy time
        self.probe = None  # a callable run at the steps its due(step) names (megapix.trainprobe: --probe-every)

    # ---- construction, in order ----
    def _resolve(self, cfg: Config, ds_config_path: str | None) -> None:
        """The DeepSpeed JSON's settings taken in (conflicts refused) and this rank's place in the layout."""
        world, rank = pdist.world_size(), pdist.rank()
        self.is_rank0 = rank == 0
        self.cfg, self.ds_base = resolve(cfg, ds_config_path, world)
        self.layout = build_layout(world, rank, self.cfg.model, self.cfg.train, zero_stage_of(self.cfg, self.ds_base))
        self.out, self.shown_out = os.path.abspath(self.cfg.train.out), self.cfg.train.out

    def _pretraining_task(self) -> LMTask:
        """LMTask on cfg.data. A data error leaves no empty --out behind (only the folders this run made)."""
        made = []  # the folders this run creates for --out, innermost first
        path = self.out
        while not os.path.exists(path):
            made.append(path)
            path = os.path.dirname(path)
        os.makedirs(self.out, exist_ok=True)
        try:
            return LMTask(*load_splits(self.cfg, self.out))
        except ConfigError:
            if self.is_rank0:
                with contextlib.suppress(OSError):
                    for folder in made:
                        os.rmdir(folder)  # fails, and stops, at the first one that is not empty
            raise

    def _batch_geometry(self) -> None:
        """The global-batch schedule, the micro-batch and the warm-up (default: one epoch, at most 10% of the run)."""
        t = self.cfg.train
        self.palette = getattr(self.task, "palette", None)
        self.splits = getattr(self.task, "splits", None)
        self.schedule = GlobalBatches(self.task.train_size, t.global_batch, t.seed)
        self.micro_batch = t.micro_batch or t.global_batch // self.layout.dp
        self.lr_schedule = self._lr_schedule(t.max_steps)
        self.checkpoints.lr_schedule = self.lr_schedule  # every restore applies it (checkpoint.schedule)

    def _lr_schedule(self, max_steps: int) -> Schedule:
        """The schedule of this run's settings ending at `max_steps` (defaults: warm-up and decay follow it)."""
        t = self.cfg.train
        warmup = t.warmup_steps if t.warmup_steps is not None else default_warmup(
            self.schedule.steps_per_epoch(), max_steps)
        decay = (t.decay_steps or default_decay(max_steps)) if t.schedule == "wsd" else 0
        return Schedule(t.lr, warmup, max_steps, t.schedule, decay)

    def continuation(self, max_steps: int) -> tuple[str, str]:
        """What continuing this run to `max_steps` (the same settings) does to the lr, in words, and the flags
        the continue command resumes with (a WSD run: its stable-phase checkpoint's tag, when kept)."""
        stable = self.checkpoints.stable_tag()
        return continuation(self.lr_schedule, self.step, self._lr_schedule(max_steps), stable)

    def _build_module(self):
        """The DeepSpeed config before the module (under ZeRO-3, construction partitions with it), then the
        task's module for this layout."""
        self.ds_config = make_ds_config(self.cfg, self.ds_base, self.layout, self.micro_batch)
        self.layout.ds_config = self.ds_config
        module, self.is_pipeline = self.task.build(self.cfg, self.layout)
        self.task.setup(self)
        return module

    def _build_engine(self, module):
        """AdamW with linear warm-up then cosine decay to 0 (the paper), wrapped by deepspeed.initialize."""
        t = self.cfg.train
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)

        mpu = self.layout.grid if (self.layout.tp > 1 and not self.is_pipeline) else None
        if self.is_rank0:  # the W&B run's id, name and folder, before DeepSpeed's monitor starts it
            tracking.prepare(self.cfg, self.ds_config, self.checkpoints.resume_tag is not None)
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self.ds_config, mpu=mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.lr_schedule.factor))
        self.grad_norm_note = None  # why grad_norm is null, once known
        self._local_grad_norm = None
        if self.layout.zero_stage == 0 and not self.ds_config["bf16"]["enabled"]:
            self._measure_grad_norm_at_step(engine, optimizer, params)
        return engine

    def _measure_grad_norm_at_step(self, engine, optimizer, params) -> None:
        """ZeRO-0 in fp32: DeepSpeed steps torch's AdamW itself and keeps no norm (get_global_grad_norm() is
        None); it is computed just before that step (and before DeepSpeed clips them), when DeepSpeed has
        all-reduced the gradients."""
        def before_step(opt, args, kwargs):
            if self._local_grad_norm is None:  # not measured yet by the clipping below
                self._measure_grad_norm(params)

        optimizer.register_step_pre_hook(before_step)
        clip = engine.clip_fp32_gradients

        def measured_clip():
            self._measure_grad_norm(params)
            return clip()

        engine.clip_fp32_gradients = measured_clip

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
        """One global batch; returns the task's metrics for it (token-weighted over every rank). Adds this rank's
        forward time to self.busy_s (the straggler measure: data-parallel forwards wait on no peer, backwards
        all-reduce; a pipeline's stages wait on each other, there it is the whole step)."""
        task = self.task
        task.meter.reset()
        self._local_grad_norm = None
        compiled_before = self._compile_clock()
        if self.is_pipeline:
            t0 = time.perf_counter()
            self.engine.train_batch(data_iter=iter([self._to_device(task.pipe_batch(b)) for b in micro]))
            self.busy_s += time.perf_counter() - t0
        else:
            for b in micro:
                t0 = time.perf_counter()
                loss = task.forward(self.engine, self._to_device(b))
                self.busy_s += time.perf_counter() - t0
                self.engine.backward(loss)
                self.engine.step()
        self._step_compile_s = self._compile_clock() - compiled_before
        return task.meter.reduce(self.device)

    def _to_device(self, obj):
        if isinstance(obj, (tuple, list)):
            return type(obj)(self._to_device(x) for x in obj)
        return obj.to(self.device) if isinstance(obj, torch.Tensor) else obj

    def _next_batches(self):
        """This rank's micro-batches of the next step. A data error on any rank (a corrupt image) is shared with
        every rank before anyone enters a collective: all save the last completed step, then all raise it."""
        error, micro = None, None
        t0 = time.perf_counter()
        try:
            self.guard.slow_down()
            micro = self.task.train_batches(self.batch)
        except ConfigError as e:
            error = e
        self.busy_s = time.perf_counter() - t0  # this rank's own fetch, before the shared error check waits
        error = pdist.shared_error(error)
        if error is not None:
            if self.checkpoints.save_before_error(self.engine, self.step):
                error = ConfigError(f"{error} (step {self.step} was saved first: fix the data, then --resume)")
            raise error
        return micro

    def _step_record(self, stats: dict, lr: float, seconds: float, extra: dict | None) -> dict:
        """The metrics.jsonl record of the step just taken: the task's metrics, lr, gradient norm, throughput,
        TFLOP/s and MFU, peak memory."""
        tokens = self.cfg.train.global_batch * self.cfg.model.n_ctx
        compiling = self._compile_time()
        seconds = max(seconds - compiling, 1e-9)  # a step's compilation is reported apart, not as slow training
        mem_key, mem = peak_memory(torch.device(self.device))
        tflops = tokens * self.cfg.model.flops_per_token() / seconds / self.layout.world / 1e12
        rec = {**(extra or {}), "step": self.step, **stats, "lr": lr, "grad_norm": self.grad_norm(),
               "tokens_per_s": tokens / seconds, "tflops_per_device": tflops,
               "mfu": tflops / self.peak_tflops if self.peak_tflops else None, mem_key: mem, "step_time_s": seconds,
               **({"compile_s": compiling} if compiling else {})}
        if rec["grad_norm"] is None and self.grad_norm_note:
            self.log.note_once("grad_norm", f"grad_norm is null in metrics.jsonl: {self.grad_norm_note}")
        return rec

    def _compile_clock(self) -> float:
        """Seconds this process has spent in torch.compile so far (0 without --compile)."""
        if self.cfg.train.compile == "off":
            return 0.0
        from megapix.model.compile import compile_seconds

        return compile_seconds()

    def _compile_time(self) -> float:
        """Seconds the step just taken spent compiling; said once, the first time."""
        spent = getattr(self, "_step_compile_s", 0.0)
        if spent > 0 and self.is_rank0 and not getattr(self, "_compile_said", False):
            self._compile_said = True
            print(f"megapix: --compile: {spent:.1f} s compiling the blocks in step {self.step} (not counted in its "
                  "tokens/s and MFU; metrics.jsonl: compile_s)", flush=True)
        return spent

    def _add_bits_per_dim(self, rec: dict) -> None:
        """Bits per dim, the iGPT paper's unit: the mean negative log-likelihood of a token (one pixel's colour
        cluster out of 512) in bits, i.e. the loss in nats per token / ln 2. (A 9-bit palette token is one "dim";
        this is not bits per RGB subpixel.) Added for the metrics the task names (LMTask: loss, val_loss)."""
        for key, bpd_key in getattr(self.task, "bits_per_dim", {}).items():
            if rec.get(key) is not None:
                rec[bpd_key] = rec[key] / math.log(2)

    # ---- evaluation ----
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

    # ---- the loop ----
    def fit(self, patience: int | None = None, on_best=None, extra: dict | None = None,
            desc: str = "train") -> int:
        """Train to max_steps; evaluate every eval_every steps and at the end. Returns 0, or EXIT_PREEMPTED after
        saving on a signal or the time budget.

        Every evaluation's metrics go through task.score (higher is better): `on_best(trainer, record)` runs on
        each new best (before the record is logged: it may add to it), and `patience` evaluations without a new
        best stop the run early (self.stopped_early). The step time (tokens/s, MFU) counts fetching the batches
        and the step, not evaluation, checkpoints or logging."""
        t = self.cfg.train
        self.step = self.checkpoints.restore(self.engine, self.is_pipeline, self.log if self.owns_log else None)
        stop = StopRequest(t.time_budget)
        self.best_score, self.best_step, self.stopped_early, self.evals_since_best = None, 0, False, 0
        self.log.begin(desc, t.max_steps, self.step, t.log_every, getattr(self.engine, "monitor", None))
        profile = CommsProfile(t.profile_comms, self.step) if t.profile_comms else None  # a diagnostic, default off
        try:
            while True:
                try:  # a bad step (non-finite loss or gradient norm, a spike, non-finite weights at a save)
                    if self.step >= t.max_steps or self.stopped_early:
                        self.checkpoints.finish(self.engine, self.step)
                        break
                    watchdog.step_begins(self.step + 1)
                    lr, start = self.engine.get_lr()[0], time.perf_counter()
                    self.batch = batch_index(self.step, self.checkpoints.skipped_batches)
                    micro = self._next_batches()
                    with profile.step(self.step + 1) if profile is not None else contextlib.nullcontext():
                        stats = self.train_step(micro)
                    spread = self.guard.check(self.step + 1, self.batch, stats["loss"], self.grad_norm(),
                                              self.busy_s, [v for _, v in self.log.curve[0]])
                    self.step += 1
                    rec = {**self._step_record(stats, lr, time.perf_counter() - start, extra), **spread,
                           "global_batch_index": self.batch, **self.guard.take_events(self.step)}
                    probed = self.probe is not None and self.probe.due(self.step)
                    if probed:
                        rec.update(self.probe(self))
                    metrics, score = self._evaluate_at_step(rec, on_best)
                    self._add_bits_per_dim(rec)
                    self.log.record(rec)
                    stopping = self.step < t.max_steps and stop.should_stop()
                    self.checkpoints.after_step(self.engine, self.step, metrics, score, stopping=stopping)
                    if metrics is not None or probed:
                        self.log.plot()
                    if metrics is not None and patience and self.evals_since_best >= patience:
                        self.stopped_early = True
                    if profile is not None and profile.complete:
                        self._write_comms_profile(profile)
                        profile = None
                    if stopping and not self.stopped_early:
                        return self._stopped_by_request()
                except (NonFiniteStep, NonFiniteWeights) as bad:
                    self.step = self.guard.recover(self, bad)  # the step rolled back to; or NonFiniteStop
            if profile is not None:  # the run ended before the profiled steps did: what was recorded
                self._write_comms_profile(profile)
        finally:
            self.log.end()
        self.log.plot()
        return 0

    def _evaluate_at_step(self, rec: dict, on_best) -> tuple[dict | None, float | None]:
        """At an evaluation step (every eval_every and the last): the task's metrics into `rec`, the best score
        tracked (on_best called on a new one); (metrics, score), or (None, None) at other steps."""
        t = self.cfg.train
        if not (t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps)):
            return None, None
        metrics = self.evaluate()
        rec.update(metrics)
        score = self.task.score(metrics)
        if score is not None and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_step, self.evals_since_best = score, self.step, 0
            if on_best is not None:
                on_best(self, rec)
        else:
            self.evals_since_best += 1
        return metrics, score

    def _write_comms_profile(self, profile: CommsProfile) -> None:
        """<out>/comms_profile.json (collective: every rank calls it at the same step)."""
        planned, notes = planned_bytes(self.cfg, self.layout, self.micro_batch, self.ds_config)
        if len(profile.steps) < profile.wanted:
            notes = [f"--profile-comms {profile.wanted} asked for {profile.wanted} step(s) from step {profile.first}"
                     f"; the run recorded {len(profile.steps)}", *notes]
        profile.write(self.out, self.layout, planned, notes)

    def _stopped_by_request(self) -> int:
        self.log.plot()
        if self.checkpoints.enabled and self.is_rank0:
            print(f"stop requested: saved step {self.step} to {self.checkpoints.ckpt_dir}; exiting {EXIT_PREEMPTED} "
                  "so the job can be requeued and resumed with --resume", flush=True)
        return EXIT_PREEMPTED

    # ---- the weights, whole ----
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The module's parameters under their canonical names (ImageGPT's, plus a task's own such as clf.*),
        fp32 on CPU, whole: ZeRO-3 partitions gathered, TP shards merged, pipeline stages joined. Collective:
        every rank calls it; rank 0 gets the dict, the others None."""
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
        for _dp_rank, tp_rank, sd in parts:
            for name, v in sd.items():
                shards.setdefault(name, {})[tp_rank] = v
        return {name: merge_shards(name, [by[r] for r in sorted(by)]) for name, by in shards.items()}
