"""`megapix <command>`: train, prepare, extract, probe, finetune, sample, export, plan (also `python -m
megapix`). Each command is a module of megapix.commands."""
from __future__ import annotations

import importlib
import sys

from megapix.commands import COMMANDS


def usage() -> str:
    lines = ["usage: megapix [--version] <command> [args]   (megapix <command> --help for its flags)", "",
             "A model to read is always named with --checkpoint PATH (a training --out folder, a checkpoint tag",
             "folder, or an HF/megapix export).", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from megapix import __version__

        print(f"megapix {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megapix: error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    from megapix.utils import drop_deepspeed_cpu_notice

    drop_deepspeed_cpu_notice()
    return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
