"""`megapix sample --checkpoint RUN`: completions of held-out images and unconditional samples as a labelled PNG
grid (megapix.sample), drawn with a new seed each call unless --seed is given."""
from __future__ import annotations

import os
import sys

import numpy as np

from megapix.checkpoint import load_model_and_palette
from megapix.cliargs import parse_command
from megapix.commands.options import SampleConfig
from megapix.commands.runner import out_flag, run
from megapix.data.loader import TokenData
from megapix.data.sources import open_source
from megapix.runfolder import claim
from megapix.sample import annotated, check_png_output, completion_grid, save_png


def main(argv=None) -> int:
    return run("megapix sample", lambda: _sample(argv), out_flag(argv))


def parse_args(argv=None) -> SampleConfig:
    return parse_command("megapix sample", "Complete held-out images and sample new ones; writes a PNG grid (3 "
                         "completions of each top half, then the original).", SampleConfig, argv)


def _sample(argv) -> int:
    args = parse_args(argv)
    check_png_output(args.out)  # before the model is loaded and sampled
    claim(args.out, "sample", "megapix sample", whole=True)  # one writer of this file
    model, palette, data = load_model_and_palette(args.checkpoint, args.palette, args.data)
    split = open_source(data, model.config.resolution).split("test")
    held = TokenData(split, model.config.n_ctx, palette).tokens(np.arange(min(args.n, len(split))))
    # a fresh picture on every call unless --seed is given (samples.png used the run's seed)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    grid = completion_grid(model.eval(), palette, held, seed=seed, temperature=args.temperature)
    save_png(annotated(grid, model.config.resolution), args.out, scale=1)
    print(f"wrote {args.out} (seed {seed}: --seed {seed} draws it again)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
