"""The commands that run a plan for real, as `megapix plan` prints them under its best layout: the DeepSpeed launcher
(with a hostfile across nodes) and the SLURM batch script, each complete but for the placeholders a real run needs
(data, palette, out folder, steps, hostfile), which are named in capitals and explained one per line."""
from __future__ import annotations

import shlex

from megapix.plan.search import PAPER_BATCH, PAPER_ITERATIONS, Plan, ds_config_file
from megapix.utils import shell_program

WIDTH = 116  # a command line's width before it is continued with a backslash
INDENT = "      "  # continuation lines of a command
REAL_RUN = ("--data", "DATA", "--palette", "PALETTE", "--out", "OUT", "--max-steps", "STEPS")
# the batch scripts' variables for the trainer's flags (slurm/launch.sh); the other flags go in EXTRA_ARGS
SLURM_VARS = {"--model": "MODEL", "--global-batch": "GLOBAL_BATCH", "--micro-batch": "MICRO_BATCH",
              "--tensor-parallel": "TP", "--pipeline-parallel": "PP", "--zero-stage": "ZERO_STAGE",
              "--deepspeed-config": "DS_CONFIG"}


def _groups(argv: list[str]) -> list[str]:
    """Each flag with its value, so that a line break never falls between them."""
    out: list[str] = []
    for a in argv:
        if out and not a.startswith("--") and out[-1].startswith("--") and " " not in out[-1]:
            out[-1] += " " + shlex.quote(a)
        else:
            out.append(shlex.quote(a))
    return out


def wrap(groups: list[str], first: str = "  ") -> list[str]:
    """A shell command over lines of at most WIDTH characters, continued with ` \\`."""
    lines, line = [], first
    for g in groups:
        if line.strip() and len(line) + 1 + len(g) > WIDTH:
            lines.append(line + " \\")
            line = INDENT
        line += ("" if not line.strip() else " ") + g
    return lines + [line]


def train_args(p: Plan) -> list[str]:
    """The trainer's flags of the plan's command (after megapix/train.py), then the real run's placeholders."""
    argv = shlex.split(p.command)
    return argv[argv.index("megapix/train.py") + 1:] + list(REAL_RUN)


def launcher_command(p: Plan) -> list[str]:
    """The DeepSpeed launcher, as the user's shell runs it, from the repository root."""
    argv = shlex.split(p.command)
    launcher = (["--hostfile", "HOSTFILE"] if p.nodes > 1 else []) + argv[1:argv.index("megapix/train.py") + 1]
    return wrap([shell_program("deepspeed")] + _groups(launcher) + _groups(train_args(p)))


def slurm_script(p: Plan) -> str:
    """slurm/train_xl.sbatch (the multi-node job) across nodes, slurm/train.sbatch on one node; a row without a
    ds_config file takes train.sbatch too: train_xl.sbatch defaults DS_CONFIG to ZeRO-3's file."""
    return "slurm/train_xl.sbatch" if p.nodes > 1 and ds_config_file(p.layout) else "slurm/train.sbatch"


def slurm_command(p: Plan) -> list[str]:
    """sbatch with the batch script's variables set to the plan's flags (slurm/README.md); OUT is left to the script
    (runs/<job-name>-<job-id>: the same folder after a requeue)."""
    args = train_args(p)
    env, extra, i = [], [], 0
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        i += 2 if value is not None else 1
        if flag in SLURM_VARS:
            env.append(f"{SLURM_VARS[flag]}={value}")
        elif flag == "--data":
            env.append(f"DATA={value}")
        elif flag == "--max-steps":
            env.append(f"MAX_STEPS={value}")
        elif flag != "--out":
            extra += [flag] + ([value] if value is not None else [])
    python = shell_program("python")
    if python != "python":
        env.insert(0, f"PYTHON={python}")
    env.append(f'EXTRA_ARGS="{" ".join(extra)}"')
    g = p.gpus_per_node
    sbatch = [f"sbatch --nodes {p.nodes} --ntasks-per-node {g} --gpus-per-node {g} {slurm_script(p)}"]
    return wrap(["mkdir -p logs &&"] + env + sbatch)


def placeholders(p: Plan) -> list[str]:
    """One line per placeholder (a second, indented, where a command is quoted)."""
    resolution = p.resolution or 0
    prepare = f"{shell_program('megapix')} prepare --data DATA --fit-palette --resolution {resolution} --out DIR"
    lines = ["  DATA      imagefolder:DIR (ImageNet layout: DIR/train/CLASS/*.JPEG, DIR/val) or shards:DIR "
             "(`megapix prepare`)",
             "  PALETTE   kmeans_centers.npy (512 x 3): the paper's (openai/image-gpt, `python download.py "
             "--clusters`), or fit one:",
             f"            `{prepare}` writes DIR/palette.npy",
             "  OUT       the run's folder (checkpoints, metrics.jsonl, samples); add --resume to continue it"]
    steps = "  STEPS     optimizer steps"
    if p.model in PAPER_ITERATIONS:
        n = PAPER_ITERATIONS[p.model]
        steps += (f"; the paper's {n:,} (at batch {PAPER_BATCH[p.model]}) take {n * p.timing.step / 86400:.1f} days "
                  f"at {p.timing.step:.3f} s per step")
    lines.append(steps)
    if p.nodes > 1:
        g = p.gpus_per_node
        lines += [f"  HOSTFILE  DeepSpeed's hostfile: one `HOST slots={g}` line per node ({p.nodes} lines: "
                  f"node1 slots={g} ... node{p.nodes} slots={g});",
                  "            DeepSpeed's runner reaches each node over pdsh/passwordless ssh; this repository at the "
                  "same path on each"]
    return lines


def run_block(p: Plan) -> list[str]:
    """What `megapix plan` prints to run a plan: the launcher, the SLURM line, and the placeholders explained."""
    where = "across nodes, with a hostfile" if p.nodes > 1 else "on one node"
    return [f"run it ({where}; from the repository root; the CAPITALS are placeholders, below):",
            *launcher_command(p),
            f"or on SLURM ({slurm_script(p)}: slurm/README.md; the job names its own OUT, and resumes after a "
            "requeue):",
            *slurm_command(p),
            "placeholders:",
            *placeholders(p)]
