"""The DeepSpeed JSON is authoritative: a setting made in both places that disagrees is an error naming both, a
setting made only in the JSON is taken into megapix's effective config, unsupported sections are refused."""
from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import pytest

from megapix.config import Config, ConfigError, load_config
from megapix.dsconfig import load_ds_config, make_ds_config, resolve, zero_stage_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, obj, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def user(**train) -> Config:
    """A config as a user wrote it (the keys count as set)."""
    return Config.from_dict({"train": train})


def test_the_issue_case_json_batch_is_used_and_its_optimizer_refused(tmp_path):
    # issue 9: this JSON trained with global batch 64 (micro 64), lr 0.003, as if it were not there
    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01}},
          "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}}}
    with pytest.raises(ConfigError) as e:
        resolve(Config(), write(tmp_path, ds), world=1)
    msg = str(e.value)
    assert "optimizer section" in msg and "--lr 0.0001 --beta1 0.9 --beta2 0.999 --weight-decay 0.01" in msg
    del ds["optimizer"]
    with pytest.raises(ConfigError, match=r"scheduler section.*--warmup-steps 10 --max-steps 100"):
        resolve(Config(), write(tmp_path, ds), world=1)
    del ds["scheduler"]
    cfg, _ = resolve(Config(), write(tmp_path, ds), world=1)
    assert (cfg.train.global_batch, cfg.train.micro_batch) == (32, 8)
    assert cfg.from_deepspeed == {"global_batch", "micro_batch"}


def test_json_only_values_are_taken(tmp_path):
    ds = {"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    cfg, _ = resolve(Config(), write(tmp_path, ds), world=1)
    t = cfg.train
    assert (t.grad_clip, t.zero_stage, t.precision) == (0.5, 2, "bf16")
    final = make_ds_config(cfg, load_ds_config(write(tmp_path, ds)), SimpleNamespace(dp=1, zero_stage=2), 64)
    assert final["gradient_clipping"] == 0.5 and final["bf16"]["enabled"] is True
    assert (final["train_batch_size"], final["train_micro_batch_size_per_gpu"], final["gradient_accumulation_steps"]) \
        == (64, 64, 1)


@pytest.mark.parametrize("ds,train,words", [
    ({"train_batch_size": 32}, {"global_batch": 64}, ["train_batch_size=32", "--global-batch", "64"]),
    ({"train_micro_batch_size_per_gpu": 4}, {"micro_batch": 8}, ["train_micro_batch_size_per_gpu=4", "--micro-batch"]),
    ({"gradient_clipping": 1.0}, {"grad_clip": 0.5}, ["gradient_clipping=1.0", "--grad-clip", "0.5"]),
    ({"zero_optimization": {"stage": 3}}, {"zero_stage": 1}, ["zero_optimization.stage=3", "--zero-stage", "1"]),
    ({"bf16": {"enabled": True}}, {"precision": "fp32"}, ["bf16.enabled=true", "--precision", "fp32"]),
    ({"bf16": {"enabled": False}}, {"precision": "bf16"}, ["bf16.enabled=false", "--precision", "bf16"]),
    # set to the default value in a config file still counts as set
    ({"train_batch_size": 32}, {"global_batch": 64}, ["train_batch_size=32"]),
    ({"gradient_clipping": 1.0}, {"grad_clip": 0.0}, ["gradient_clipping=1.0", "--grad-clip"]),
])
def test_a_value_set_in_both_that_disagrees_is_an_error_naming_both(tmp_path, ds, train, words):
    with pytest.raises(ConfigError) as e:
        resolve(user(**train), write(tmp_path, ds), world=1)
    msg = str(e.value)
    assert "ds.json" in msg and all(w in msg for w in words), msg
    assert "\n" not in msg


def test_values_set_in_both_that_agree_are_fine(tmp_path):
    ds = {"train_batch_size": 64, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
          "bf16": {"enabled": False}}
    cfg, _ = resolve(user(global_batch=64, grad_clip=1.0, zero_stage=1, precision="fp32"), write(tmp_path, ds), 1)
    assert (cfg.train.global_batch, cfg.train.grad_clip, cfg.train.zero_stage) == (64, 1.0, 1)


def test_api_configs_count_non_default_values_as_set(tmp_path):
    from megapix.config import TrainConfig

    cfg = Config(train=TrainConfig(global_batch=8))  # built in Python: no record of what was "given"
    with pytest.raises(ConfigError, match="train_batch_size=64"):
        resolve(cfg, write(tmp_path, {"train_batch_size": 64}), world=1)


@pytest.mark.parametrize("ds,train,world,expect", [
    ({"gradient_accumulation_steps": 4}, {"global_batch": 64}, 2, (64, 8)),          # micro derived
    ({"gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2}, {}, 4, (32, 2)),  # batch derived
    ({"gradient_accumulation_steps": 2}, {"global_batch": 64, "micro_batch": 16}, 2, (64, 16)),  # consistent
])
def test_gradient_accumulation(tmp_path, ds, train, world, expect):
    cfg, _ = resolve(user(**train), write(tmp_path, ds), world=world)
    assert (cfg.train.global_batch, cfg.train.micro_batch) == expect


@pytest.mark.parametrize("ds,train,world,words", [
    ({"gradient_accumulation_steps": 3}, {"global_batch": 64}, 1, "does not divide the global batch 64"),
    ({"gradient_accumulation_steps": 4}, {"global_batch": 64, "micro_batch": 8}, 1, "set two of the three"),
])
def test_gradient_accumulation_conflicts(tmp_path, ds, train, world, words):
    with pytest.raises(ConfigError, match=words):
        resolve(user(**train), write(tmp_path, ds), world=world)


@pytest.mark.parametrize("text,words", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"zero_optimization": {"stage": 7}}', "zero_optimization.stage=7 is not a ZeRO stage"),
    ('{"zero_optimization": {"stage": "two"}}', "is not a ZeRO stage"),
    ('{"zero_optimization": 2}', "zero_optimization must be an object"),
    ('{"fp16": {"enabled": true}}', "bf16 or fp32, not fp16"),
    ('{"amp": {"enabled": true}}', "not amp"),
    ('{"train_batch_size": 0}', "train_batch_size=0 must be a positive integer"),
    ('{"gradient_clipping": -1}', "gradient_clipping=-1 must be a number >= 0"),
    ("{oops", "is not valid JSON"),
])
def test_bad_json_is_one_line(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_ds_config(str(path))
    assert words in str(e.value) and "bad.json" in str(e.value) and "\n" not in str(e.value)


def test_a_disabled_fp16_section_is_harmless(tmp_path):
    ds = load_ds_config(write(tmp_path, {"fp16": {"enabled": False}}))
    cfg, ds = resolve(Config(), ds, world=1)
    assert "fp16" not in make_ds_config(cfg, ds, SimpleNamespace(dp=1, zero_stage=0), 64)


def test_make_ds_config_never_overrides(tmp_path):
    """Handed a config that was not resolved against the JSON, the builder refuses instead of overwriting."""
    ds = load_ds_config(write(tmp_path, {"train_batch_size": 32}))
    with pytest.raises(ConfigError, match="train_batch_size=32 but this run needs 64"):
        make_ds_config(Config(), ds, SimpleNamespace(dp=1, zero_stage=0), 64)


def test_zero_stage_of():
    assert zero_stage_of(Config(), {}) == 0
    assert zero_stage_of(Config(), {"zero_optimization": {"stage": 2}}) == 2
    assert zero_stage_of(user(zero_stage=3), {}) == 3


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json"))), ids=os.path.basename)
def test_shipped_json_combines_with_shipped_configs(path):
    """docs/training.md's `--config configs/igpt_s_cifar10.yaml --deepspeed_config ds_configs/zero2.json` is valid."""
    for yaml_path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        cfg = load_config(yaml_path)
        if "pipeline" in os.path.basename(path) or cfg.train.pipeline_parallel > 1:
            continue  # layout-specific pairs are exercised by test_parallel_configs
        with open(path) as f:
            json_stage = json.load(f).get("zero_optimization", {}).get("stage")
        if cfg.train.zero_stage is not None and json_stage is not None and json_stage != cfg.train.zero_stage:
            # a run config that pins its ZeRO stage (igpt_xl_imagenet.yaml: 3) meets a JSON pinning another:
            # the one thing that must not combine silently
            with pytest.raises(ConfigError, match="zero_optimization.stage"):
                resolve(cfg, path, world=8)
            continue
        resolve(cfg, path, world=8)


def test_effective_config_is_described_and_recorded(tmp_path):
    from megapix.dsconfig import describe, run_record

    cfg, ds = resolve(user(global_batch=16), write(tmp_path, {"gradient_clipping": 0.5}), world=1)
    final = make_ds_config(cfg, ds, SimpleNamespace(dp=1, zero_stage=0), 8)
    text = describe(cfg, final, "ds.json")
    assert "taken from it: grad_clip" in text and "batch 16 = micro 8 x accumulation 2" in text
    assert len(text.splitlines()) == 5  # header + model, data, train, deepspeed
    rec = run_record(cfg, final, "ds.json")
    assert rec["config"]["train"]["grad_clip"] == 0.5 and rec["deepspeed"]["gradient_clipping"] == 0.5
    assert rec["set_by_user"] == ["train.global_batch"] and rec["taken_from_deepspeed"] == ["grad_clip"]
    json.dumps(rec)


def test_run_record_of_another_run_is_not_replaced(tmp_path):
    from megapix.dsconfig import run_record
    from megapix.commands.train import check_run_record
    from megapix.utils import write_json

    path = str(tmp_path / "config.json")
    first = user(max_steps=10)
    check_run_record(path, first)  # nothing there yet
    write_json(path, run_record(first, None, None))
    check_run_record(path, first)  # the same run again (e.g. it failed before its first checkpoint)
    with pytest.raises(ConfigError, match=r"holds another run .*train\.max_steps: 10 -> 20.*--resume"):
        check_run_record(path, user(max_steps=20))
    # a resume compares its settings with the record instead (checkpoint.manager.check_resume_config)
    (tmp_path / "config.json").write_text("not json")
    with pytest.raises(ConfigError, match="not a megapix run record"):
        check_run_record(path, first)


def test_report_to_sets_deepspeed_monitors_and_agrees_with_the_json(tmp_path, monkeypatch, capsys):
    import megapix.dsconfig as dsconfig

    lay = SimpleNamespace(dp=1, zero_stage=0)
    cfg, ds = resolve(user(report_to="csv", out=str(tmp_path / "run")), {}, world=1)
    final = make_ds_config(cfg, ds, lay, 64)
    assert final["csv_monitor"]["enabled"] is True and "tensorboard" not in final
    assert final["csv_monitor"]["output_path"] == str(tmp_path / "run" / "monitor")
    assert "tensorboard" not in capsys.readouterr().out
    assert "csv_monitor" not in make_ds_config(*resolve(Config(), {}, world=1), lay, 64)  # default: none

    # tensorboard requested but not installed: one line naming the package; csv still on
    monkeypatch.setattr(dsconfig, "_tensorboard_available", lambda: False)
    final = make_ds_config(*resolve(user(report_to="csv,tensorboard"), {}, world=1), lay, 64)
    assert final["tensorboard"]["enabled"] is False and final["csv_monitor"]["enabled"] is True
    lines = [line for line in capsys.readouterr().out.splitlines() if "tensorboard" in line]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0], lines
    monkeypatch.setattr(dsconfig, "_tensorboard_available", lambda: True)
    final = make_ds_config(*resolve(user(report_to="tensorboard"), {}, world=1), lay, 64)
    assert final["tensorboard"]["enabled"] is True and "csv_monitor" not in final

    # the JSON's monitors are taken when --report-to is not set; set in both and different: an error naming both
    cfg, _ = resolve(Config(), write(tmp_path, {"csv_monitor": {"enabled": True}}), world=1)
    assert cfg.train.report_to == "csv" and "report_to" in cfg.from_deepspeed
    cfg, _ = resolve(user(report_to="csv"), write(tmp_path, {"csv_monitor": {"enabled": True},
                                                           "tensorboard": {"enabled": False}}), world=1)
    assert cfg.train.report_to == "csv"
    with pytest.raises(ConfigError) as e:
        resolve(user(report_to="csv"), write(tmp_path, {"tensorboard": {"enabled": True}}), world=1)
    assert "tensorboard.enabled=true" in str(e.value) and "--report-to" in str(e.value)
    with pytest.raises(ConfigError, match="tensorboard must be an object"):
        resolve(Config(), write(tmp_path, {"tensorboard": True}), world=1)
    for bad in ("comet", "csv,none", ""):
        with pytest.raises(ConfigError, match="report_to"):
            user(report_to=bad)
    assert user(report_to=" csv , tensorboard").train.report_to == "tensorboard,csv"
