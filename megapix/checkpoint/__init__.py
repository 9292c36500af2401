"""Checkpoints: save and resume (same layout, DeepSpeed's universal checkpoint, reshard fallback), consolidation of
any layout into the plain ImageGPT weights, export, and loading without executing anything from a user path.

    CheckpointManager(out, shown_out, cfg, layout, resume)  manager.py: the run's policy (what is saved when,
                                                              what a resume restores); the loop calls it
    save(engine, ckpt_dir, step, cfg, layout) -> tag          store.py: staging tag, renamed; `latest` moves last
    resume(engine, ckpt_dir, cfg, layout, is_pipeline) -> step | None     store.py (universal.py, reshard.py)
    latest_step(ckpt_dir) -> step | None                      tags.py: what a --resume would continue from
    load_model(path), load_model_and_palette(path, ...)       load.py: a single-rank ImageGPT from any checkpoint
    locate(path), read_config(root, tag)                      load.py
    export(checkpoint, out)                                   export.py: HF ImageGPT directory (fp32 masters)
Files of a tag are read by safe_load.py (weights_only + DeepSpeed's allow-list) or checked by it before DeepSpeed
opens them.
"""
from megapix.checkpoint.export import export
from megapix.checkpoint.load import consolidated_state_dict, load_model, load_model_and_palette, locate, read_config
from megapix.checkpoint.manager import CheckpointManager
from megapix.checkpoint.store import resumable_tag, resume, save
from megapix.checkpoint.tags import latest_step, layout_record
from megapix.checkpoint.universal import universal_checkpoint_info

__all__ = ["CheckpointManager", "save", "resume", "resumable_tag", "latest_step", "layout_record", "load_model",
           "load_model_and_palette", "locate", "read_config", "consolidated_state_dict", "export",
           "universal_checkpoint_info"]
