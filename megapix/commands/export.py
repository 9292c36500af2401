"""`megapix export --checkpoint RUN --out DIR`: a checkpoint of any layout -> a consolidated HF ImageGPT directory
(megapix.checkpoint.export). The older `megapix export RUN DIR` is still accepted."""
from __future__ import annotations

import os
import sys

from megapix.checkpoint.export import export
from megapix.cliargs import parse_command
from megapix.commands.options import ExportConfig
from megapix.commands.runner import out_flag, run
from megapix.runfolder import claim


def main(argv=None) -> int:
    return run("megapix export", lambda: _export(argv), out_flag(argv))


def parse_args(argv=None) -> ExportConfig:
    return parse_command("megapix export", __doc__.splitlines()[0], ExportConfig, argv)


def _export(argv) -> int:
    args = parse_args(argv)
    claim(args.out, "export", "megapix export", whole=True)  # one writer of this directory
    tag = export(args.checkpoint, args.out)
    print(f"megapix export: {tag} -> {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
