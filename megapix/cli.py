"""`megapix <command>`: train, prepare, extract, probe, finetune, sample, export (also `python -m megapix`)."""
from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "train": ("megapix.train", "main", "pre-train an iGPT (runs under deepspeed/torchrun/mpiexec/srun too)"),
    "prepare": ("megapix.data.prepare", "prepare_main", "encode images to palette-id shards + manifest"),
    "extract": ("megapix.features", "main", "dump pooled multi-layer features for linear probes"),
    "probe": ("megapix.probe", "main", "linear probes over dumped features, per layer and concatenated"),
    "finetune": ("megapix.finetune", "main", "classification fine-tuning with the joint loss"),
    "sample": ("megapix.sample", "main", "image completions and unconditional samples as a PNG grid"),
    "export": ("megapix.export", "main", "consolidate a checkpoint of any layout into an HF ImageGPT directory"),
    "plan": ("megapix.plan", "main", "per-GPU memory, step time and MFU of layouts; every layout that fits, ranked"),
}


def usage() -> str:
    lines = ["usage: megapix <command> [args]   (megapix <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megapix: error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from megapix.config import ConfigError

    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except ConfigError as e:
        print(f"megapix {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
