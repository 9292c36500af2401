"""`megapix <command>`: train, prepare, extract, probe, finetune, sample, export (also `python -m megapix`)."""
from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "train": ("megapix.train", "main", "pre-train an iGPT (runs under deepspeed/torchrun/mpiexec/srun too)"),
    "prepare": ("megapix.data.prepare", "prepare_main", "encode images to palette-id shards + manifest"),
    "extract": ("megapix.features", "main", "dump pooled multi-layer features for linear probes"),
    "probe": ("megapix.probe", "main", "linear probes over dumped features; --attentive: attention pooling"),
    "finetune": ("megapix.finetune", "main", "classification fine-tuning with the joint loss"),
    "sample": ("megapix.sample", "main", "image completions and unconditional samples as a PNG grid"),
    "export": ("megapix.checkpoint.export", "main", "a checkpoint of any layout -> an HF ImageGPT directory (fp32)"),
    "plan": ("megapix.plan.cli", "main",
             "per-GPU memory, step time and MFU of layouts; every layout that fits, ranked"),
}


def usage() -> str:
    lines = ["usage: megapix [--version] <command> [args]   (megapix <command> --help for its flags)", "",
             "A model to read is always named with --checkpoint PATH (a training --out folder, a checkpoint tag",
             "folder, or an HF/megapix export).", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
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
    module, func, _ = COMMANDS[name]
    from megapix.config import ConfigError

    from megapix.runfolder import disk_error, release_all
    from megapix.utils import drop_deepspeed_cpu_notice

    drop_deepspeed_cpu_notice()

    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except ConfigError as e:
        print(f"megapix {name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from megapix.divergence import EXIT_NONFINITE, NonFiniteStop

        if isinstance(e, NonFiniteStop):  # fine-tuning diverged (--on-nonfinite stop): one line, not a traceback
            print(f"megapix {name}: error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        out = rest[rest.index("--out") + 1] if "--out" in rest[:-1] else None
        problem = disk_error(e, out)  # a full, read-only or forbidden disk: one line, not a traceback
        if problem is None:
            raise
        print(f"megapix {name}: error: {problem}", file=sys.stderr)
        return 2
    finally:
        release_all()  # the command's output locks (megapix.runfolder)


if __name__ == "__main__":
    sys.exit(main())
