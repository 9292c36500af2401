"""The run's checkpoint policy in one place: what is saved when, and what a resume restores.

The training loop calls `after_step` once per step and `finish` once at the end (torchtitan's
`checkpointer.save(step, last_step)`); the mechanics (staged tags, `latest`, allow-listed loading, any-layout
resume, keep-last pruning, best.json) stay in store.py.

Saved, never twice at one step:
- every `save_every` steps (not at max_steps: the end saves then);
- on a new best validation score (`save_best`; the task's score, higher is better), named in best.json;
- when the run stops early: a stop request (preemption signal, time budget), a data error (`save_before_error`);
- at the end of the run.
Each save prunes to `keep_last` tags (store.prune, which keeps `latest`'s and best.json's tags).

A resume (`restore`) brings back: the latest complete tag (weights, optimizer, schedule, in any layout:
store.resume), the best record of the steps up to it (best.json; a best from later steps no longer counts), and
the run log cut to that step (metrics.jsonl, the loss curve: RunLog.continue_from).

Rolling back to the last good checkpoint (megapix.divergence, --on-nonfinite rollback) is
`restore(engine, is_pipeline, log, tag=manager.latest_tag)`, the tag this manager last saved or resumed. The
global batches a rollback skipped are saved with every checkpoint (skipped_batches.json in the tag) and come back
with it, so a resumed run draws the same batches as the run that never stopped.

Non-finite weights are never saved: `save` checks every rank's parameters first (one all-reduce) and raises
NonFiniteWeights instead, so neither `latest` nor best.json can name them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist

from megapix.checkpoint import deleter, store
from megapix.checkpoint.reshard import how_to_resume
from megapix.checkpoint.tags import TAG, latest_step, read_latest, resume_hint, tag_for
from megapix.config import Config, ConfigError, check_record_config
from megapix.parallel import dist, watchdog
from megapix.parallel.layout import Layout
from megapix.runfolder import disk_error
from megapix.utils import read_metrics, read_record

SKIPPED_BATCHES = "skipped_batches.json"  # in a tag: the global batches the run skipped up to that step


class NonFiniteWeights(Exception):
    """The weights about to be saved are not finite; nothing was saved."""

    def __init__(self, step: int, tensors: int):
        super().__init__(f"non-finite weights ({tensors} tensors on some rank) after step {step}")
        self.step, self.tensors = step, tensors


def nonfinite_tensors(engine) -> int:
    """Collective: how many parameter tensors hold a NaN or inf, on the rank with the most (each rank checks its
    own: its ZeRO-3 partition, TP shard or pipeline stage)."""
    # each tensor's min and max, not isfinite(): NaN propagates through both and an inf is one of them, in one
    # vectorised pass with no mask the size of the weights (0.03 s against 0.76 s for 404M fp32 weights)
    ends = [torch.stack(torch.aminmax(t.detach().reshape(-1))) for t in
            (getattr(p, "ds_tensor", p) for p in engine.module.parameters()) if t.numel()]
    bad = int((~torch.isfinite(torch.stack(ends))).any(dim=1).sum()) if ends else 0
    if dist.world_size() == 1:
        return bad
    flag = torch.tensor([float(bad)], device=engine.device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return int(flag.item())


def existing_run_step(out: str) -> int | None:
    """The step of a run already in `out` (from checkpoints/latest, else the newest global_step* folder, else
    the last metrics.jsonl record), or None when `out` holds no run."""
    step = latest_step(os.path.join(out, "checkpoints"))
    if step is not None:
        return step
    path = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        try:
            recs = read_metrics(path)
        except ConfigError:
            recs = []
        return int(recs[-1].get("step", 0)) if recs else 0
    return None


def refuse_existing_run(out: str, shown: str) -> None:
    """Training into a folder that holds a run without --resume would cut its metrics and overwrite its
    checkpoints: refuse, naming both ways out."""
    step = existing_run_step(out)
    if step is not None:
        raise ConfigError(f"{shown} already holds a run at step {step}: pass --resume to continue, or choose "
                          "another --out")


class CheckpointManager:
    """The checkpoints of one run in <out>/checkpoints. Built before anything is written into --out: with
    `resume`, the checkpoint to continue is checked (complete, nothing but allowed types, the same model) now,
    not after the data is loaded; without it, a run already in --out is refused. `enabled=False` (a sweep's
    runs, a benchmark) writes and restores nothing."""

    def __init__(self, out: str, shown_out: str, cfg: Config, layout: Layout, resume: bool = False,
                 enabled: bool = True, resume_tag: str | None = None, reset_optimizer: bool = False):
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.cfg, self.layout, self.enabled = cfg, layout, enabled
        self.saved_step: int | None = None  # the step this process last saved or resumed
        self.best: dict | None = None  # best.json's record: the checkpoint of the best validation score so far
        self.resume_tag = None
        self.skipped_batches: list[int] = []  # global batches skipped by rollbacks, in checkpoints from now on
        self.lr_schedule = None  # the current settings' Schedule (the trainer's): every restore applies it
        self.reset_optimizer = reset_optimizer  # --reset-optimizer: a layout change may restart the Adam moments
        self.moments_restarted: str | None = None  # the summary's note when a restore restarted them
        self.async_save = cfg.train.async_save
        self.pending = None  # --async-save: (step, records, spare, WriteJob) being written in the background
        if enabled:
            if resume:
                self.resume_tag = store.resumable_tag(self.ckpt_dir, cfg, resume_tag)
                if self.resume_tag is not None:  # refused now, before anything is written
                    dist.rank0_decides(lambda: self._read_skipped(self.resume_tag))
                    dist.rank0_decides(lambda: how_to_resume(self.ckpt_dir, self.resume_tag, layout, reset_optimizer))
            else:
                refuse_existing_run(out, shown_out)
            dist.barrier()

    @property
    def latest_tag(self) -> str | None:
        return None if self.saved_step is None else tag_for(self.saved_step)

    def _stable_step(self) -> int | None:
        """A WSD run's last stable-phase step (the checkpoint a longer run continues from), else None."""
        return None if self.lr_schedule is None else self.lr_schedule.decay_start

    def stable_tag(self) -> str | None:
        """The tag of the WSD stable-phase checkpoint when it is on disk, else None."""
        step = self._stable_step()
        if not self.enabled or step is None or step <= 0:
            return None
        tag = tag_for(step)
        return tag if os.path.isdir(os.path.join(self.ckpt_dir, tag)) else None

    # ---- resume ----
    def restore(self, engine, is_pipeline: bool, log=None, tag: str | None = None) -> int:
        """Load `tag` (default: the one checked at construction) into `engine` and return its step; 0 when there
        is nothing to resume. The best record of the steps up to it is kept, and `log` (the run's RunLog, None
        for a shared one) continues from that step: records after it are dropped, the loss curve reloaded."""
        if self.enabled:
            self.wait(engine)  # a rollback goes to a published tag
        tag = tag or self.resume_tag
        step = None
        if self.enabled and tag is not None:
            step = store.resume(engine, self.ckpt_dir, self.cfg, self.layout, is_pipeline, tag=tag,
                                reset_optimizer=self.reset_optimizer)
            if how_to_resume(self.ckpt_dir, tag, self.layout, self.reset_optimizer)[0] == "reshard":
                self.moments_restarted = f"--reset-optimizer: the Adam moments restarted at step {step} ({tag} was " \
                                         "written in a layout they cannot be carried from)"
            elif self.reset_optimizer and self.saved_step is None and dist.is_rank0():  # the resume, not a rollback
                print("megapix: --reset-optimizer not used: this resume carries the Adam moments", flush=True)
            self.saved_step = step
            changed = self.lr_schedule.apply(engine, step) if self.lr_schedule is not None else None
            if changed and dist.is_rank0():
                print(f"megapix: resumed {tag}: {changed}", flush=True)
            if dist.is_rank0() and tag != read_latest(self.ckpt_dir):  # --resume-tag: this branch is the run now
                store.point_latest(self.ckpt_dir, tag)
                print(f"megapix: --resume-tag: {os.path.join(self.ckpt_dir, 'latest')} names {tag} now (later tags "
                      "are kept until pruned; metrics.jsonl goes on from this step)", flush=True)
            self.skipped_batches = dist.from_rank0(self._read_skipped(tag) if dist.is_rank0() else None)
        if step is not None:  # the best of the steps before the resumed one stays the one to beat
            best = dist.from_rank0(store.read_best(self.ckpt_dir) if dist.is_rank0() else None)
            self.best = best if best and best.get("step", 1 << 62) <= step else None
        if log is not None and self.enabled:
            log.continue_from(step)
        return step or 0

    def _read_skipped(self, tag: str) -> list[int]:
        path = os.path.join(self.ckpt_dir, tag, SKIPPED_BATCHES)
        if not os.path.isfile(path):  # saved before any rollback, or by an older megapix
            return []
        batches = read_record(path).get("batches")
        if not isinstance(batches, list):
            raise ConfigError(f"{path}: field 'batches' is not a list of global-batch indices; the checkpoint is "
                              f"damaged: {resume_hint(self.ckpt_dir, tag)}")
        bad = next((b for b in batches if isinstance(b, bool) or not isinstance(b, int) or b < 0), None)
        if bad is not None or len(set(batches)) != len(batches):
            what = f"holds {bad!r}" if bad is not None else "repeats an index"
            raise ConfigError(f"{path}: field 'batches' {what}, not a list of distinct global-batch indices >= 0; "
                              f"the checkpoint is damaged: {resume_hint(self.ckpt_dir, tag)}")
        return sorted(batches)

    # ---- saving ----
    @watchdog.protected  # a SIGTERM while blocked never cuts a save short
    def save(self, engine, step: int) -> None:
        """A checkpoint of this step (store.save: staged, renamed, `latest` moves last, then pruned), with the
        global batches skipped so far. Raises NonFiniteWeights, saving nothing, when any weight is NaN or inf.
        With --async-save the files are written in the background (after the previous save is published) and
        published at a later step boundary (poll) or wait()."""
        bad = nonfinite_tensors(engine)
        if bad:
            raise NonFiniteWeights(step, bad)
        self.wait(engine)
        stable = self._stable_step()
        records = {SKIPPED_BATCHES: {"batches": list(self.skipped_batches)}}
        spare = (tag_for(stable),) if stable else ()
        if not self.async_save:
            store.save(engine, self.ckpt_dir, step, self.cfg, self.layout, records=records, spare=spare)
        else:
            from megapix.checkpoint import async_save  # imports deepspeed: not at `--help` time

            writer = async_save.install(engine)
            if store.write_files(engine, self.ckpt_dir, step, self.cfg) is not None:
                self.pending = (step, records, spare, writer.take_job())
        self.saved_step = step

    def poll(self, engine) -> None:
        """At a step boundary: publish the background save once every rank's files are written (one small
        all-reduce while one is pending); a failed write stops the run here (ConfigError, exit 2)."""
        if self.pending is not None:
            self._settle(engine, block=False)

    @watchdog.protected
    def wait(self, engine) -> None:
        """Wait for the background save, if any, and publish it (or raise its failure). Collective."""
        if self.pending is not None:
            self._settle(engine, block=True)

    def _settle(self, engine, block: bool) -> None:
        step, records, spare, job = self.pending
        if block:
            job.wait()
        done, failed = job.done(), job.error is not None
        if dist.world_size() > 1:  # every rank's files, or nobody publishes
            flags = torch.tensor([float(not done), float(failed)], device=engine.device)
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
            done, failed = flags[0].item() == 0, flags[1].item() > 0
        if failed:
            job.wait()
            self.pending = None
            error = None if job.error is None else (disk_error(job.error, self.ckpt_dir) or
                                                    ConfigError(f"{type(job.error).__name__}: {job.error}"))
            first = dist.shared_error(error)
            store.discard(self.ckpt_dir, step)
            raise ConfigError(f"{first}; the background checkpoint write of step {step} failed, so it was not saved "
                              f"({self._previous()}): resume with --resume once the disk is fixed")
        if not done:
            return
        self.pending = None
        store.publish(self.ckpt_dir, step, self.cfg, self.layout, records, spare)
        if dist.is_rank0():
            print(f"megapix: saved {tag_for(step)} (step {step}): {job.bytes_written / 1e6:.1f} MB on rank 0 "
                  f"written in the background in {job.seconds:.1f} s", flush=True)

    def _previous(self) -> str:
        tag = dist.from_rank0(read_latest(self.ckpt_dir) if dist.is_rank0() else None)
        return f"`latest` still names {tag}" if tag else "no earlier checkpoint"

    def after_step(self, engine, step: int, metrics: dict | None = None, score: float | None = None,
                   stopping: bool = False) -> None:
        """The loop's call after each step: `metrics` and `score` when it evaluated (a new best is saved and named
        in best.json), `stopping` when the run stops here (saved, and the save waited for, so that --resume
        continues from it)."""
        if not self.enabled:
            return
        self.poll(engine)
        t = self.cfg.train
        if metrics is not None and t.save_best:
            self._save_if_best(engine, step, metrics, score)
        periodic = t.save_every and step % t.save_every == 0 and step < t.max_steps
        stable = step == self._stable_step()  # WSD: the checkpoint a longer run continues from, always saved
        if (periodic or stopping or stable) and self.saved_step != step:
            self.save(engine, step)
        if stopping:
            self.wait(engine)

    def finish(self, engine, step: int) -> None:
        """The end of the run: its last step saved (once), every background write and deletion waited for."""
        if self.enabled and self.saved_step != step:
            self.save(engine, step)
        if self.enabled:
            self.wait(engine)
            deleter.wait()

    def save_before_error(self, engine, step: int) -> bool:
        """Save the last completed step before the run raises (a data error every rank shares); True when saved."""
        if self.enabled and step > 0 and self.saved_step != step:
            self.save(engine, step)
            self.wait(engine)
            return True
        if self.enabled:
            self.wait(engine)
        return False

    def _save_if_best(self, engine, step: int, metrics: dict, score: float | None) -> None:
        """A new best score saves this step's checkpoint (if not saved already) and names it in best.json.
        Collective: rank 0's decision is every rank's."""
        best = self.best
        if not dist.from_rank0(score is not None and (best is None or score > best["score"])):
            return
        if self.saved_step != step:
            self.save(engine, step)
        self.wait(engine)  # best.json names only a published tag
        tag = tag_for(step)
        self.best = {"tag": tag, "step": step, "score": score, **metrics}
        if dist.is_rank0():
            store.write_best(self.ckpt_dir, tag, step, metrics, score)
            stable = self._stable_step()  # the previous best is an ordinary tag now
            store.prune(self.ckpt_dir, self.cfg.train.keep_last, step, (tag_for(stable),) if stable else ())
        dist.barrier()


# ---- the config a resume continues with ----
RUN_RECORD = "config.json"  # <out>/config.json: the run's effective config (dsconfig.run_record), rewritten each start

# Settings a resume may change without an error: they steer the run from the resumed step on (where it ends and by
# which schedule, when it saves, evaluates and prints, how it is laid out (TP, PP, CP, SP, ZeRO) and computed, how
# long a collective may wait), while the curve up to that step stays the saved run's. Every other setting (model,
# data, batch, optimiser, seed, warm-up, peak lr, precision) defines the curve: a resume that changes one is refused
# unless --allow-changed.
STEER_FIELDS = {
    "model": ("kernels",),
    "data": ("num_workers",),
    "train": ("max_steps", "save_every", "async_save", "time_budget", "keep_last", "save_best", "eval_every",
              "log_every", "report_to", "wandb_project", "wandb_entity", "wandb_name", "wandb_group", "peak_tflops",
              "tensor_parallel", "pipeline_parallel", "zero_stage", "micro_batch", "activation_checkpointing",
              "compile", "on_nonfinite", "spike_factor", "profile_comms", "collective_timeout", "context_parallel",
              "sequence_parallel", "probe_every", "probe_data", "probe_layers", "probe_rows", "schedule",
              "decay_steps"),
}
STEER_FLAGS = ["--" + name.replace("_", "-") for sec in STEER_FIELDS.values() for name in sec]
# Settings of one invocation, not of the run: a resume does not inherit them from the saved config (a time
# budget that stopped the last job would stop the requeued one at once; a diagnostic asked of one job).
PER_INVOCATION = {"train": ("time_budget", "profile_comms")}


def _whole_config(path: str, key: str | None = None) -> tuple[dict | None, str | None]:
    """(the config in the JSON record at `path`, under `key` when given; or None and why it is not whole)."""
    try:
        rec = read_record(path)
        raw = rec.get(key) if key else rec
        if key and raw is None:
            raise ConfigError(f"{path}: field {key!r} is missing")
        check_record_config(raw, f"{path}" + (f" ({key!r})" if key else ""))
        return raw, None
    except ConfigError as e:
        return None, str(e)


def saved_run_config(out: str, shown_out: str | None = None) -> tuple[dict, str | None]:
    """(the effective config the run in `out` last started with, less the settings of one invocation
    (PER_INVOCATION); a line to print when it came from elsewhere). Its config.json is trusted only when whole
    (config.check_record_config); a damaged or missing one is replaced by the latest checkpoint's own
    megapix_config.json, said in the line; never by defaults: one ConfigError when neither is whole."""
    shown_out = shown_out or out
    config, why = _whole_config(os.path.join(out, RUN_RECORD), "config")
    if config is None:
        ckpt_dir = os.path.join(out, "checkpoints")
        tag = read_latest(ckpt_dir)
        if tag is None or not TAG.fullmatch(tag):
            raise ConfigError(f"{why}; no checkpoint holds the run's settings either: restore "
                              f"{os.path.join(shown_out, RUN_RECORD)} from a backup (a resume never continues "
                              "with default settings), or start a new run in another --out")
        config, tag_why = _whole_config(os.path.join(ckpt_dir, tag, "megapix_config.json"))
        if config is None:
            raise ConfigError(f"{why}; and {tag_why}: restore {os.path.join(shown_out, RUN_RECORD)} from a backup "
                              "(a resume never continues with default settings)")
        why = (f"warning: {why}; continuing with the settings saved in the checkpoint, "
               f"{os.path.join(shown_out, 'checkpoints', tag, 'megapix_config.json')} ({RUN_RECORD} is rewritten "
               "from them)")
    else:
        why = None
    return {sec: {k: v for k, v in fields.items() if k not in PER_INVOCATION.get(sec, ())}
            for sec, fields in config.items()}, why


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """(changes that contradict the saved run, changes that only steer it), each "section.field saved -> now"."""
    now = cfg.to_dict()
    contradicting, steering = [], []
    for sec, fields in now.items():
        for name, value in fields.items():
            old = saved.get(sec, {}).get(name, value)
            if old != value and (sec, name) != ("train", "out"):  # the folder is the run, however it is spelled
                (steering if name in STEER_FIELDS[sec] else contradicting).append(f"{sec}.{name} {old!r} -> {value!r}")
    return contradicting, steering


def check_resume_config(saved: dict, cfg: Config, shown_out: str, allow_changed: bool) -> list[str]:
    """Refuse a resume whose settings contradict the saved run's (one line naming every field with both values),
    unless `allow_changed`; returns the lines to print (and put in the summary) about what the resume changes."""
    contradicting, steering = resume_changes(saved, cfg)
    record = os.path.join(shown_out, RUN_RECORD)
    if contradicting and not allow_changed:
        raise ConfigError(f"--resume: {'; '.join(contradicting)} contradicts the run in {shown_out} ({record}): drop "
                          "those settings to continue it as it was, or pass --allow-changed to continue with them")
    notes = []
    if contradicting:
        notes.append(f"--allow-changed: continuing {shown_out} with {'; '.join(contradicting)}: from the resumed "
                     "step on, the curve is not the saved run's")
    old_end = saved.get("train", {}).get("max_steps")
    if old_end is not None and old_end != cfg.train.max_steps:
        notes.append(f"--resume: the schedule now ends at step {cfg.train.max_steps} (the saved run's ended at "
                     f"{old_end}): the {'WSD' if cfg.train.schedule == 'wsd' else 'cosine'} decay from the resumed "
                     "step on follows the new end")
    other = [s for s in steering if not s.startswith("train.max_steps ")]
    if other:
        notes.append(f"--resume: changed from here on: {'; '.join(other)}")
    return notes
