"""Checkpoints: exact resume (1 rank and PP 2), `latest` moves last, layout-changing resume (DeepSpeed's universal
checkpoint, and megapix's reshard fallback), and export of any layout to an HF ImageGPT directory that
transformers loads with identical logits."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import refused
from test_parallel_helpers import (LAYOUTS, SAVE_AT, STEPS, TRAIN, layout_config, layout_run, losses, records,
                                   run_train, train_in_one_launch)

pytestmark = pytest.mark.slow  # every test here starts training runs

STOP = SAVE_AT


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")

# Every resume below: (source layout, ranks, arguments) -> its folder's name. They run in one launch per world size
# (tests/test_parallel_helpers.py: train_in_one_launch), each from a fresh --out holding only the source's step-3
# checkpoint (latest -> global_step3), to STEPS.
BIT_EXACT = ["single", "pp2", "cp2@bert"]
UNIVERSAL = [("tp2xpp2-zero1", 1, ["--zero-stage", "1"]),
             ("single-zero1", 2, ["--tensor-parallel", "2", "--zero-stage", "1"]),
             ("dp2-zero3", 1, ["--zero-stage", "3"]),
             # sequence parallelism off and on across the resume
             ("tp2-spxdp2-zero1", 1, ["--zero-stage", "1"]),
             ("single-zero1", 2, ["--tensor-parallel", "2", "--zero-stage", "1", "--sequence-parallel"]),
             # context parallelism off and on across the resume
             ("cp2-zero1", 1, ["--zero-stage", "1"]),
             ("single-zero1", 2, ["--context-parallel", "2", "--zero-stage", "1"]),
             # ZeRO-3 at any TP (megapix.checkpoint.universal_bridge): the planner's TP2 x DP ZeRO-3 layout on a
             # smaller or larger cluster, and across ZeRO-1/2 <-> ZeRO-3 both ways
             ("tp2xdp2-zero3", 2, ["--tensor-parallel", "2", "--zero-stage", "3"]),  # one replica fewer
             ("tp2xdp2-zero3", 2, ["--zero-stage", "3"]),  # TP 1 x DP 2
             ("tp2xdp2-zero3", 2, ["--tensor-parallel", "2", "--zero-stage", "1"]),
             ("tp2-spxdp2-zero1", 2, ["--tensor-parallel", "2", "--zero-stage", "3"]),  # 2 ranks: no 4-rank launch
             ("dp2-zero3", 1, ["--zero-stage", "1"])]  # a ZeRO-3 source at TP 1 (bare flat tensors)
# ZeRO-0 on either side: no ZeRO optimizer files, so the moments restart, only with --reset-optimizer
FALLBACK = [("tp2xpp2", 1, [], "the checkpoint was written with ZeRO-0"),
            ("single", 2, ["--tensor-parallel", "2"], "the checkpoint was written with ZeRO-0")]


def resumes() -> dict[str, tuple[str, int, list[str]]]:
    out = {f"{name}-resumed": (name, *LAYOUTS[name]) for name in BIT_EXACT}
    out.update((f"{src}-to-universal-{'_'.join(a.lstrip('-') for a in args)}", (src, n, args))
               for src, n, args in UNIVERSAL)
    out.update((f"{src}-to-{'x'.join(args[1::2]) or 'single'}", (src, n, args)) for src, n, args, _ in FALLBACK)
    return out


def whole_layout(args: list[str]) -> list[str]:
    """The destination's layout flags, every one named: only the tag is copied (no config.json), so the resume
    continues with the settings saved in the tag's megapix_config.json (never defaults), the source's layout
    among them; a layout setting the destination does not name is its default, said explicitly."""
    defaults = [x for flag in ("--tensor-parallel", "--pipeline-parallel", "--context-parallel") if flag not in args
                for x in (flag, "1")]
    return [*args, *defaults, *([] if "--sequence-parallel" in args else ["--no-sequence-parallel"])]


@pytest.fixture(scope="module")
def resumed(work) -> dict[str, tuple[object, str]]:
    """dst name -> (its folder, rank 0's stdout), every resume run once."""
    by_world: dict[int, list] = {}
    for dst_name, (src_name, n, args) in resumes().items():
        src, dst = layout_run(src_name), work / dst_name
        ck = dst / "checkpoints"
        ck.mkdir(parents=True)
        shutil.copytree(src / "checkpoints" / f"global_step{STOP}", ck / f"global_step{STOP}")
        (ck / "latest").write_text(f"global_step{STOP}")
        shutil.copy(src / "palette.npy", dst / "palette.npy") if (src / "palette.npy").exists() else None
        reset = ["--reset-optimizer"] if "-to-universal-" not in dst_name and not dst_name.endswith("-resumed") else []
        argv = ["train", "--config", layout_config(), "--out", str(dst), "--no-samples", "--resume",
                *whole_layout(args), *reset]
        by_world.setdefault(n, []).append((dst_name, argv, str(dst) + ".stdout"))
    for n, runs in by_world.items():
        train_in_one_launch(n, runs, work)
    return {name: (work / name, (work / f"{name}.stdout").read_text()) for name in resumes()}


@pytest.mark.parametrize("name", BIT_EXACT)
def test_resume_is_bit_exact(resumed, name):
    full = layout_run(name)
    ck = full / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"global_step{STEPS}"
    for tag in (f"global_step{STOP}", f"global_step{STEPS}"):
        assert (ck / tag / "megapix_config.json").is_file() and (ck / tag / "layout.json").is_file()
    resumed_out = resumed[f"{name}-resumed"][0]
    a, b = losses(full), losses(resumed_out)
    assert [r["step"] for r in records(resumed_out)] == list(range(STOP + 1, STEPS + 1))
    assert b == a[STOP:], (a, b)  # bit for bit on CPU


def test_latest_moves_last(work, monkeypatch):
    """save passes save_latest=False to DeepSpeed and writes `latest` itself after every file."""
    import inspect

    from megapix.checkpoint.store import _save_files, publish, save, write_files

    assert "save_latest=False" in inspect.getsource(_save_files)  # DeepSpeed's files, written by write_files
    assert "_save_files(" in inspect.getsource(write_files)
    src = inspect.getsource(save)
    assert src.index("write_files(") < src.index("publish(")  # every rank's files, then (or never) the publish
    src = inspect.getsource(publish)
    assert src.index("layout.json") < src.index("os.replace(os.path.join(ckpt_dir, staging), final)") < \
        src.index("point_latest(")  # megapix's records, the rename, then `latest`


@pytest.mark.parametrize("src_name,dst_n,dst_args", UNIVERSAL)
def test_resume_in_a_different_layout_through_universal_checkpoint(resumed, src_name, dst_n, dst_args):
    """Any ZeRO-1/2/3 layout -> any other (ZeRO-3 at TP 2 and ZeRO-1 <-> ZeRO-3 included) goes through DeepSpeed's
    universal checkpoint: weights, Adam moments and schedule carry over, so every resumed step matches the
    uninterrupted run.
    fp32 on CPU: layouts differ only in reduction order (measured max |diff| 5e-7 over steps 4-6; uninterrupted runs
    of different layouts agree to ~2e-6), while restarting the moments (the fallback below) moves step 5 by ~4e-2.
    1e-4 separates the two."""
    full = layout_run(src_name)
    dst, stdout = resumed[f"{src_name}-to-universal-{'_'.join(a.lstrip('-') for a in dst_args)}"]
    assert "through DeepSpeed's universal checkpoint" in stdout, stdout
    assert (dst / "checkpoints" / f"global_step{STOP}_universal" / "zero" / "optimizer_state.pt").is_file()
    a, recs = losses(full), records(dst)
    assert [r["step"] for r in recs] == list(range(STOP + 1, STEPS + 1))
    diff = max(abs(r["loss"] - x) for r, x in zip(recs, a[STOP:]))
    print(f"{src_name} -> {' '.join(dst_args)} ({dst_n} ranks): max |loss - uninterrupted| = {diff:.1e} over steps "
          f"{STOP + 1}-{STEPS}")
    assert diff < 1e-4, ([r["loss"] for r in recs], a[STOP:])
    assert all(abs(r["lr"] - f["lr"]) < 1e-12 for r, f in zip(recs, records(full)[STOP:]))


@pytest.mark.parametrize("src_name,dst_n,dst_args,why", FALLBACK)
def test_resume_in_a_different_layout(resumed, src_name, dst_n, dst_args, why):
    """The fallback where DeepSpeed's universal checkpoint does not apply: weights are resharded into the new layout
    (megapix's own path), the schedule continues: the first resumed step's loss equals the uninterrupted run's
    (Adam moments restart, so later steps may drift slightly). Only with --reset-optimizer, which the log line and
    the run summary name."""
    full = layout_run(src_name)
    dst, stdout = resumed[f"{src_name}-to-{'x'.join(dst_args[1::2]) or 'single'}"]
    assert "weights resharded" in stdout and f"not universal: {why}" in stdout, stdout
    assert "Adam moments restarted (--reset-optimizer" in stdout, stdout
    assert f"note         --reset-optimizer: the Adam moments restarted at step {STOP}" in stdout, stdout
    a, recs = losses(full), records(dst)
    assert recs[0]["step"] == STOP + 1
    assert abs(recs[0]["loss"] - a[STOP]) < 1e-4, (recs[0]["loss"], a[STOP])
    assert abs(recs[0]["lr"] - records(full)[STOP]["lr"]) < 1e-12
    assert all(abs(r["loss"] - x) < 5e-2 for r, x in zip(recs, a[STOP:]))


def test_layout_change_that_would_restart_the_moments_needs_reset_optimizer(work):
    """A ZeRO-0 checkpoint resumed in another layout cannot carry the Adam moments: without --reset-optimizer the
    resume is one line naming the flag, exit 2, and nothing is written into --out."""
    src, dst = layout_run("single"), work / "single-to-zero1-refused"
    shutil.copytree(src / "checkpoints" / f"global_step{STOP}", dst / "checkpoints" / f"global_step{STOP}")
    (dst / "checkpoints" / "latest").write_text(f"global_step{STOP}")
    before = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    proc = run_train(dst, 1, "--resume", *whole_layout(["--zero-stage", "1"]), config=layout_config(), check=False,
                     cmd=[sys.executable, TRAIN])  # one plain process: torchrun would turn exit 2 into 1
    refused(proc, "--reset-optimizer", "ZeRO-0", "Adam moments")
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == before


@pytest.mark.parametrize("name", ["tp2xpp2", "single", "pp2", "tp2-sp"])
def test_export_any_layout_loads_in_transformers(work, name, tmp_path):
    from transformers import ImageGPTForCausalImageModeling

    from megapix import ImageGPT
    from megapix.commands.export import main as export_main

    src = layout_run(name)
    out = tmp_path / "export"
    assert export_main([str(src), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    ours = ImageGPT.from_pretrained(str(out)).eval()
    hf = ImageGPTForCausalImageModeling.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(tokens)
        sos = torch.full((2, 1), 512)
        b = hf(torch.cat([sos, tokens[:, :-1]], dim=1)).logits[..., :512]
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # and every layout exports the same weights as the single-rank run (same curve -> same weights)
    single = work / "single-export"
    if not single.exists():
        export_main([str(layout_run("single")), str(single)])
    ref = ImageGPT.from_pretrained(str(single)).state_dict()
    got = ours.state_dict()
    # Losses agree to ~1e-5, but Adam normalises updates, so a weight whose gradient is near zero can move by up
    # to ~lr per step in either run: the bound is a few lr, far below a mis-mapped tensor's O(0.1) error.
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-2


def test_universal_patterns_classify_every_parameter_once():
    """ds_to_universal applies each pattern with re.match and asserts at most one match per category and no unused
    pattern: every megapix parameter name, with and without a pipeline, falls in exactly one TP category."""
    import re

    from deepspeed.checkpoint import constants as C

    from megapix import ImageGPT
    from megapix.config import Config
    from megapix.checkpoint.names import canonical_name, module_name
    from megapix.checkpoint.universal import universal_checkpoint_info

    for bias in (False, True):
        cfg = Config.from_dict({"model": {"n_layer": 2, "d_model": 64, "n_head": 4, "resolution": 8, "bias": bias}})
        info = universal_checkpoint_info(cfg)[C.UNIVERSAL_CHECKPOINT_INFO]
        categories = [info[C.TP_REPLICATED_PARAMETER_PATTERNS], info[C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS],
                      info[C.VOCABULARY_PARAMETER_PATTERNS], info[C.PARAMETER_WITH_SUB_PARAMS][0]["patterns"]]
        used = set()
        for canonical, _ in ImageGPT(cfg.model).named_parameters():
            for pipeline in (False, True):
                name = module_name(canonical, pipeline, cfg.model.n_layer)
                assert canonical_name(name, pipeline, cfg.model.n_layer) == canonical
                hits = [p for cat in categories for p in cat if re.match(p, name)]
                column = canonical.endswith(("c_fc.weight", "c_fc.bias"))  # no pattern: cat on dim 0, the default
                assert len(hits) == (0 if column else 1), (name, hits)
                used.update(hits)
        assert used == {p for cat in categories for p in cat}


def test_keep_last_prunes_only_old_megapix_tags(tmp_path):
    """--keep-last N after a save: the N newest global_step tags up to the saved step stay, and so do `latest`'s tag,
    best.json's tag and any later tag; a folder this run did not record (same shape, no entry in saved_tags.json)
    and non-tag names are never touched; a tag's _universal conversion goes with it."""
    from megapix.checkpoint import deleter
    from megapix.checkpoint.store import SAVED_RECORD, _record_saved, prune, read_best, write_best

    ck = tmp_path / "checkpoints"

    def tag(step, ours=True):
        d = ck / f"global_step{step}"
        d.mkdir(parents=True)
        (d / "layout.json").write_text(json.dumps({"step": step}))
        (d / "megapix_config.json").write_text("{}")
        (d / SAVED_RECORD).write_text(json.dumps({"save_id": f"id{step}", "step": step}))
        if ours:  # what a save records
            _record_saved(str(ck), d.name, f"id{step}")
        return d

    for s in (1, 2, 3, 4, 5, 6, 9):
        tag(s)
    tag(0, ours=False)  # someone else's folder of the same shape
    (ck / "global_step1_universal").mkdir()
    (ck / "global_step2.replaced-1").mkdir()
    (ck / "notes").mkdir()
    (ck / "latest").write_text("global_step6")
    write_best(str(ck), "global_step2", 2, {"val_loss": 1.5}, -1.5)
    assert read_best(str(ck))["step"] == 2
    assert prune(str(ck), 0, 6) == []  # 0: keep all
    assert sorted(prune(str(ck), 2, 6)) == ["global_step1", "global_step3", "global_step4"]
    deleter.wait()  # the renamed folders are freed in the background
    left = sorted(os.listdir(ck))
    assert left == ["best.json", "global_step0", "global_step2", "global_step2.replaced-1", "global_step5",
                    "global_step6", "global_step9", "latest", "notes", "saved_tags.json"], left
    # `latest` on an old tag (a resume from it) keeps that tag too
    (ck / "latest").write_text("global_step5")
    assert prune(str(ck), 1, 6) == []
    (ck / f"global_step7{deleter.DELETING}0123abcd").mkdir()  # a process killed before its deletion finished
    assert prune(str(ck), 1, 9) == ["global_step6"]
    deleter.wait()
    assert not [n for n in os.listdir(ck) if deleter.DELETING in n]
    # best.json naming a tag that is gone is no best at all
    shutil.rmtree(ck / "global_step2")
    assert read_best(str(ck)) is None
