"""`megapix prepare --data SPEC --out DIR --resolution N`: images -> palette-id token shards and a manifest
(megapix.data.prepare). Re-running it with the same arguments resumes."""
from __future__ import annotations

import os
import sys

from megapix.cliargs import parse_command
from megapix.commands.options import PrepareConfig
from megapix.commands.runner import out_flag, run
from megapix.data.prepare import prepare
from megapix.runfolder import claim


def main(argv=None) -> int:
    return run("megapix prepare", lambda: _prepare(argv), out_flag(argv))


def parse_args(argv=None) -> PrepareConfig:
    return parse_command("megapix prepare", "Encode images into palette-id token shards.", PrepareConfig, argv)


def _prepare(argv) -> int:
    a = parse_args(argv)
    claim(a.out, "prepare", "megapix prepare")  # one writer, and only into a folder of prepared shards
    m = prepare(a.data, a.out, resolution=a.resolution, palette=a.palette, fit_palette=a.fit_palette,
                shard_size=a.shard_size, workers=a.workers, seed=a.seed, val_fraction=a.val_fraction,
                progress=a.progress, skip_corrupt=a.skip_corrupt)
    counts = ", ".join(f"{k} {v['count']}" for k, v in m["splits"].items())
    skipped = sum((m.get("skipped") or {}).values())
    print(f"prepared {counts} images at {a.resolution}x{a.resolution} into {os.path.abspath(a.out)}"
          + (f" ({skipped} damaged samples skipped: manifest.json's 'skipped')" if skipped else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
