"""--report-to wandb: DeepSpeed's wandb monitor on rank 0, the run's config and summary, and a --resume that
continues the same W&B run; offline (WANDB_MODE=offline), so no network is needed. The offline run folder's
.wandb file is read back record by record (wandb's own protobuf messages in its LevelDB-style log)."""
from __future__ import annotations

import glob
import json
import os
import struct

import pytest
from conftest import run, subprocess_env

from megapix import dsconfig
from megapix.config import Config, ConfigError, TrainConfig

TRAIN = "megapix/train.py"


def wandb_records(path: str) -> list:
    """The records of a .wandb file: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, records, pos, chunk = open(path, "rb").read(), [], 7, b""
    assert raw[:4] == b":W&B", raw[:7]
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
    return records


def history(records) -> dict[int, dict]:
    """step -> {key: value} of the logged history."""
    steps: dict[int, dict] = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            steps.setdefault(int(row["_step"]), {}).update(row)
    return steps


def offline_runs(out) -> list[str]:
    return sorted(glob.glob(str(out / "monitor" / "wandb" / "offline-run-*")))


@pytest.mark.slow
def test_offline_run_logs_steps_config_and_summary_and_resume_continues_it(tiny_config, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true")
    args = [TRAIN, "--config", tiny_config, "--out", str(out), "--no-samples", "--eval-every", "0",
            "--report-to", "wandb,csv", "--wandb-project", "megapix-test", "--wandb-group", "ci"]
    first = run([*args, "--max-steps", "3"], env=env, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.load(open(out / "wandb_run.json"))["id"]
    runs = offline_runs(out)
    assert len(runs) == 1 and runs[0].endswith(run_id), runs
    records = wandb_records(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0])
    steps = history(records)
    assert {1, 2, 3} <= set(steps) and all("megapix/loss" in steps[s] for s in (1, 2, 3)), steps
    head = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (head.run_id, head.project, head.run_group, head.display_name) == (run_id, "megapix-test", "ci", "run")
    config = {i.key for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert {"model", "data", "train"} <= config, config
    summary = {i.key for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert "last_loss" in summary, summary
    # --csv went on beside it
    assert glob.glob(str(out / "monitor" / "**" / "*loss*.csv"), recursive=True)

    second = run([TRAIN, "--resume", "--out", str(out), "--max-steps", "5"], env=env, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = offline_runs(out)
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs  # the same W&B run, continued
    steps = history(wandb_records(glob.glob(os.path.join(runs[1], "run-*.wandb"))[0]))
    assert {4, 5} <= set(steps) and not {1, 2, 3} & {s for s in steps if "megapix/loss" in steps[s]}, steps


@pytest.mark.slow
def test_without_the_wandb_package_one_line_and_the_other_monitors_write(tiny_config, tmp_path):
    fake = tmp_path / "no_wandb" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    out = tmp_path / "run"
    env = subprocess_env(PYTHONPATH=str(fake.parent))
    proc = run([TRAIN, "--config", tiny_config, "--out", str(out), "--no-samples", "--eval-every", "0",
                "--max-steps", "2", "--report-to", "wandb,csv"], env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    told = [line for line in proc.stdout.splitlines() if "the wandb package is not installed" in line]
    assert len(told) == 2, proc.stdout[-2000:]  # at the start, and again in the summary
    assert glob.glob(str(out / "monitor" / "**" / "*loss*.csv"), recursive=True)
    assert not (out / "wandb_run.json").exists()


def test_the_deepspeed_json_wandb_section_is_taken_or_refused():
    cfg = Config()
    eff, _ = dsconfig.resolve(cfg, {"wandb": {"enabled": True, "project": "p", "team": "t", "group": "g"}}, 1)
    t = eff.train
    assert (t.report_to, t.wandb_project, t.wandb_entity, t.wandb_group) == ("wandb", "p", "t", "g")
    mine = Config(train=TrainConfig(wandb_project="mine"))
    with pytest.raises(ConfigError, match="wandb.project=\"p\" but --wandb-project"):
        dsconfig.resolve(mine, {"wandb": {"enabled": True, "project": "p"}}, 1)
    with pytest.raises(ConfigError, match="wandb.group=5 must be a string"):
        dsconfig.resolve(cfg, {"wandb": {"group": 5}}, 1)
