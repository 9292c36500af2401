"""Shared helpers for the multi-process tests (no tests here): a micro config and layout runs as subprocesses.

Each run is `python -m torch.distributed.run --nproc_per_node N megapix/train.py ...` on CPU/gloo with one
OpenMP thread per rank, and returns the per-step losses from <out>/metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "megapix", "train.py")

# 2 layers (enough for 2 pipeline stages), 4 heads (TP 2 divides), 8x8 digits: seconds per run.
MICRO = {
    "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "resolution": 8, "kernels": "torch"},
    "data": {"source": "digits"},
    "train": {"global_batch": 8, "max_steps": 5, "eval_every": 0, "log_every": 1, "lr": 0.01, "warmup_steps": 1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PALETTE = None


def palette_path() -> str:
    """The digits palette, fitted once per test session (a k=512 k-means costs ~30 s on a busy 2-core box)."""
    global _PALETTE
    if _PALETTE is None:
        import tempfile

        from megapix.data.sources import open_source
        from megapix.data import fit_palette

        path = os.path.join(tempfile.mkdtemp(prefix="megapix-palette-"), "palette.npy")
        fit_palette(open_source("digits", 8, None, 0, True).split("train").images, 0, max_pixels=16384).save(path)
        _PALETTE = path
    return _PALETTE


def micro_config() -> dict:
    cfg = json.loads(json.dumps(MICRO))
    cfg["data"]["palette"] = palette_path()
    return cfg


def write_config(folder, **train) -> str:
    cfg = micro_config()
    cfg["train"].update(train)
    path = os.path.join(str(folder), "micro.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "PMI_RANK"):
        e.pop(k, None)
    return e


def run_worker(folder, name: str, source: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run the script `source` (it finds megapix through MEGAPIX_ROOT) on `nproc` gloo ranks under torchrun."""
    script = os.path.join(str(folder), name)
    with open(script, "w") as f:
        f.write(source)
    e = env()
    e["MEGAPIX_ROOT"] = ROOT
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), script], env=e, capture_output=True, text=True,
                          timeout=300)


def torchrun_cmd(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), TRAIN]


def run_train(out, nproc: int, *args, config=None, cmd=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    config = config or write_config(os.path.dirname(str(out)) or ".")
    cmd = (cmd or torchrun_cmd(nproc)) + ["--config", config, "--out", str(out), "--no-samples", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def losses(out) -> list[float]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def records(out) -> list[dict]:
    with open(os.path.join(str(out), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# Layout runs shared by test_parallel (equivalence), test_checkpoint (resume, export): each runs once per
# session, STEPS steps with checkpoints at SAVE_AT and at the end.
STEPS, SAVE_AT = 6, 3
LAYOUTS = {
    "single": (1, []),
    "dp2-zero1": (2, ["--zero-stage", "1"]),
    "dp2-zero2": (2, ["--zero-stage", "2"]),
    "dp2-zero3": (2, ["--zero-stage", "3"]),
    "tp2": (2, ["--tensor-parallel", "2"]),
    "pp2": (2, ["--pipeline-parallel", "2", "--micro-batch", "2"]),
    "tp2xpp2": (4, ["--tensor-parallel", "2", "--pipeline-parallel", "2"]),
    # ZeRO-1 sources for the resume through DeepSpeed's universal checkpoint (test_checkpoint)
    "single-zero1": (1, ["--zero-stage", "1"]),
    "tp2xpp2-zero1": (4, ["--tensor-parallel", "2", "--pipeline-parallel", "2", "--zero-stage", "1"]),
    "pp2xdp2": (4, ["--pipeline-parallel", "2", "--zero-stage", "1", "--micro-batch", "2"]),
    # activation checkpointing (deepspeed.checkpointing, TP RNG tracker) recomputes blocks: same curve
    "tp2-actckpt": (2, ["--tensor-parallel", "2", "--activation-checkpointing"]),
    "pp2-actckpt": (2, ["--pipeline-parallel", "2", "--activation-checkpointing"]),
    # TP inside ZeRO-3 data parallelism: the layout `megapix plan` picks for iGPT-XL on 8 x 8 GPUs
    "tp2xdp2-zero3": (4, ["--tensor-parallel", "2", "--zero-stage", "3"]),
    # Megatron sequence parallelism over the TP group (megapix/parallel/sequence.py), alone and composed
    "tp2-sp": (2, ["--tensor-parallel", "2", "--sequence-parallel"]),
    "tp2-spxpp2": (4, ["--tensor-parallel", "2", "--sequence-parallel", "--pipeline-parallel", "2"]),
    "tp2-spxdp2-zero1": (4, ["--tensor-parallel", "2", "--sequence-parallel", "--zero-stage", "1"]),
    "tp2-spxdp2-zero3": (4, ["--tensor-parallel", "2", "--sequence-parallel", "--zero-stage", "3"]),
    # context parallelism (ring attention, head + tail chunks per rank): at 16x16 alone and with TP (against
    # single@r16), with DP / ZeRO-3, and with the BERT objective (token-weighted masked loss, against single@bert)
    "single@r16": (1, ["--resolution", "16"]),
    "cp2@r16": (2, ["--context-parallel", "2", "--resolution", "16"]),
    "cp2xtp2@r16": (4, ["--context-parallel", "2", "--tensor-parallel", "2", "--resolution", "16"]),
    "cp2xdp2-zero3": (4, ["--context-parallel", "2", "--zero-stage", "3"]),
    "cp2-zero1": (2, ["--context-parallel", "2", "--zero-stage", "1"]),  # a universal-checkpoint source
    "single@bert": (1, ["--objective", "bert"]),
    "cp2@bert": (2, ["--context-parallel", "2", "--objective", "bert"]),
    # the full 3D composition: 8 ranks (slow on a small CPU box: test_parallel marks it `slow`)
    "tp2xpp2xdp2": (8, ["--tensor-parallel", "2", "--pipeline-parallel", "2", "--zero-stage", "1",
                        "--micro-batch", "2"]),
}
# Layouts whose run also writes samples.png at the end (after the last save and metrics line, so nothing else in
# the run changes): ZeRO-3 used to hang there, TP/PP skipped it silently (test_parallel checks the PNG).
SAMPLED = ("dp2-zero3", "tp2", "pp2")
_WORK = None
_RUNS: dict = {}
_FAILED: set = set()  # world sizes whose launch of layouts failed


def reference_of(name: str) -> str:
    """The single-rank run a layout is compared with: "single", or "single@<variant>" for "<layout>@<variant>"
    (another resolution or objective)."""
    return "single@" + name.partition("@")[2] if "@" in name else "single"


def session_dir() -> str:
    global _WORK
    if _WORK is None:
        import tempfile

        _WORK = tempfile.mkdtemp(prefix="megapix-layouts-")
    return _WORK


EVAL_EVERY = 3  # val_loss at steps 3 and 6: layout-independent too


def layout_config() -> str:
    return write_config(session_dir(), max_steps=STEPS, eval_every=EVAL_EVERY)


# Several trainings in one launch: each rank imports torch and DeepSpeed once, not once per run (seconds per process
# on a small CPU box), and runs `megapix <argv>` (cli.main) for each in turn, in launch_order: DeepSpeed keeps the last
# engine's mpu in a module global, so runs without one (data and context parallel) go first, then pipelines, then
# tensor parallelism (the mpu), activation checkpointing (a DeepSpeed global too) last. Rank 0's stdout of each run
# goes to a file of its own.
TRAININGS_WORKER = r'''
import contextlib, json, os, sys
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
from megapix import cli

rank0 = os.environ.get("RANK", "0") == "0"
for name, argv, stdout in json.loads(os.environ["TRAININGS"]):
    with open(stdout if rank0 else os.devnull, "w") as f, contextlib.redirect_stdout(f):
        code = cli.main(argv)
    assert code == 0, (name, code, open(stdout).read()[-3000:] if rank0 else "")
    sys.stdout.flush()
    os.write(1, f"RAN {name}\n".encode())  # one write(2) per marker: ranks share the pipe, and print() may split
'''


def launch_order(args) -> tuple[bool, bool, bool]:
    """By the values, not the flags' presence (a run may name --tensor-parallel 1)."""
    def size(flag):
        return int(args[args.index(flag) + 1]) if flag in args else 1

    tp, pp = size("--tensor-parallel"), size("--pipeline-parallel")
    return tp > 1 or pp > 1, tp > 1, "--activation-checkpointing" in args


def train_in_one_launch(nproc: int, runs: list[tuple[str, list[str], str]], work) -> None:
    """runs: (name, `megapix` arguments (the command first), file for rank 0's stdout), on `nproc` gloo ranks under
    torchrun, in launch_order."""
    runs = sorted(runs, key=lambda run: launch_order(run[1]))
    script = os.path.join(str(work), "trainings_worker.py")
    with open(script, "w") as f:
        f.write(TRAININGS_WORKER)
    e = env()
    e.update(MEGAPIX_ROOT=ROOT, TRAININGS=json.dumps(runs))
    proc = subprocess.run([*torchrun_cmd(nproc)[:-1], script], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600 * len(runs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("RAN ") == nproc * len(runs), proc.stdout[-3000:]


def layout_run(name: str):
    """The out folder of layout `name`'s run, trained on first use together with every other layout of its world
    size (one launch)."""
    import pathlib

    nproc = LAYOUTS[name][0]
    assert nproc not in _FAILED, f"the launch of the {nproc}-rank layouts failed (see the first test that ran it)"
    if name not in _RUNS:
        batch = [n for n in LAYOUTS if LAYOUTS[n][0] == nproc and n not in _RUNS]
        work = pathlib.Path(session_dir())
        _FAILED.add(nproc)
        train_in_one_launch(nproc, [(n, ["train", "--config", layout_config(), "--out", str(work / n), "--save-every",
                                         str(SAVE_AT), *([] if n in SAMPLED else ["--no-samples"]), *LAYOUTS[n][1]],
                                     str((work / n).with_suffix(".stdout")))  # the summary names the layout it ran
                                    for n in batch], work)
        _RUNS.update((n, work / n) for n in batch)
        _FAILED.discard(nproc)
    return _RUNS[name]


def launch_layouts(work, worker: str, launches: dict, timeout: float = 1500) -> list[dict]:
    """Run `worker` (a script's text) once per world size in `launches` (world -> list of layout dicts, passed as
    LAYOUTS in the environment, with WORK=work and MEGAPIX_ROOT); each rank appends JSON rows to
    WORK/rows-<world>-<rank>.jsonl. Returns every row, with its world size."""
    script = os.path.join(str(work), "layouts_worker.py")
    with open(script, "w") as f:
        f.write(worker)
    rows = []
    for nproc, layouts in launches.items():
        e = env()
        e.update(MEGAPIX_ROOT=ROOT, WORK=str(work), LAYOUTS=json.dumps(layouts))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                               "--master_port", str(free_port()), script], cwd=ROOT, env=e, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        for r in range(nproc):
            with open(os.path.join(str(work), f"rows-{nproc}-{r}.jsonl")) as f:
                rows += [dict(json.loads(line), world=nproc) for line in f if line.strip()]
    return rows
