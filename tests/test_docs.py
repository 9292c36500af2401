"""Every command the README and docs/ show is one the current code accepts: megapix commands (and the launchers'
megapix/train.py) parse with today's flags and values, the config files they name exist and validate, make
targets exist, sbatch lines name scripts that read the variables set before them, and scripts and test files exist.
The runs themselves are run elsewhere (make train, the printed next commands, the planner's command, the
documented probe-every and WSD runs); this test keeps the rest of the manual from going stale."""
from __future__ import annotations

import glob
import importlib
import os
import re
import shlex

import pytest
from conftest import REPO

from megapix.commands import COMMANDS

DOCS = ["README.md", *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))), "slurm/README.md", "kernels/README.md"]
COMMAND = re.compile(r"^(\w+=\S+\s+)*(\.venv/bin/)?(megapix|deepspeed|torchrun|mpiexec|srun|python3?|make|sbatch)\s")


def documented() -> list[tuple[str, str]]:
    """(file, command) for each command line in a code block (fenced or indented), continuations joined and a
    trailing comment dropped."""
    found = []
    for path in DOCS:
        lines, inside, i = open(os.path.join(REPO, path)).read().split("\n"), False, 0
        while i < len(lines):
            line = lines[i]
            if line.strip().startswith("```"):
                inside = not inside
            elif (inside or line.startswith("    ")) and COMMAND.match(line.strip() + " "):
                command = line.strip()
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                found.append((os.path.relpath(os.path.join(REPO, path), REPO), command))
            i += 1
    return found


def argv_of(command: str) -> tuple[dict, list[str]]:
    """(environment assignments, argv) of a shell line, its comment dropped."""
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^\w+=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def check_megapix(name: str, args: list[str]) -> None:
    """The command parses these flags (argparse errors exit 2; a bad value is a ConfigError). A value in capitals
    (STEPS, N) is a placeholder the reader fills in: it stands for a number where the flag takes one."""
    module = importlib.import_module(COMMANDS[name][0])
    try:
        module.parse_args(args)
    except SystemExit:
        filled = ["1" if re.fullmatch(r"[A-Z][A-Z_]*", a) and i and args[i - 1].startswith("--") else a
                  for i, a in enumerate(args)]
        if filled == args:
            raise
        module.parse_args(filled)


def after(words: list[str], marker: str) -> list[str]:
    return words[words.index(marker) + 1:]


def check(command: str) -> None:
    env, words = argv_of(command)
    tool = os.path.basename(words[0])
    if "megapix/train.py" in words:
        check_megapix("train", after(words, "megapix/train.py"))
    elif tool == "megapix":
        check_megapix(words[1], words[2:])
    elif "-m" in words and after(words, "-m")[0] == "megapix" and len(after(words, "-m")) > 1:
        rest = after(words, "megapix")
        check_megapix(rest[0], rest[1:])
    elif tool == "make":
        targets = re.findall(r"^([\w-]+):", open(os.path.join(REPO, "Makefile")).read(), re.M)
        assert all(t in targets for t in words[1:] if "=" not in t), (command, targets)
    elif tool == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        text = open(os.path.join(REPO, script)).read() + open(os.path.join(REPO, "slurm", "launch.sh")).read()
        unread = [k for k in env if not re.search(rf"\b{k}\b", text)]
        assert not unread, f"{command}: {script} never reads {unread}"
    elif tool.startswith("python") and "-m" in words and "pytest" in words:
        files = [w.split("::")[0] for w in words if w.startswith("tests/")]
        assert all(os.path.isfile(os.path.join(REPO, f)) for f in files), command
    elif tool.startswith("python"):
        script = next(w for w in words[1:] if w.endswith(".py"))
        text = open(os.path.join(REPO, script)).read()
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        unknown = [f for f in flags if f.strip("[]") not in text]
        assert not unknown, f"{command}: {script} has no {unknown}"
    else:
        pytest.fail(f"no check for {command!r}")


COMMANDS_SHOWN = documented()


def test_the_manual_shows_commands():
    assert len(COMMANDS_SHOWN) > 25 and {f for f, _ in COMMANDS_SHOWN} >= {"README.md", "docs/training.md"}


@pytest.mark.parametrize("where,command", COMMANDS_SHOWN, ids=[f"{f}:{i}" for i, (f, _) in enumerate(COMMANDS_SHOWN)])
def test_documented_command_is_accepted(where, command):
    try:
        check(command)
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` is refused by today's flags (exit {e.code})")
