"""Saving and resuming DeepSpeed checkpoints in <out>/checkpoints: tags, `latest`, and what makes a tag complete.

A tag is written under a staging name (<tag>.saving) and renamed into place only when every rank's files and
megapix's JSON records are in it; `latest` moves after that. So the tag `latest` names is never written in place:
a kill at any moment leaves `latest` on a complete tag. Re-saving the tag `latest` already names at the same step
(a finished run resumed, or a stop request right after a periodic save) keeps the existing files.

After a save, --keep-last N deletes the older global_step<N> tags megapix wrote here (never the tag `latest` names,
never the one best.json names, never a tag past the step just saved). best.json names the checkpoint of the best
validation score: {"tag", "step", "val_loss", ...}; the tag is an ordinary global_step<N> folder, so every command
that reads a tag folder reads it, and a resume goes on from `latest` as always.

Resume checks every file of the tag before DeepSpeed opens it (megapix.checkpoint.safe_load): DeepSpeed's loader
unpickles with weights_only=False, and a truncated file would otherwise surface as a raw traceback.
"""
from __future__ import annotations

import os
import shutil

from megapix.checkpoint.reshard import resume_resharded
from megapix.checkpoint.tags import (TAG, check_same_model, layout_record, problem, read_latest, resume_hint,
                                     saved_layout, saved_step, tag_for, tags)
from megapix.checkpoint.universal import resume_universal, universal_checkpoint_info, unsupported_reason
from megapix.config import Config, ConfigError
from megapix.parallel import dist
from megapix.parallel.layout import Layout
from megapix.utils import atomic_path, read_json, write_json

STAGING = ".saving"
BEST = "best.json"


def save(engine, ckpt_dir: str, step: int, cfg: Config, layout: Layout) -> str:
    """Save a DeepSpeed checkpoint of `engine` at `step` as global_step<step>; return the tag."""
    tag = tag_for(step)
    final = os.path.join(ckpt_dir, tag)
    keep = dist.from_rank0(dist.is_rank0() and read_latest(ckpt_dir) == tag and problem(ckpt_dir, tag) is None
                  and saved_step(ckpt_dir, tag) == step)
    if keep:  # same step, same state (resume goes from `latest`): rewriting it could only risk the one good copy
        if dist.is_rank0():
            print(f"megapix: {tag} is already saved complete at step {step}; kept as is", flush=True)
        return tag
    staging = tag + STAGING
    if dist.is_rank0():
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(os.path.join(ckpt_dir, staging), ignore_errors=True)  # a killed save's leftovers (ours)
    dist.barrier()
    client = {"step": step, "megapix_config": cfg.to_dict()}
    client.update(universal_checkpoint_info(cfg))
    engine.save_checkpoint(ckpt_dir, tag=staging, client_state=client, save_latest=False)
    dist.barrier()

    def publish():
        write_json(os.path.join(ckpt_dir, staging, "megapix_config.json"), cfg.to_dict())
        write_json(os.path.join(ckpt_dir, staging, "layout.json"), layout_record(layout, step))
        # a universal conversion of an earlier tag of this name must not be reused for the new one
        shutil.rmtree(os.path.join(ckpt_dir, f"{tag}_universal"), ignore_errors=True)
        if os.path.exists(final):  # an incomplete or superseded tag of this step (never `latest`'s complete one)
            n = 1
            while os.path.exists(f"{final}.replaced-{n}"):
                n += 1
            os.replace(final, f"{final}.replaced-{n}")
            print(f"megapix: {tag} existed ({problem(ckpt_dir, tag + f'.replaced-{n}') or 'not named by latest'}); "
                  f"kept as {tag}.replaced-{n}", flush=True)
        os.replace(os.path.join(ckpt_dir, staging), final)
        with atomic_path(os.path.join(ckpt_dir, "latest")) as tmp:
            with open(tmp, "w") as f:
                f.write(tag)

    dist.rank0_decides(publish)
    if dist.is_rank0():
        prune(ckpt_dir, cfg.train.keep_last, step)
    dist.barrier()
    return tag


def read_best(ckpt_dir: str) -> dict | None:
    """best.json's record ({"tag", "step", "val_loss", "score", ...}) when it names a tag that exists, else None."""
    rec = read_json(os.path.join(ckpt_dir, BEST))
    if not isinstance(rec, dict) or not isinstance(rec.get("tag"), str) or not TAG.fullmatch(rec["tag"]):
        return None
    return rec if os.path.isdir(os.path.join(ckpt_dir, rec["tag"])) else None


def write_best(ckpt_dir: str, tag: str, step: int, metrics: dict, score: float) -> None:
    """Name `tag` (already saved) as the best checkpoint, atomically (rank 0)."""
    write_json(os.path.join(ckpt_dir, BEST), {"tag": tag, "step": step, "score": score, **metrics})


def prune(ckpt_dir: str, keep_last: int, step: int) -> list[str]:
    """Delete the global_step<N> tags older than the `keep_last` newest up to `step` (rank 0, after a save). Only
    megapix's own tags (layout.json and megapix_config.json in them) are candidates; the tag `latest` names and the
    one best.json names are kept whatever their age, and so is anything newer than `step` (a resume from an
    older tag does not delete the later ones). A tag's `_universal` conversion goes with it. Returns the deleted
    tags; a deletion that fails is one warning line, never a failed run."""
    if keep_last <= 0:
        return []
    keep = {read_latest(ckpt_dir), (read_best(ckpt_dir) or {}).get("tag")}
    older = [t for t in tags(ckpt_dir) if int(TAG.fullmatch(t).group(1)) <= step]
    deleted = []
    for tag in older[:-keep_last]:
        folder = os.path.join(ckpt_dir, tag)
        ours = all(os.path.isfile(os.path.join(folder, f)) for f in ("layout.json", "megapix_config.json"))
        if tag in keep or not ours:
            continue
        try:
            shutil.rmtree(folder)
            shutil.rmtree(f"{folder}_universal", ignore_errors=True)
            deleted.append(tag)
        except OSError as e:
            print(f"megapix: warning: could not delete the old checkpoint {folder} (--keep-last {keep_last}): {e}",
                  flush=True)
    return deleted


def check_resumable(ckpt_dir: str, tag: str) -> None:
    """Refuse (one line naming the file and the previous complete tag) a tag that is incomplete, truncated, or holds
    anything the allow-list does not admit. Runs before DeepSpeed opens any file of it."""
    why = problem(ckpt_dir, tag, deep=True)
    if why is not None:
        raise ConfigError(f"cannot resume {tag}: {why}; {resume_hint(ckpt_dir, tag)}")


def resumable_tag(ckpt_dir: str, cfg: Config | None = None) -> str | None:
    """The tag a --resume continues from, after checking every file of it (safe_load's allow-list, completeness)
    and, given this run's cfg, that it was written for the same model, on rank 0; None when there is no
    checkpoint (said in one line). A problem is one ConfigError on every rank.
    Cheap to call before anything is built, so a bad checkpoint is refused before a run writes anything."""
    def find():
        tag = read_latest(ckpt_dir)
        if tag is None:
            found = tags(ckpt_dir)
            if not found:
                return None
            latest = os.path.join(ckpt_dir, "latest")
            state = "is empty" if os.path.isfile(latest) else "is missing"
            raise ConfigError(f"{latest} {state} but {ckpt_dir} holds checkpoints; {resume_hint(ckpt_dir, None)}")
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise ConfigError(f"{os.path.join(ckpt_dir, 'latest')} names {tag!r}, which does not exist; "
                              f"{resume_hint(ckpt_dir, tag)}")
        check_resumable(ckpt_dir, tag)
        if cfg is not None:
            check_same_model(ckpt_dir, tag, cfg)
        return tag

    tag = dist.rank0_decides(find)
    if tag is None and dist.is_rank0():
        print(f"megapix: --resume: no checkpoint in {ckpt_dir}; starting from step 0", flush=True)
    return tag


def resume(engine, ckpt_dir: str, cfg: Config, layout: Layout, is_pipeline: bool, tag: str | None = None) -> int | None:
    """Continue from `tag` (default: resumable_tag(ckpt_dir), checked): DeepSpeed's own loader when the layout is
    unchanged (exact: weights, optimizer, scheduler). In a different layout: DeepSpeed's universal checkpoint where it
    works (ZeRO-1/2 -> ZeRO-1/2, and ZeRO-3 -> ZeRO-3 at TP 1; weights, Adam moments and schedule carry over;
    checkpoint.universal); otherwise checkpoint.reshard (weights re-cut for this layout, schedule position kept, Adam
    moments restarted). Returns the step resumed, or None when there is nothing to resume."""
    if tag is None:
        tag = resumable_tag(ckpt_dir)
    if tag is None:
        return None
    saved = saved_layout(ckpt_dir, tag)
    here = {k: v for k, v in layout_record(layout, 0).items() if k != "step"}
    if saved is not None and saved != here:
        why_not = unsupported_reason(saved, layout.zero_stage, layout.tp)
        if why_not is None:
            return resume_universal(engine, ckpt_dir, tag, cfg, layout, is_pipeline)
        return resume_resharded(engine, ckpt_dir, tag, cfg, layout, is_pipeline, why_not)
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}; {resume_hint(ckpt_dir, tag)}")
    return int(client["step"])
