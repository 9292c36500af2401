"""Training time lost per checkpoint save, blocking against --async-save, side by side in one process (CPU).

    python benchmarks/bench_async_save.py [--models small,400m] [--saves 3] [--json FILE]

For each model one Trainer (one rank, gloo, the embedded digits) takes warm-up steps, then:
- the step time without saves (the median of --base-steps steps);
- blocking: --saves saves as `megapix train` makes them without --async-save (store.save: DeepSpeed's torch.save
  of every file, the records, rename, `latest`); the time lost is the save call's time, training stands still;
- async: --saves saves with --async-save; the save call snapshots the state to host memory, then steps go on while
  the writer thread writes and fsyncs, and a step boundary publishes. Time lost: the training thread's stall, the
  save call plus every step boundary's check until the publish (included). The steps taken meanwhile are timed
  too: on a CPU the writer can compete with training for the cores, so the mean step during writes against the
  mean step of a control stretch right after each write (nothing written), times the steps per write, is the
  rest of the cost (reported with its standard error).
Memory: the host copy's bytes (the snapshot, what async holds until written) and the peak resident set during the
async window minus the resident set just before the save (sampled every 10 ms).

Note: the blocking save does not fsync DeepSpeed's files (torch.save into the page cache); the async writer fsyncs
each file before `latest` moves, so on a disk slower than memory the async column also buys durability.
The 400m model: 32 layers, d_model 1024 (~403M parameters), 8x8 images, global batch 1, fp32, ZeRO-0.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "small": ({"preset": "small", "resolution": 16}, 8),  # (model section, global batch)
    "400m": ({"preset": "small", "n_layer": 32, "d_model": 1024, "n_head": 16, "resolution": 8}, 1),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The peak resident set, sampled every 10 ms from start() to stop()."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def build(model: dict, batch: int, work: str):
    from megapix.config import Config
    from megapix.data import fit_palette
    from megapix.data.sources import open_source
    from megapix.engine import Trainer

    palette = os.path.join(work, "palette.npy")
    if not os.path.exists(palette):
        fit_palette(open_source("digits", model["resolution"], None, 0, True).split("train").images, 0).save(palette)
    cfg = Config.from_dict({"model": model, "data": {"source": "digits", "palette": palette},
                            "train": {"max_steps": 10**6, "global_batch": batch, "eval_every": 0, "save_best": False,
                                      "keep_last": 1, "out": os.path.join(work, f"run-{time.time_ns()}")}})
    return Trainer(cfg)


def fsync_tag(folder: str) -> float:
    """Seconds to fsync every file of a tag: what the blocking save would add to be as durable as the async one."""
    t0 = time.perf_counter()
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - t0


def step(tr) -> float:
    t0 = time.perf_counter()
    tr.train_step(tr.task.train_batches(tr.step))
    tr.step += 1
    return time.perf_counter() - t0


CONTROL_STEPS = 8  # after each async save, up to this many steps with nothing written: the slowdown's baseline


def measure(name: str, saves: int, base_steps: int, work: str) -> dict:
    from megapix.checkpoint import deleter

    model, batch = MODELS[name]
    tr = build(model, batch, work)
    params = sum(p.numel() for p in tr.engine.module.parameters())
    ck = tr.checkpoints
    for _ in range(2):
        step(tr)
    base_times = [step(tr) for _ in range(base_steps)]
    base = statistics.median(base_times)
    blocking, synced, blocking_peak = [], [], []
    ck.async_save = False
    for _ in range(saves):
        step(tr)
        before = rss_bytes()
        with PeakRss() as peak:
            t0 = time.perf_counter()
            ck.save(tr.engine, tr.step)
            blocking.append(time.perf_counter() - t0)
            synced.append(blocking[-1] + fsync_tag(os.path.join(ck.ckpt_dir, ck.latest_tag)))
        blocking_peak.append(peak.peak - before)
    stalls, calls, during, windows, written, host, async_peak, control = [], [], [], [], [], [], [], []
    ck.async_save = True
    for _ in range(saves):
        step(tr)
        before = rss_bytes()
        with PeakRss() as peak:
            t0 = time.perf_counter()
            ck.save(tr.engine, tr.step)
            calls.append(time.perf_counter() - t0)
            stall = calls[-1]
            job = ck.pending[3]
            host.append(job.host_bytes)
            n = 0
            while ck.pending is not None:
                during.append(step(tr))
                n += 1
                t1 = time.perf_counter()
                ck.poll(tr.engine)  # the step boundary's check, and the publish when the write is done
                stall += time.perf_counter() - t1
        stalls.append(stall)
        written.append(job.seconds)
        windows.append(n)
        async_peak.append(peak.peak - before)
        deleter.wait()  # the pruned tag's files freed: nothing runs beside the control steps
        control += [step(tr) for _ in range(min(n, CONTROL_STEPS))]  # the same stretch of the run, no write
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(ck.ckpt_dir, ck.latest_tag))
               for f in fs)
    return {"model": name, "params": params, "global_batch": batch, "step_s": base, "base_step_s": base_times,
            "checkpoint_bytes": size,
            "blocking_lost_s": statistics.median(blocking), "blocking_all_s": blocking,
            "blocking_peak_rss_added": max(blocking_peak), "blocking_fsynced_lost_s": statistics.median(synced),
            "async_stall_s": statistics.median(stalls), "async_all_stall_s": stalls, "async_save_call_s": calls,
            "async_control_step_s": control, **slowdown(control, during, windows),
            "async_write_s": written, "async_steps_during_write": windows, "async_step_s_during_write": during,
            "async_host_copy_bytes": max(host), "async_peak_rss_added": max(async_peak)}


def slowdown(control: list[float], during: list[float], windows: list[int]) -> dict:
    """The steps' slowdown per save while the writer ran: (mean step during writes - mean step of the control
    steps right after each write) x the steps per write, with its standard error (one step's time varies by
    several %, and drifts over a run by more, so a single save's sum of steps, or the first steps', is noise)."""
    steps = statistics.mean(windows)
    se = (statistics.variance(during) / len(during) + statistics.variance(control) / len(control)) ** 0.5 \
        if len(during) > 1 and len(control) > 1 else float("nan")
    return {"async_slowdown_s": (statistics.mean(during) - statistics.mean(control)) * steps,
            "async_slowdown_se_s": se * steps}


def table(rows: list[dict]) -> str:
    out = ["| model | params | step (no save) | checkpoint | blocking: lost per save (with fsync) | async: training "
           "thread's stall per save | async: steps slowed per save (± s.e.) | async stall / blocking (with the "
           "slowdown) | async: write in background (steps meanwhile) | host copy | peak RSS added: blocking / async |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = statistics.median
        cells = [r["model"], f"{r['params'] / 1e6:.0f}M", f"{r['step_s']:.2f} s",
                 f"{r['checkpoint_bytes'] / 1e9:.2f} GB",
                 f"{r['blocking_lost_s']:.2f} s ({r['blocking_fsynced_lost_s']:.2f} s)",
                 f"{r['async_stall_s']:.2f} s",
                 f"{r['async_slowdown_s']:+.2f} ± {r['async_slowdown_se_s']:.2f} s",
                 f"{r['async_stall_s'] / r['blocking_lost_s']:.1%} ("
                 f"{(r['async_stall_s'] + r['async_slowdown_s']) / r['blocking_lost_s']:.0%})",
                 f"{med(r['async_write_s']):.1f} s ({med(r['async_steps_during_write']):.0f})",
                 f"{r['async_host_copy_bytes'] / 1e9:.2f} GB",
                 f"{r['blocking_peak_rss_added'] / 1e9:.2f} / {r['async_peak_rss_added'] / 1e9:.2f} GB"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small,400m", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--saves", type=int, default=3, help="saves per mode (the median is reported)")
    p.add_argument("--base-steps", type=int, default=8, help="steps timed without saves")
    p.add_argument("--zip-crc", action="store_true",
                   help="write checkpoints with torch.save's zip CRC32s (as before megapix turned them off)")
    p.add_argument("--writer-nice", type=int, default=None,
                   help="the async writer thread's niceness (default: megapix's, async_save.WRITER_NICE)")
    p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "async_save.json"))
    args = p.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    from megapix.parallel.launch import init_distributed

    init_distributed()
    from megapix.checkpoint import async_save, store

    if args.zip_crc:
        store.without_zip_crc = lambda: torch.serialization.set_crc32_options(True)
    if args.writer_nice is not None:
        async_save.WRITER_NICE = args.writer_nice
    work = tempfile.mkdtemp(prefix="bench-async-save-", dir=os.environ.get("BENCH_DIR"))
    rows = []
    print(f"zip CRC32 {'on' if args.zip_crc else 'off'}; writer niceness {async_save.WRITER_NICE}", flush=True)
    for name in args.models.split(","):
        rows.append(measure(name, args.saves, args.base_steps, work))
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average at the end: {os.getloadavg()}; cores: {os.cpu_count()}; work dir {work}")
    print(table(rows))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "zip_crc": args.zip_crc, "writer_nice": async_save.WRITER_NICE,
                   "loadavg_end": os.getloadavg(), "cpus": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
