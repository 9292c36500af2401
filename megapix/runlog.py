"""What a run shows and leaves beside its checkpoints, and how it is told to stop: the RunLog (metrics.jsonl, the
loss curve and loss.png, DeepSpeed's monitors, the progress line, the end-of-run summary), the stop request
(preemption signal or time budget), peak memory, and the CPU matmul peak that MFU divides by there."""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from megapix.utils import append_line, atomic_path, read_json, read_metrics, shell_program


def peak_memory(device: torch.device) -> tuple[str, float]:
    """(key, GiB) for the metrics record: on a GPU `peak_mem_gb`, the device memory torch has allocated at most
    (torch.cuda.max_memory_allocated: tensors, not the caching allocator's reserve); on CPU `peak_rss_gb`, the
    process's peak resident set size (ru_maxrss: everything the process touched, Python and libraries too)."""
    if device.type == "cuda":
        return "peak_mem_gb", torch.cuda.max_memory_allocated(device) / 2**30
    return "peak_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


_MATMUL_PEAK: dict = {}


def measured_matmul_tflops(dtype: torch.dtype = torch.float32, seconds: float = 1.0, n: int = 1024) -> float:
    """An estimate of this CPU process's peak TFLOP/s: the best rate of square `dtype` matmuls over about `seconds`,
    with the threads this process has (torch.get_num_threads()). Cached per process and dtype.

    The size grows from 128 up to `n` while one matmul takes under a fortieth of `seconds`, so the probe keeps to its
    budget where the CPU has no fast kernel for the dtype: bf16 without AVX512-BF16 took 2.6 s per 1024^3 matmul on
    a 2-core Zen 3, and the fixed-size probe 13 s of every bf16 run's start."""
    if dtype not in _MATMUL_PEAK:
        g = torch.Generator().manual_seed(0)  # not the global generator: the run's random stream is untouched
        size = 128
        while True:
            a, b = torch.randn(size, size, generator=g).to(dtype), torch.randn(size, size, generator=g).to(dtype)
            t0 = time.perf_counter()
            torch.mm(a, b)  # also the warm-up: thread pool and kernel selection
            if size >= n or time.perf_counter() - t0 >= seconds / 40:
                break
            size *= 2
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0) / 1e12)
        _MATMUL_PEAK[dtype] = best
    return _MATMUL_PEAK[dtype]


def peak_cache_file() -> str:
    """Where measured CPU matmul peaks are kept: $MEGAPIX_CACHE_DIR, else $XDG_CACHE_HOME/megapix, else
    ~/.cache/megapix."""
    root = os.environ.get("MEGAPIX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "megapix")
    return os.path.join(root, "cpu_matmul_peak.json")


def _cpu_key(dtype: torch.dtype) -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{name} | {cpus} cpus | {torch.get_num_threads()} threads | {str(dtype).removeprefix('torch.')} | "
            f"torch {torch.__version__}")


def cached_matmul_tflops(dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s, the file it is kept in): measured_matmul_tflops once per CPU model, CPU count, thread count,
    dtype and torch version, then read back. Every run on a machine divides its MFU by the same peak (a fresh 1 s probe
    varied by up to 30% between runs) and skips the probe (1.1 s of each run's start). Deleting the file re-measures;
    an unreadable or unwritable cache only means measuring again."""
    path, key = peak_cache_file(), _cpu_key(dtype)

    def table() -> dict:  # JSON only: a crafted file can give a wrong number, never run code
        got = read_json(path)
        return got if isinstance(got, dict) else {}

    known = table().get(key)
    if isinstance(known, (int, float)) and math.isfinite(known) and known > 0:
        return float(known), path
    peak = measured_matmul_tflops(dtype)
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cpu_matmul_peak.", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump({**table(), key: peak}, f, indent=1)  # re-read: another run's entries stay
        os.replace(tmp, path)  # replaces a symlink at `path`, never writes through it
    except OSError:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)  # a full disk leaves no partial file behind
    return peak, path


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


class RunLog:
    """What a run shows and leaves for its user besides checkpoints: <out>/metrics.jsonl (one JSON record per step,
    rank 0 writes), the loss curve and <out>/loss.png, DeepSpeed's monitors (TensorBoard/CSV/W&B, when its config
    enables one), the progress line (a bar on a terminal; on a log file, SLURM's or a pipe's, one plain line every
    log_every steps instead of hundreds of carriage-return redraws) and what the end-of-run summary reports.

    The Trainer makes one per run; several runs can share one (a fine-tuning sweep: one metrics.jsonl for every
    learning rate, `plot=False`). `continue_from` starts the file: a fresh run empties it, a resumed one keeps the
    records up to the resumed step (megapix.checkpoint.manager calls it on resume)."""

    def __init__(self, out: str, is_rank0: bool, plot: bool = True):
        self.path = os.path.join(out, "metrics.jsonl")
        self.png_path = os.path.join(out, "loss.png")
        self.enabled, self.plotting = is_rank0, plot
        self.curve: tuple[list, list] = ([], [])  # (step, train loss), (step, val loss)
        self.probe_curve: dict[str, list] = {}  # "layer_L" -> (step, probe accuracy), resumed records included
        self.loss_png = None  # the path, once written
        self.summary: dict = {}
        self.monitor = None
        self._bar = None
        self._told: set = set()
        self.rollbacks: dict = {}  # (step, batch) -> the rollback event, over the whole run (resumes included)
        self.slowest: dict = {}  # rank -> [steps it was the slowest, sum of its time, sum of the median], this process


    def continue_from(self, step: int | None) -> None:
        """Rewrite metrics.jsonl as the curve of the run that goes on from `step`: None (a fresh run) keeps
        nothing; a resumed run keeps the records up to its checkpoint, dropping later ones and a torn last line.
        The loss curve is reloaded from what is kept."""
        self.curve, self.rollbacks, self.probe_curve = ([], []), {}, {}
        if not self.enabled:
            return
        if os.path.isfile(self.path):
            kept = [r for r in read_metrics(self.path) if step is not None and r.get("step", 0) <= step]
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self.rollbacks = {}
            for r in kept:
                self._add_to_curve(r)
                self._add_rollbacks(r)

    # ---- one training run (fit) ----
    def begin(self, desc: str, total: int, initial: int, log_every: int, monitor=None) -> None:
        self.desc, self.total, self.log_every, self.monitor = desc, total, max(1, log_every), monitor
        self.summary = {"first_step": initial}
        self._last_val = None
        # the bar only where both streams are a terminal: `> log` or `| tee` keeps the plain lines in the file
        self._interactive = sys.stderr.isatty() and sys.stdout.isatty()
        self._started = time.monotonic()
        self._bar = tqdm(total=total, initial=initial, disable=not (self.enabled and self._interactive), desc=desc,
                         dynamic_ncols=True, unit="step")  # tqdm's own [elapsed<ETA, rate] plus the postfix

    def end(self) -> None:
        """Close the progress bar (before any message or error is printed); idempotent."""
        if self._bar is not None:
            self._bar.close()

    def record(self, rec: dict) -> None:
        """One step's record: into metrics.jsonl, the curve, the monitor, the summary and the progress line."""
        if self.enabled:
            append_line(self.path, json.dumps(rec))
        self._add_to_curve(rec)
        self._add_rollbacks(rec)
        if "slowest_rank" in rec:
            counts = self.slowest.setdefault(rec["slowest_rank"], [0, 0.0, 0.0])
            counts[0] += 1
            counts[1] += rec["rank_time_max_s"]
            counts[2] += rec["rank_time_median_s"]
        mon = self.monitor
        if mon is not None and mon.enabled and self.enabled:
            mon.write_events([(f"megapix/{k}", v, rec["step"]) for k, v in rec.items()
                              if isinstance(v, (int, float)) and k != "step"])
        self._remember(rec)
        self._progress(rec)

    def plot(self) -> None:
        """<out>/loss.png (rank 0): at each evaluation and at the end of a run."""
        if self.enabled and self.plotting:
            self.loss_png = write_loss_plot(*self.curve, self.png_path, self.probe_curve)

    def note_once(self, key: str, message: str) -> None:
        """A line printed once per log (rank 0), e.g. why a metric is null."""
        if self.enabled and key not in self._told:
            self._told.add(key)
            print(f"megapix: {message}", flush=True)

    def _add_rollbacks(self, rec: dict) -> None:
        for event in rec.get("rolled_back") or []:
            self.rollbacks[(event["step"], event["batch"])] = event

    def persistent_straggler(self, share: float = 0.75, excess: float = 1.2, min_steps: int = 3) -> str | None:
        """A line naming the rank that was the slowest in at least `share` of this process's steps (and at least
        `min_steps`), with a busy time `excess` times the median's on average; None when no rank was."""
        steps = sum(c[0] for c in self.slowest.values())
        for rank, (n, slow_sum, median_sum) in self.slowest.items():
            if n >= min_steps and n >= share * steps and slow_sum >= excess * median_sum:
                return (f"rank {rank} was the slowest in {n} of {steps} steps (busy {slow_sum / n:.3g} s per step "
                        f"against a median of {median_sum / n:.3g} s): look at its node")
        return None

    def _add_to_curve(self, rec: dict) -> None:
        if isinstance(rec.get("step"), int):
            for points, key in zip(self.curve, ("loss", "val_loss")):
                if isinstance(rec.get(key), (int, float)):
                    points.append((rec["step"], rec[key]))
            for key, value in rec.items():
                if key.startswith(PROBE_KEY) and isinstance(value, (int, float)):
                    self.probe_curve.setdefault(key.removeprefix(PROBE_KEY), []).append((rec["step"], value))

    def _progress(self, rec: dict) -> None:
        if rec.get("val_loss") is not None:
            self._last_val = rec["val_loss"]
        loss = rec["loss"]
        self._bar.update(1)
        if not self._bar.disable:  # a dict keeps this order (keyword arguments tqdm sorts)
            post = {"loss": f"{loss:.4f}", **({"val": f"{self._last_val:.4f}"} if self._last_val is not None else {})}
            if rec.get("step_time_s") is not None:
                post["ms_step"] = f"{1000 * rec['step_time_s']:.0f}"
            if rec.get("mfu") is not None:
                post["mfu"] = f"{100 * rec['mfu']:.1f}%"
            self._bar.set_postfix(post, tok_s=f"{rec['tokens_per_s']:.0f}")
        step = rec["step"]
        probe = {k.removeprefix(PROBE_KEY).replace("_", " "): v for k, v in rec.items() if k.startswith(PROBE_KEY)}
        # every evaluation and probe is shown
        evaluated = rec.get("val_loss") is not None or rec.get("val_acc") is not None or bool(probe)
        if self.enabled and not self._interactive and (step % self.log_every == 0 or step == self.total or evaluated):
            bpd = f" ({rec['bpd']:.3f} bits/dim)" if rec.get("bpd") is not None else ""
            val_bpd = f" ({rec['val_bpd']:.3f} bits/dim)" if rec.get("val_bpd") is not None else ""
            norm = f", grad_norm {rec['grad_norm']:.3g}" if rec.get("grad_norm") is not None else ""
            print(f"{self.desc} step {step}/{self.total}: loss {loss:.4f}{bpd}"
                  + (f", val_loss {rec['val_loss']:.4f}{val_bpd}" if rec.get("val_loss") is not None else "")
                  + (f", val_acc {100 * rec['val_acc']:.2f}%" if rec.get("val_acc") is not None else "")
                  + (f", probe {100 * max(probe.values()):.1f}% at {max(probe, key=probe.get)}" if probe else "")
                  + f", lr {rec['lr']:.3g}{norm}, {rec['tokens_per_s']:.0f} tokens/s" + self._pace(rec), flush=True)

    def _pace(self, rec: dict) -> str:
        """ms per step and MFU of this step, then the wall time since this process began training and the time
        left at that pace (evaluations and saves included, so the estimate is what the user will wait)."""
        pace = f", {1000 * rec['step_time_s']:.0f} ms/step" if rec.get("step_time_s") is not None else ""
        if rec.get("mfu") is not None:
            pace += f", MFU {100 * rec['mfu']:.1f}%"
        done = rec["step"] - self.summary.get("first_step", 0)
        elapsed = time.monotonic() - self._started
        if done > 0:
            left = elapsed / done * max(0, self.total - rec["step"])
            pace += f", {_clock(elapsed)} elapsed, {_clock(left)} left"
        return pace

    def _remember(self, rec: dict) -> None:
        """What the end-of-run summary reports: the last train loss and the best validation loss, and a warning
        when validation loss has risen three evaluations in a row while training goes on (overfitting)."""
        s = self.summary
        s["last_step"], s["last_loss"], s["last"] = rec["step"], rec["loss"], rec
        s["probe_time_s"] = s.get("probe_time_s", 0.0) + rec.get("probe_time_s", 0.0)
        val = rec.get("val_loss")
        if val is None:
            return
        vals = s.setdefault("val_losses", [])
        vals.append(val)
        if s.get("best_val_loss") is None or val < s["best_val_loss"]:
            s["best_val_loss"], s["best_val_step"] = val, rec["step"]
        if len(vals) >= 4 and vals[-1] > vals[-2] > vals[-3] > vals[-4] and self.enabled and not s.get("warned"):
            s["warned"] = True
            print(f"megapix: warning: val_loss has risen for 3 evaluations ({vals[-4]:.4f} -> {vals[-1]:.4f}; best "
                  f"{s['best_val_loss']:.4f} at step {s['best_val_step']}): the model is overfitting this data; "
                  "fewer --max-steps or more data", flush=True)


def _clock(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour)."""
    seconds = int(round(seconds))
    h, m, sec = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def write_loss_plot(train: list, val: list, png_path: str, probe: dict | None = None, points: int = 2000
                    ) -> str | None:
    """<out>/loss.png: train loss (every step; averaged over buckets of steps beyond `points` of them) and val loss
    (each evaluation) against the step, in nats per token with bits/dim on the right axis. `train` and `val` are
    (step, loss) pairs; `probe` ({"layer_L": (step, accuracy) pairs}, --probe-every) is drawn in a second panel
    beside them. Written atomically (a reader never sees half a PNG). Returns the path, or None when there is
    nothing to plot yet."""
    if not train and not val:
        return None
    if len(train) > points:
        k = -(-len(train) // points)
        train = [(train[min(i + k, len(train)) - 1][0], sum(v for _, v in train[i:i + k]) / len(train[i:i + k]))
                 for i in range(0, len(train), k)]
    # lazy: matplotlib costs ~0.3 s to import and only a run that plots needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    fig = Figure(figsize=(11.2 if probe else 6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax, *probe_ax = fig.subplots(1, 2) if probe else [fig.subplots()]
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, ms=3, label="val loss")
    ax.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda b: b * math.log(2))).set_ylabel("bits/dim")
    for layer, points_ in sorted(probe.items() if probe else [], key=lambda kv: int(kv[0].rpartition("_")[2])):
        probe_ax[0].plot([s for s, _ in points_], [100 * a for _, a in points_], "o-", lw=1.5, ms=3,
                         label=layer.replace("_", " "))
    return _save_figure(fig, [(ax, "loss (nats/token)")] + [(a, "linear probe val accuracy (%)") for a in probe_ax],
                        png_path)


def _save_figure(fig, axes_labels, png_path: str) -> str:
    """Label each (axes, y label) against the step, grid and legend, and write the figure atomically (a reader
    never sees half a PNG)."""
    for ax, label in axes_labels:
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


def write_finetune_plot(records: list[dict], png_path: str) -> str | None:
    """<out>/finetune_curves.png: for each learning rate of a fine-tuning sweep, train loss against the step (left)
    and validation accuracy at each evaluation (right). `records`: metrics.jsonl's rows (with "lr_run")."""
    runs: dict = {}
    for r in records:
        if isinstance(r.get("step"), int) and "lr_run" in r:
            loss, acc = runs.setdefault(r["lr_run"], ([], []))
            if isinstance(r.get("loss"), (int, float)):
                loss.append((r["step"], r["loss"]))
            if isinstance(r.get("val_acc"), (int, float)):
                acc.append((r["step"], 100 * r["val_acc"]))
    if not runs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for lr, (loss, acc) in sorted(runs.items()):
        if loss:
            ax_loss.plot(*zip(*loss), lw=1, label=f"lr {lr:g}")
        if acc:
            ax_acc.plot(*zip(*acc), "o-", lw=1.5, ms=3, label=f"lr {lr:g}")
    return _save_figure(fig, [(ax_loss, "train loss (L_gen + L_clf)"), (ax_acc, "val accuracy (%)")], png_path)


PROBE_KEY = "probe_acc/"  # metrics.jsonl keys of --probe-every: probe_acc/layer_L


def probe_summary(log: RunLog) -> list[str]:
    """The summary's line on the --probe-every probes (none without them): the best layer and step, and the
    last probe's accuracy of that layer."""
    points = [(acc, step, layer) for layer, pts in log.probe_curve.items() for step, acc in pts]
    if not points:
        return []
    acc, step, layer = max(points, key=lambda p: (p[0], -p[1]))  # ties: the earliest step
    last_step, last = log.probe_curve[layer][-1]
    name, seconds = layer.replace("_", " "), log.summary.get("probe_time_s", 0.0)
    return [f"  probe        best {100 * acc:.1f}% val accuracy at {name}, step {step} ({name} at step {last_step}: "
            f"{100 * last:.1f}%; {len(log.probe_curve)} layers probed {len(log.probe_curve[layer])} times, "
            f"{seconds:.1f} s in this process; metrics.jsonl: probe_acc/)"]


def summary_text(log: RunLog, checkpoints, shown_out: str, step: int, peak_tflops: float | None, peak_source: str,
                 samples: str | None, notes: list[str] = (), continuing=None) -> str:
    """The end of a run, for its user: how it went (loss and bits/dim, best validation, throughput), where
    everything is (checkpoints, the best one, metrics, loss curve, samples), what a resume changed (`notes`), and
    what to run next: every command as it runs, copied (tests/test_train.py runs them). `checkpoints` is the run's
    CheckpointManager (latest_tag, best); `continuing(max_steps)` says what the continue line does to the lr."""
    s, out = log.summary, shown_out
    last = s.get("last", {})
    bpd = f" ({last['bpd']:.3f} bits/dim)" if last.get("bpd") is not None else ""
    lines = [f"megapix: done at step {s.get('last_step', step)}: train loss {s['last_loss']:.4f}{bpd}"
             if "last_loss" in s else f"megapix: done at step {step}"]
    if s.get("best_val_loss") is not None:
        last_val = s["val_losses"][-1]
        ln2 = math.log(2)
        lines[0] += (f", val_loss {last_val:.4f} ({last_val / ln2:.3f} bits/dim; best {s['best_val_loss']:.4f} = "
                     f"{s['best_val_loss'] / ln2:.3f} bits/dim at step {s['best_val_step']}"
                     f"{'; rising since: overfitting' if last_val > s['best_val_loss'] else ''})")
    ckpt = os.path.join(out, "checkpoints")
    latest = checkpoints.latest_tag
    lines.append(f"  checkpoints  {ckpt}" + (f" (latest {latest})" if latest is not None else ""))
    best = checkpoints.best
    best_dir = os.path.join(ckpt, best["tag"]) if best else None
    if best:
        what = f"val_loss {best['val_loss']:.4f}" if best.get("val_loss") is not None else f"score {best['score']:.4g}"
        lines.append(f"  best         {best_dir} (step {best['step']}, {what}; {os.path.join(ckpt, 'best.json')})")
    lines.append(f"  metrics      {os.path.join(out, 'metrics.jsonl')}")
    if log.rollbacks:
        events = [log.rollbacks[k] for k in sorted(log.rollbacks)]
        lines.append(f"  rollbacks    {len(events)}: " + "; ".join(
            f"step {e['step']} ({e['reason']}, global batch {e['batch']}) -> step {e['rolled_back_to']}"
            for e in events) + f"; skipped global batches {sorted(e['batch'] for e in events)} (metrics.jsonl: "
            "rolled_back)")
    straggler = log.persistent_straggler()
    if straggler:
        lines.append(f"  straggler    {straggler}")
    lines += probe_summary(log)
    if log.loss_png:
        lines.append(f"  loss curve   {os.path.join(out, 'loss.png')}")
    if samples:
        lines.append(f"  samples      {samples}")
    if last.get("tokens_per_s") is not None:
        mem = (f", peak device memory {last['peak_mem_gb']:.2f} GiB" if "peak_mem_gb" in last else
               f", peak RSS {last['peak_rss_gb']:.2f} GiB" if "peak_rss_gb" in last else "")
        mfu = (f", MFU {100 * last['mfu']:.1f}% of {peak_tflops:.3g} TFLOP/s ({peak_source})"
               if last.get("mfu") is not None else f", no MFU ({peak_source})")
        lines.append(f"  last step    {last['tokens_per_s']:.0f} tokens/s, {last['tflops_per_device']:.3g} TFLOP/s "
                     f"per rank{mfu}{mem}")
    first, started = s.get("first_step"), getattr(log, "_started", None)
    if started is not None and first is not None and s.get("last_step", first) > first:
        wall, steps = time.monotonic() - started, s["last_step"] - first
        lines.append(f"  wall time    {_clock(wall)} for steps {first + 1}-{s['last_step']} ({1000 * wall / steps:.0f} "
                     "ms/step with evaluations and saves)")
    lines += [f"  note         {note}" for note in notes]
    return "\n".join(lines + _next_lines(out, step, best_dir if best and best["tag"] != latest else None,
                                         continuing))


def _next_lines(out: str, step: int, best_dir: str | None, continuing) -> list[str]:
    """The summary's last lines: what a continue does to the lr, then each command to run next, as it runs.
    `continuing(max_steps)` gives (that line, the flags the continue command resumes with)."""
    more = max(2 * step, step + 1)
    said, how = continuing(more) if continuing is not None else (None, "--resume")
    python, megapix = shell_program("python"), shell_program("megapix")
    train_py = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"))
    lines = [f"  continuing   {said}"] if said else []
    lines += ["next:",
              f"  continue     {python} {train_py} {how} --out {out} --max-steps {more}",
              f"  export (HF)  {megapix} export --checkpoint {out} --out {out}-hf"]
    if best_dir:
        lines.append(f"  export best  {megapix} export --checkpoint {best_dir} --out {out}-best-hf")
    return lines + [f"  sample       {megapix} sample --checkpoint {out} --out {os.path.join(out, 'more_samples.png')}",
                    f"  probe        {megapix} extract --checkpoint {out} --out {out}-features && "
                    f"{megapix} probe --features {out}-features"]
