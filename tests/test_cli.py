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


def test_version_everywhere(capsys):
    import pytest

    from megapix import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"megapix {__version__}"
    for name in ("train", "prepare", "extract", "probe", "sample", "export"):
        with pytest.raises(SystemExit) as e:
            main([name, "--version"])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == f"megapix {__version__}", name


def test_version_has_one_source():
    """setup.py reads the version from megapix/__init__.py instead of repeating it."""
    import os
    import re

    from megapix import __version__

    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert not re.search(r"version\s*=\s*['\"]\d", setup), "setup.py repeats the version"
    assert __version__


def test_every_model_reading_command_takes_checkpoint(capsys):
    import pytest

    for name in ("extract", "sample", "export"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "--checkpoint PATH" in capsys.readouterr().out, name


def test_train_help_shows_the_defaults_a_run_without_flags_uses():
    """`megapix train --help` names what a no-flag run trains (config.DEFAULT_RUN: 10x10 digits-shifted into
    runs/digits), and the dataclass default where a --config file starts from it instead."""
    import re

    from megapix.config import DEFAULT_RUN
    from megapix.data.sources import spec_grammar
    from megapix.commands.train import build_parser

    text = re.sub(r"-\s+", "-", " ".join(build_parser().format_help().split()))  # argparse breaks after hyphens
    assert "(default: 10; 8 under a --config file)" in text
    assert f"(default: {DEFAULT_RUN['data']['source']}; digits under a --config file)" in text
    assert "(default: runs/digits; runs/default under a --config file)" in text
    data_help = re.search(r"--data SPEC (.*?)\(default", text).group(1)
    for kind in spec_grammar().split(" | "):  # every kind of source, with its argument form
        assert kind.split(":")[0] in data_help, (kind, data_help)


def test_no_help_imports_deepspeed():
    """`--help` answers at once: DeepSpeed (seconds to import, and its accelerator notice) is not loaded for it."""
    code = ("import contextlib, io, sys\nfrom megapix.cli import COMMANDS, main\nfor name in COMMANDS:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main([name, '--help'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))\n")
    proc = run(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]
