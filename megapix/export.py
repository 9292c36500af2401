"""`megapix export --checkpoint RUN --out DIR`: a checkpoint of any layout -> a consolidated HF ImageGPT directory.

The directory (config.json + model.safetensors, HF ImageGPT layout) loads with `ImageGPT.from_pretrained` and
with transformers' ImageGPTForCausalImageModeling. TP shards are merged and pipeline layer files collected
by megapix.parallel.consolidate; the run's palette is copied beside it as palette.npy when there is one.
Runs on one CPU process; no distributed launch needed.
"""
from __future__ import annotations

import os
import shutil


def export(checkpoint: str, out: str) -> str:
    from megapix.checkpoint import consolidated_state_dict, locate, read_config
    from megapix.model.hf import save_state_dict_pretrained

    root, tag = locate(checkpoint)
    cfg = read_config(root, tag)
    sd = consolidated_state_dict(root, tag, cfg)
    save_state_dict_pretrained(sd, cfg.model, out)
    palette = os.path.join(os.path.dirname(root), "palette.npy")
    if os.path.isfile(palette):
        shutil.copyfile(palette, os.path.join(out, "palette.npy"))
    return tag


def main(argv=None) -> int:
    """`megapix export --checkpoint RUN --out DIR` (the older `megapix export RUN DIR` is still accepted)."""
    from megapix.cliargs import parse_command
    from megapix.config import ExportConfig

    args = parse_command("megapix export", __doc__.splitlines()[0], ExportConfig, argv)
    tag = export(args.checkpoint, args.out)
    print(f"megapix export: {tag} -> {os.path.abspath(args.out)}")
    return 0
