"""Checkpoints: exact resume (1 rank and PP 2), `latest` moves last, layout-changing resume, and export of any
layout to an HF ImageGPT directory that transformers loads with identical logits."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from test_parallel_helpers import losses, records, run_train, write_config

STEPS, STOP = 6, 3


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def _uninterrupted(work, name, nproc, *args):
    out = work / name
    if not (out / "metrics.jsonl").exists():
        run_train(out, nproc, "--save-every", str(STOP), *args, config=write_config(work, max_steps=STEPS))
    return out


def _resume_from(src, dst, nproc, *args, config):
    """A fresh --out holding only src's step-3 checkpoint (latest -> global_step3), resumed to STEPS."""
    ck = dst / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"global_step{STOP}", ck / f"global_step{STOP}")
    (ck / "latest").write_text(f"global_step{STOP}")
    shutil.copy(src / "palette.npy", dst / "palette.npy") if (src / "palette.npy").exists() else None
    return run_train(dst, nproc, "--resume", *args, config=config)


@pytest.mark.parametrize("name,nproc,args", [("single", 1, []), ("pp2", 2, ["--pipeline-parallel", "2"])])
def test_resume_is_bit_exact(work, name, nproc, args):
    full = _uninterrupted(work, name, nproc, *args)
    ck = full / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"global_step{STEPS}"
    for tag in (f"global_step{STOP}", f"global_step{STEPS}"):
        assert (ck / tag / "megapix_config.json").is_file() and (ck / tag / "layout.json").is_file()
    resumed = work / f"{name}-resumed"
    _resume_from(full, resumed, nproc, *args, config=write_config(work, max_steps=STEPS))
    a, b = losses(full), losses(resumed)
    assert [r["step"] for r in records(resumed)] == list(range(STOP + 1, STEPS + 1))
    assert b == a[STOP:], (a, b)  # bit for bit on CPU


def test_latest_moves_last(work, monkeypatch):
    """The trainer passes save_latest=False to DeepSpeed and writes `latest` itself after every file."""
    import inspect

    from megapix.engine import Trainer

    src = inspect.getsource(Trainer.save)
    assert "save_latest=False" in src
    assert src.index("layout.json") < src.index('"latest"')


@pytest.mark.parametrize("src_name,src_n,src_args,dst_n,dst_args", [
    ("tp2xpp2", 4, ["--tensor-parallel", "2", "--pipeline-parallel", "2"], 1, []),
    ("single", 1, [], 2, ["--tensor-parallel", "2"]),
])
def test_resume_in_a_different_layout(work, src_name, src_n, src_args, dst_n, dst_args):
    """Weights are resharded into the new layout (megapix's own path), the schedule continues: the first resumed
    step's loss equals the uninterrupted run's (Adam moments restart, so later steps may drift slightly)."""
    full = _uninterrupted(work, src_name, src_n, *src_args)
    dst = work / f"{src_name}-to-{'x'.join(dst_args[1::2]) or 'single'}"
    proc = _resume_from(full, dst, dst_n, *dst_args, config=write_config(work, max_steps=STEPS))
    assert "weights resharded" in proc.stdout
    a, recs = losses(full), records(dst)
    assert recs[0]["step"] == STOP + 1
    assert abs(recs[0]["loss"] - a[STOP]) < 1e-4, (recs[0]["loss"], a[STOP])
    assert abs(recs[0]["lr"] - records(full)[STOP]["lr"]) < 1e-12
    assert all(abs(r["loss"] - x) < 5e-2 for r, x in zip(recs, a[STOP:]))


@pytest.mark.parametrize("name", ["tp2xpp2", "single", "pp2"])
def test_export_any_layout_loads_in_transformers(work, name, tmp_path):
    from transformers import ImageGPTForCausalImageModeling

    from megapix import ImageGPT
    from megapix.export import main as export_main

    src = work / name
    if not (src / "metrics.jsonl").exists():
        pytest.skip(f"{name} run not produced in this session")
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
        export_main([str(work / "single"), str(single)])
    ref = ImageGPT.from_pretrained(str(single)).state_dict()
    got = ours.state_dict()
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-3
