"""One module per `megapix <command>`: its flags, its file I/O and its exit code (megapix.commands.runner maps
errors to exit codes for all of them). The library they call (megapix.features, probe, attentive, finetune,
sample, data.prepare, checkpoint.export, plan) stays importable without argparse. The options of every command
but train are dataclasses in megapix.commands.options; train's are the run's config (megapix.config)."""

# command -> (module, one-line help); each module has main(argv) -> exit code
COMMANDS = {
    "train": ("megapix.commands.train", "pre-train an iGPT (runs under deepspeed/torchrun/mpiexec/srun too)"),
    "prepare": ("megapix.commands.prepare", "encode images to palette-id shards + manifest"),
    "extract": ("megapix.commands.extract", "dump pooled multi-layer features for linear probes"),
    "probe": ("megapix.commands.probe", "linear probes over dumped features; --attentive: attention pooling"),
    "finetune": ("megapix.commands.finetune", "classification fine-tuning with the joint loss"),
    "sample": ("megapix.commands.sample", "image completions and unconditional samples as a PNG grid"),
    "export": ("megapix.commands.export", "a checkpoint of any layout -> an HF ImageGPT directory (fp32)"),
    "plan": ("megapix.commands.plan", "per-GPU memory, step time and MFU of layouts; every layout that fits, ranked"),
}
