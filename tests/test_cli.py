"""The `megapix` dispatcher (python -m megapix)."""
from __future__ import annotations

from conftest import run

from megapix.cli import COMMANDS, main


def test_help_lists_every_command():
    proc = run(["-m", "megapix", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "prepare", "extract", "probe", "finetune", "sample", "export"):
        assert name in COMMANDS
        assert f"  {name} " in proc.stdout, proc.stdout


def test_unknown_command_exits_2(capsys):
    proc = run(["-m", "megapix", "fly"], timeout=120)
    assert proc.returncode == 2
    assert "unknown command 'fly'" in proc.stderr and "Traceback" not in proc.stderr
    assert main(["fly"]) == 2
    assert main([]) == 0 and "commands:" in capsys.readouterr().out


def test_subcommand_help_is_forwarded():
    proc = run(["-m", "megapix", "train", "--help"], timeout=120)
    assert proc.returncode == 0 and "--max-steps" in proc.stdout and "--resume" in proc.stdout
