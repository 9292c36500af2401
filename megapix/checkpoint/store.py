"""Saving and resuming DeepSpeed checkpoints in <out>/checkpoints: tags, `latest`, and what makes a tag complete.

A tag is written under a staging name (<tag>.saving) and renamed into place only when every rank's files and
megapix's JSON records are in it; `latest` moves after that. So the tag `latest` names is never written in place:
a kill at any moment leaves `latest` on a complete tag. Re-saving the tag `latest` already names at the same step
(a finished run resumed, or a stop request right after a periodic save) keeps the existing files.

Every tag megapix saves is recorded, in the same staged save, in checkpoints/saved_tags.json (tag -> a random save
id) and in the tag's own megapix_saved.json (the same id). After a save, --keep-last N deletes only older tags whose
two records agree: a tag copied in from another run, restored from a backup of another run or renamed by a user
(global_step030) is never recorded with its id here, so it is never deleted; nor is the tag `latest` names, the one
best.json names, or a tag past the step just saved. best.json names the checkpoint of the best validation score:
{"tag", "step", "score", "val_loss", ...}; the tag is an ordinary global_step<N> folder, so every command that reads
a tag folder reads it, and a resume goes on from `latest` as always. A torn or malformed best.json is never read as
"no best": it stops pruning (one warning line naming the file and the field) and is never replaced, until a user
fixes or removes it.

Resume checks every file of the tag before DeepSpeed opens it (megapix.checkpoint.safe_load): DeepSpeed's loader
unpickles with weights_only=False, and a truncated file would otherwise surface as a raw traceback.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid

import torch

from megapix.checkpoint import deleter
from megapix.checkpoint.reshard import how_to_resume, resume_resharded
from megapix.checkpoint.tags import (TAG, check_same_model, layout_record, problem, read_latest, resume_hint,
                                     saved_step, tag_for, tags)
from megapix.checkpoint.universal import resume_universal, universal_checkpoint_info
from megapix.config import Config, ConfigError
from megapix.errors import CheckpointError
from megapix.parallel import dist
from megapix.parallel.layout import Layout
from megapix.runfolder import disk_error, disk_errors
from megapix.utils import atomic_path, read_json, write_json

STAGING = ".saving"
BEST = "best.json"
SAVED_TAGS = "saved_tags.json"  # checkpoints/: every tag this run saved, with its save id
SAVED_RECORD = "megapix_saved.json"  # in each tag: the same save id


def save(engine, ckpt_dir: str, step: int, cfg: Config, layout: Layout, records: dict | None = None,
         spare: tuple = ()) -> str:
    """Save a DeepSpeed checkpoint of `engine` at `step` as global_step<step>; return the tag. `records`: more
    JSON files for the tag ({file name: JSON object}), written with megapix's own before it is published. `spare`:
    tags pruning spares (a WSD run's stable-phase checkpoint)."""
    if write_files(engine, ckpt_dir, step, cfg) is not None:
        publish(ckpt_dir, step, cfg, layout, records, spare)
    return tag_for(step)


def write_files(engine, ckpt_dir: str, step: int, cfg: Config) -> str | None:
    """Every rank's DeepSpeed files of `step` into the staging tag (with --async-save: snapshotted, the writing
    started); returns the staging folder's name, or None when `latest` already names a complete tag of this step
    (kept as is, nothing to publish). Collective."""
    tag = tag_for(step)
    keep = dist.from_rank0(dist.is_rank0() and read_latest(ckpt_dir) == tag and problem(ckpt_dir, tag) is None
                  and saved_step(ckpt_dir, tag) == step)
    if keep:  # same step, same state (resume goes from `latest`): rewriting it could only risk the one good copy
        if dist.is_rank0():
            print(f"megapix: {tag} is already saved complete at step {step}; kept as is", flush=True)
        return None
    staging = tag + STAGING
    if dist.is_rank0():
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(os.path.join(ckpt_dir, staging), ignore_errors=True)  # a killed save's leftovers (ours)
    dist.barrier()
    client = {"step": step, "megapix_config": cfg.to_dict()}
    client.update(universal_checkpoint_info(cfg))
    _save_files(engine, ckpt_dir, staging, client)
    return staging


def publish(ckpt_dir: str, step: int, cfg: Config, layout: Layout, records: dict | None = None,
            spare: tuple = ()) -> None:
    """The staging tag of `step`, whose every rank's files are written, made the checkpoint: megapix's records
    written into it, renamed into place, `latest` pointed at it, older tags pruned. Collective (rank 0 acts)."""
    tag = tag_for(step)
    final, staging = os.path.join(ckpt_dir, tag), tag + STAGING

    def publish_on_rank0():
        save_id = uuid.uuid4().hex
        with disk_errors(os.path.join(ckpt_dir, staging)):
            try:
                write_json(os.path.join(ckpt_dir, staging, "megapix_config.json"), cfg.to_dict())
                write_json(os.path.join(ckpt_dir, staging, "layout.json"), layout_record(layout, step))
                for name, record in (records or {}).items():
                    write_json(os.path.join(ckpt_dir, staging, name), record)
                write_json(os.path.join(ckpt_dir, staging, SAVED_RECORD), {"save_id": save_id, "step": step})
                _record_saved(ckpt_dir, tag, save_id)
            except Exception:
                shutil.rmtree(os.path.join(ckpt_dir, staging), ignore_errors=True)  # never taken for a checkpoint
                raise
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
        point_latest(ckpt_dir, tag)

    dist.rank0_decides(publish_on_rank0)
    if dist.is_rank0():
        prune(ckpt_dir, cfg.train.keep_last, step, spare)
    dist.barrier()


def discard(ckpt_dir: str, step: int) -> None:
    """Remove the staging tag of `step` (rank 0): a write that failed leaves nothing a later command could take
    for a checkpoint."""
    if dist.is_rank0():
        shutil.rmtree(os.path.join(ckpt_dir, tag_for(step) + STAGING), ignore_errors=True)


def point_latest(ckpt_dir: str, tag: str) -> None:
    """`latest` names `tag` (atomically: a reader sees the old name or the new one)."""
    with atomic_path(os.path.join(ckpt_dir, "latest")) as tmp:
        with open(tmp, "w") as f:
            f.write(tag)


def _save_files(engine, ckpt_dir: str, staging: str, client: dict) -> None:
    """DeepSpeed writes every rank's files into the staging tag. A write the disk refuses (full, read-only, no
    permission) on any rank is one line on every rank, and the staging folder is removed: nothing half-written
    stays where a later command could take it for a checkpoint."""
    problem = None
    without_zip_crc()
    try:
        engine.save_checkpoint(ckpt_dir, tag=staging, client_state=client, save_latest=False)
    except Exception as e:
        found = disk_error(e, os.path.join(ckpt_dir, staging))
        if found is None:
            raise
        problem = str(found)
    first = dist.shared_error(None if problem is None else ConfigError(problem))  # the same line on every rank
    if first is not None:
        if dist.is_rank0():
            shutil.rmtree(os.path.join(ckpt_dir, staging), ignore_errors=True)
        raise ConfigError(f"{first}; the checkpoint was not saved (earlier ones are intact): resume with --resume "
                          "once there is room")
    dist.barrier()


def without_zip_crc() -> None:
    """Checkpoint files go without torch.save's per-record zip CRC32: torch.load never checks it (a flipped byte
    loads either way; tests/test_async_save.py shows it) and computing it was 3/4 of a save's CPU time. Process-wide
    (torch reads the option as each file opens); `unzip -t` then reports CRC errors on these files."""
    torch.serialization.set_crc32_options(False)


def _record_object(path: str) -> tuple[dict | None, str | None]:
    """(the JSON object of a checkpoint record megapix keeps, or None; why it is not one: None when absent)."""
    if not os.path.lexists(path):
        return None, None
    rec = read_json(path)
    if rec is None:
        return None, f"{path} is torn or not valid JSON"
    if not isinstance(rec, dict):
        return None, f"{path} does not hold a JSON object"
    return rec, None


def saved_tags_problem(ckpt_dir: str) -> str | None:
    """Why checkpoints/saved_tags.json cannot be trusted (torn, not an object, a field of the wrong type), naming
    the file and the field; None when it is absent or sound."""
    path = os.path.join(ckpt_dir, SAVED_TAGS)
    rec, why = _record_object(path)
    if rec is None:
        return why
    if not isinstance(rec.get("tags"), dict):
        return f"{path}: field 'tags' is {rec.get('tags')!r}, not an object of tag -> save id"
    bad = next((t for t, i in rec["tags"].items() if not isinstance(i, str)), None)
    return None if bad is None else f"{path}: field 'tags.{bad}' is {rec['tags'][bad]!r}, not a save id"


def saved_tags(ckpt_dir: str) -> dict:
    """checkpoints/saved_tags.json's {tag: save id}: the tags this run saved ({} when none or untrustworthy)."""
    if saved_tags_problem(ckpt_dir) is not None:
        return {}
    rec = read_json(os.path.join(ckpt_dir, SAVED_TAGS))
    return dict(rec["tags"]) if isinstance(rec, dict) else {}


def _record_saved(ckpt_dir: str, tag: str, save_id: str | None) -> None:
    """Add (or, with save_id None, drop) `tag` in saved_tags.json, atomically (rank 0). A torn or malformed one is
    left as it is (one warning line): it may name tags that pruning must never take for another run's."""
    why = saved_tags_problem(ckpt_dir)
    if why is not None:
        _warn_record(why, "not pruning (--keep-last): no tag is recorded as this run's")
        return
    recorded = saved_tags(ckpt_dir)
    if save_id is None:
        recorded.pop(tag, None)
    else:
        recorded[tag] = save_id
    write_json(os.path.join(ckpt_dir, SAVED_TAGS), {"format": "megapix-saved-tags", "tags": recorded})


def saved_here(ckpt_dir: str, tag: str) -> bool:
    """Whether this run saved the tag now at <ckpt_dir>/<tag>: its own record's save id is the one saved_tags.json
    holds for that name (a copied-in, restored or renamed tag has no such pair)."""
    want = saved_tags(ckpt_dir).get(tag)
    own = read_json(os.path.join(ckpt_dir, tag, SAVED_RECORD))
    return want is not None and isinstance(own, dict) and own.get("save_id") == want


def best_problem(ckpt_dir: str) -> str | None:
    """Why checkpoints/best.json cannot be trusted (torn, not an object, a field of the wrong type), naming the
    file and the field; None when it is absent or sound."""
    path = os.path.join(ckpt_dir, BEST)
    rec, why = _record_object(path)
    if rec is None:
        return why
    if not isinstance(rec.get("tag"), str) or not TAG.fullmatch(rec["tag"]):
        return f"{path}: field 'tag' is {rec.get('tag')!r}, not a global_step<N> tag"
    if not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool) or rec["step"] < 0:
        return f"{path}: field 'step' is {rec.get('step')!r}, not a step number"
    score = rec.get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        return f"{path}: field 'score' is {score!r}, not a finite number"
    return None


_WARNED: set[str] = set()


def _warn_record(why: str, what: str) -> None:
    """One warning line per problem of a checkpoint record (best.json, saved_tags.json) megapix will not trust."""
    if why not in _WARNED:
        _WARNED.add(why)
        print(f"megapix: warning: {why}; {what} until it is fixed or moved away (it is never read as empty)",
              flush=True)


def read_best(ckpt_dir: str) -> dict | None:
    """best.json's record ({"tag", "step", "score", "val_loss", ...}) when it is sound and names a tag that exists;
    None otherwise (a torn or malformed one with a warning line: pruning and best tracking stop, see prune)."""
    why = best_problem(ckpt_dir)
    if why is not None:
        _warn_record(why, "not pruning (--keep-last) nor recording a new best")
        return None
    rec = read_json(os.path.join(ckpt_dir, BEST))
    if rec is None:
        return None
    return rec if os.path.isdir(os.path.join(ckpt_dir, rec["tag"])) else None


def write_best(ckpt_dir: str, tag: str, step: int, metrics: dict, score: float) -> None:
    """Name `tag` (already saved) as the best checkpoint, atomically (rank 0). A torn or malformed best.json is
    left as it is (with a warning line): it may name the best tag, which pruning must not lose."""
    why = best_problem(ckpt_dir)
    if why is not None:
        _warn_record(why, "not pruning (--keep-last) nor recording a new best")
        return
    write_json(os.path.join(ckpt_dir, BEST), {**metrics, "tag": tag, "step": step, "score": score})


def prune(ckpt_dir: str, keep_last: int, step: int, spare: tuple = ()) -> list[str]:
    """Delete the tags older than the `keep_last` newest up to `step` (rank 0, after a save). Only tags this run
    saved (saved_here: saved_tags.json and the tag's own record agree) are candidates; the tag `latest` names, the
    one best.json names and those in `spare` are kept whatever their age, and so is anything newer than `step` (a
    resume from an older tag does not delete the later ones). A torn or malformed best.json stops pruning (one
    warning line). A tag's `_universal` conversion goes with it. Returns the deleted tags (renamed out of the run
    at once, their files freed by checkpoint.deleter's background thread); a deletion that fails is one warning
    line, never a failed run."""
    if keep_last <= 0:
        return []
    why = best_problem(ckpt_dir)
    if why is not None:
        _warn_record(why, "not pruning (--keep-last) nor recording a new best")
        return []
    why = saved_tags_problem(ckpt_dir)
    if why is not None:
        _warn_record(why, "not pruning (--keep-last): no tag is recorded as this run's")
        return []
    keep = {read_latest(ckpt_dir), (read_best(ckpt_dir) or {}).get("tag"), *spare}
    ours = [t for t in tags(ckpt_dir) if int(TAG.fullmatch(t).group(1)) <= step and saved_here(ckpt_dir, t)]
    deleted = []
    deleter.leftovers(ckpt_dir)
    for tag in ours[:-keep_last]:
        if tag in keep:
            continue
        folder = os.path.join(ckpt_dir, tag)
        try:
            _record_saved(ckpt_dir, tag, None)
            deleter.delete_later(folder)  # renamed out of the run now, its files freed in the background
            if os.path.isdir(f"{folder}_universal"):
                deleter.delete_later(f"{folder}_universal")
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
        raise CheckpointError(f"cannot resume {tag}: {why}; {resume_hint(ckpt_dir, tag)}")


def resumable_tag(ckpt_dir: str, cfg: Config | None = None, want: str | None = None) -> str | None:
    """The tag a --resume continues from (`latest`'s, or `want`: --resume-tag, one of the tags there), after
    checking every file of it (safe_load's allow-list, completeness) and, given this run's cfg, that it was written
    for the same model, on rank 0; None when there is no checkpoint (said in one line). A problem is one
    ConfigError on every rank. Cheap to call before anything is built, so a bad checkpoint is refused before a run
    writes anything."""
    def find():
        tag = want or read_latest(ckpt_dir)
        if want is not None and want not in tags(ckpt_dir):
            found = ", ".join(tags(ckpt_dir)) or "none"
            raise ConfigError(f"--resume-tag {want}: no such checkpoint in {ckpt_dir} (its tags: {found}); pass one "
                              "of them")
        if tag is None:
            found = tags(ckpt_dir)
            if not found:
                return None
            latest = os.path.join(ckpt_dir, "latest")
            state = "is empty" if os.path.isfile(latest) else "is missing"
            raise CheckpointError(f"{latest} {state} but {ckpt_dir} holds checkpoints; {resume_hint(ckpt_dir, None)}")
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise CheckpointError(f"{os.path.join(ckpt_dir, 'latest')} names {tag!r}, which does not exist; "
                                  f"{resume_hint(ckpt_dir, tag)}")
        check_resumable(ckpt_dir, tag)
        if cfg is not None:
            check_same_model(ckpt_dir, tag, cfg)
        return tag

    tag = dist.rank0_decides(find)
    if tag is None and dist.is_rank0():
        print(f"megapix: --resume: no checkpoint in {ckpt_dir}; starting from step 0", flush=True)
    return tag


def resume(engine, ckpt_dir: str, cfg: Config, layout: Layout, is_pipeline: bool, tag: str | None = None,
           reset_optimizer: bool = False) -> int | None:
    """Continue from `tag` (default: resumable_tag(ckpt_dir), checked): DeepSpeed's own loader when the layout is
    unchanged (exact: weights, optimizer, scheduler). In a different layout: DeepSpeed's universal checkpoint where it
    works (any ZeRO-1/2/3 layout; weights, Adam moments and schedule carry over; checkpoint.universal); otherwise,
    with reset_optimizer, checkpoint.reshard (weights re-cut for this layout, schedule position kept, Adam moments
    restarted; checkpoint.reshard.how_to_resume decides). Returns the step resumed, or None when there is nothing to
    resume."""
    if tag is None:
        tag = resumable_tag(ckpt_dir)
    if tag is None:
        return None
    how, why_not = how_to_resume(ckpt_dir, tag, layout, reset_optimizer)
    if how == "universal":
        return resume_universal(engine, ckpt_dir, tag, cfg, layout, is_pipeline)
    if how == "reshard":
        return resume_resharded(engine, ckpt_dir, tag, cfg, layout, is_pipeline, why_not)
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}; {resume_hint(ckpt_dir, tag)}")
    return int(client["step"])
