"""Config building and loading: presets, YAML/JSON files, and one clear ConfigError for each bad value."""
from __future__ import annotations

import json
import os
import re

import pytest

from megapix.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, load_config, model_preset


def test_presets_and_overrides():
    c = model_preset("igpt-l")
    assert (c.n_layer, c.d_model, c.n_head, c.resolution, c.n_ctx, c.head_dim) == (48, 1536, 16, 32, 1024, 96)
    assert model_preset("igpt-xl").n_positions == 4096
    assert model_preset("tiny", d_model=64, n_head=2).head_dim == 32
    assert model_preset("tiny").vocab_size == 512


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown model preset 'igpt-q'.*igpt-s.*tiny"):
        model_preset("igpt-q")
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'.*igpt-s"):
        Config.from_dict({"model": {"preset": "huge"}})


@pytest.mark.parametrize("section,key", [("model", "n_layers"), ("train", "learning_rate"), ("data", "path")])
def test_unknown_key_names_the_valid_ones(section, key):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({section: {key: 1}})
    msg = str(e.value)
    assert f"unknown key(s) ['{key}']" in msg and "valid keys are" in msg and section in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['optim'\]"):
        Config.from_dict({"optim": {}})


@pytest.mark.parametrize("section,raw,fragment", [
    ("model", {"n_layer": 0}, "model.n_layer=0 must be a positive number"),
    ("model", {"d_model": -8}, "model.d_model=-8 must be a positive number"),
    ("model", {"n_layer": "four"}, "model.n_layer='four' must be a positive number"),
    ("model", {"n_layer": True}, "model.n_layer=True must be a positive number"),
    ("model", {"d_model": 100, "n_head": 3}, "not divisible by model.n_head=3"),
    ("model", {"resolution": 64, "n_positions": 1024}, "needs 4096 positions"),
    ("model", {"objective": "mlm"}, "model.objective='mlm' is not one of ar, bert"),
    ("model", {"kernels": "cuda"}, "model.kernels='cuda' is not one of auto, triton, torch"),
    ("model", {"mask_rate": 1.5}, "model.mask_rate=1.5 must lie in (0, 1)"),
    ("train", {"lr": 0}, "train.lr=0 must be a positive number"),
    ("train", {"global_batch": -1}, "train.global_batch=-1 must be a positive number"),
    ("train", {"micro_batch": 0}, "train.micro_batch=0 must be positive"),
    ("train", {"zero_stage": 4}, "train.zero_stage=4 must be 0, 1, 2 or 3"),
    ("train", {"precision": "fp16"}, "train.precision='fp16' is not one of auto, bf16, fp32"),
    ("train", {"save_every": -5}, "train.save_every=-5 must be >= 0"),
    ("train", {"time_budget": -1.0}, "train.time_budget=-1.0 must be >= 0"),
    ("train", {"collective_timeout": 0}, "train.collective_timeout=0 must be a positive number"),
    ("data", {"val_fraction": 1.0}, "data.val_fraction=1.0 must lie in [0, 1)"),
    ("data", {"source": ""}, "data.source must be a non-empty string"),
])
def test_bad_values_raise_a_helpful_config_error(section, raw, fragment):
    with pytest.raises(ConfigError) as e:
        Config.from_dict({section: raw}, where="my.yaml")
    msg = str(e.value)
    assert fragment in msg, msg
    assert msg.startswith(f"my.yaml: {section}"), msg  # says where the value came from
    assert "\n" not in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError):
        ModelConfig(n_head=0)
    with pytest.raises(ConfigError):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError):
        DataConfig(val_fraction=-0.1)


YAML = """\
model:
  preset: igpt-s
  objective: bert
  n_layer: 6
data:
  source: cifar10:/data/cifar
  val_fraction: 0.05
train:
  lr: 0.001
  global_batch: 32
"""


def check_loaded(c: Config):
    assert (c.model.n_layer, c.model.d_model, c.model.n_head, c.model.resolution) == (6, 512, 8, 32)
    assert c.model.objective == "bert"
    assert c.data.source == "cifar10:/data/cifar" and c.data.val_fraction == 0.05
    assert c.train.lr == 0.001 and c.train.global_batch == 32
    assert c.train.beta2 == 0.95 and c.train.max_steps == TrainConfig().max_steps  # defaults kept


def test_yaml_loading(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    check_loaded(load_config(str(path)))


def test_json_loading_and_round_trip(tmp_path):
    import yaml

    path = tmp_path / "run.json"
    path.write_text(json.dumps(yaml.safe_load(YAML)))
    c = load_config(str(path))
    check_loaded(c)
    again = tmp_path / "again.json"
    again.write_text(json.dumps(c.to_dict()))
    assert load_config(str(again)) == c


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path)) == Config()


@pytest.mark.parametrize("name,text,fragment", [
    ("missing.yaml", None, "does not exist"),
    ("bad.yaml", "model: [unclosed", "could not be parsed"),
    ("bad.json", "{not json", "could not be parsed"),
    ("list.yaml", "- 1\n- 2\n", "expected a mapping"),
    ("key.yaml", "model: {preset: tiny, dmodel: 64}\n", "unknown key(s) ['dmodel']"),
    ("preset.yaml", "model: {preset: igpt-xxl}\n", "unknown model preset 'igpt-xxl'"),
])
def test_bad_files(tmp_path, name, text, fragment):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert fragment in str(e.value) and name in str(e.value), str(e.value)


# ---- flags generated from the dataclasses (megapix.cliargs) ----
import argparse  # noqa: E402
import dataclasses  # noqa: E402

from megapix import cliargs  # noqa: E402
from megapix.commands.options import ExportConfig, ExtractConfig, PrepareConfig, ProbeConfig, SampleConfig  # noqa: E402
from megapix.commands.train import build_parser, config_from_args  # noqa: E402

COMMAND_CONFIGS = [ExtractConfig, ProbeConfig, SampleConfig, ExportConfig, PrepareConfig]


def _parsers():
    yield "train", build_parser()
    for cls in COMMAND_CONFIGS:
        p = cliargs.command_parser(cls.__name__, "")
        cliargs.add_fields(p, cls)
        yield cls.__name__, p


def test_every_flag_has_help_with_its_default():
    for name, p in _parsers():
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if not action.option_strings:  # a positional spelling of a flag: "same as --x"
                assert action.help.startswith("same as --"), (name, action.dest)
                continue
            assert action.help and "(default: " in action.help, (name, action.option_strings, action.help)


def test_every_config_field_has_a_flag():
    p = build_parser()
    dests = {a.dest for a in p._actions}
    for sec, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            assert f"{sec}.{f.name}" in dests, f.name
    flags = {o for a in p._actions for o in a.option_strings}
    for kept in ("--model", "--data", "--palette", "--max-steps", "--global-batch", "--out", "--resume",
                 "--tensor-parallel", "--pipeline-parallel", "--zero-stage", "--kernels", "--precision",
                 "--deepspeed_config", "--deepspeed-config", "--local_rank", "--config", "--no-samples",
                 "--log-every", "--num-workers", "--no-augment", "--activation-checkpointing", "--version"):
        assert kept in flags, kept


def test_types_choices_and_booleans():
    args = build_parser().parse_args(["--lr", "1e-3", "--zero-stage", "2", "--no-augment", "--activation-checkpointing",
                                      "--kernels", "torch", "--micro-batch", "4", "--local_rank", "0"])
    cfg = config_from_args(args)
    assert (cfg.train.lr, cfg.train.zero_stage, cfg.data.augment, cfg.train.activation_checkpointing) == \
        (1e-3, 2, False, True)
    assert cfg.model.kernels == "torch" and cfg.train.micro_batch == 4
    assert cfg.explicit == {"train.lr", "train.zero_stage", "data.augment", "train.activation_checkpointing",
                            "model.kernels", "train.micro_batch"}


@pytest.mark.parametrize("argv,words", [
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (["--lr", "inf"], "argument --lr: 'inf' is not a finite number"),
    (["--max-steps", "ten"], "argument --max-steps: 'ten' is not an integer"),
    (["--zero-stage", "5"], "argument --zero-stage: invalid choice"),
])
def test_bad_flag_values_are_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("megapix train: error:"), err


def test_precedence_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny, n_layer: 3}\ntrain: {lr: 0.001, max_steps: 7}\n")
    cfg = config_from_args(build_parser().parse_args(["--config", str(path), "--lr", "0.002", "--d-model", "64"]))
    assert (cfg.model.n_layer, cfg.model.d_model) == (3, 64)  # file, then flag
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.global_batch) == (0.002, 7, 64)  # flag, file, default
    assert {"train.lr", "train.max_steps", "model.n_layer", "model.d_model"} <= cfg.explicit
    assert "train.global_batch" not in cfg.explicit
    # --model replaces the file's preset, beneath the file's model fields: a flag never replaces a section
    cfg = config_from_args(build_parser().parse_args(["--config", str(path), "--model", "small"]))
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.resolution) == (3, 256, 16)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'.*igpt-s"):
        config_from_args(build_parser().parse_args(["--model", "huge"]))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIGITS = os.path.join(ROOT, "configs", "tiny_digits.yaml")


def test_model_flag_keeps_the_config_files_resolution():
    """The trap of issue 16: `--config configs/tiny_digits.yaml --model tiny` keeps the file's 10x10."""
    from megapix.commands.train import requested_config

    cfg = requested_config(build_parser().parse_args(["--config", TINY_DIGITS, "--model", "tiny"]))
    assert cfg.model.resolution == 10 and cfg.data.source == "digits-shifted"


def test_bare_train_is_make_train():
    """`deepspeed megapix/train.py` with no flags trains what `make train` trains (configs/tiny_digits.yaml), and
    a preset flag alone takes its own resolution."""
    from megapix.config import DEFAULT_RUN
    from megapix.commands.train import requested_config

    make_train = load_config(TINY_DIGITS)
    assert requested_config(build_parser().parse_args([])) == make_train == Config.from_dict(DEFAULT_RUN)
    assert "--config configs/tiny_digits.yaml" in open(os.path.join(ROOT, "Makefile")).read()
    assert requested_config(build_parser().parse_args(["--model", "igpt-s"])).model.resolution == 32


def test_config_file_is_validated_whole_even_where_a_flag_overrides_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {lr: -1}\n")
    with pytest.raises(ConfigError, match="train.lr=-1 must be a positive number"):
        config_from_args(build_parser().parse_args(["--config", str(path), "--lr", "0.01"]))


def test_explicit_is_per_instance():
    a = Config.from_dict({"train": {"lr": 0.01}})
    assert a.explicit == {"train.lr"} and Config().explicit == frozenset()
    assert "explicit" not in a.to_dict() and a == Config(train=TrainConfig(lr=0.01))


@pytest.mark.parametrize("raw,fragment", [
    ({"train": {"lr": float("nan")}}, "train.lr=nan is not a finite number"),
    ({"train": {"lr": float("inf")}}, "train.lr=inf"),
    ({"train": {"seed": -1}}, "train.seed=-1 must be >= 0"),
    ({"train": {"beta2": 1.0}}, "train.beta2=1.0 must lie in [0, 1)"),
    ({"train": {"grad_clip": float("inf")}}, "train.grad_clip=inf is not a finite number"),
    ({"data": {"num_workers": -2}}, "data.num_workers=-2 must be an integer >= 0"),
])
def test_non_finite_and_negative_values(raw, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Config.from_dict(raw)


def test_positional_spelling_still_accepted_and_must_agree():
    p = cliargs.command_parser("megapix export", "")
    dests = cliargs.add_fields(p, ExportConfig)
    flag = cliargs.build(ExportConfig, cliargs.given(p.parse_args(["--checkpoint", "a", "--out", "b"]), dests))
    old = cliargs.build(ExportConfig, cliargs.given(p.parse_args(["a", "b"]), dests))
    assert flag == old == ExportConfig(checkpoint="a", out="b")
    with pytest.raises(ConfigError, match="checkpoint given twice"):
        cliargs.given(p.parse_args(["a", "--checkpoint", "c", "--out", "b"]), dests)
    with pytest.raises(ConfigError, match="--out is required"):
        cliargs.build(ExportConfig, cliargs.given(p.parse_args(["a"]), dests))


def test_check_out_path(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert cliargs.check_out_path(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    with pytest.raises(ConfigError, match="which is a regular file"):
        cliargs.check_out_path(str(f / "run"))
    with pytest.raises(ConfigError, match="which is a regular file"):
        cliargs.check_out_path(str(f / "a" / "b"))


def test_kernels_triton_needs_cuda_or_the_interpreter(monkeypatch):
    import torch

    from megapix.config import check_kernels_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="--kernels triton needs a CUDA GPU.*TRITON_INTERPRET=1"):
        check_kernels_available("triton")
    check_kernels_available("auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernels_available("triton")


def test_resume_checks_name_contradictions_and_allow_steering():
    """A resume's settings against the saved run's (checkpoint.manager): model/data/batch/optimiser/seed changes
    contradict it (one line naming each with both values, or --allow-changed); steer-from-here flags pass, and a
    new --max-steps says where the schedule now ends."""
    from megapix.checkpoint.manager import STEER_FLAGS, check_resume_config

    saved = Config().to_dict()
    assert check_resume_config(saved, Config(), "runs/x", allow_changed=False) == []
    steer = Config(train=TrainConfig(max_steps=600, save_every=5, zero_stage=1))
    notes = check_resume_config(saved, steer, "runs/x", allow_changed=False)
    assert any("the schedule now ends at step 600 (the saved run's ended at 300)" in n for n in notes)
    assert any("train.save_every 0 -> 5" in n and "train.zero_stage None -> 1" in n for n in notes)
    changed = Config(train=TrainConfig(seed=4, global_batch=32), data=DataConfig(source="synthetic"))
    with pytest.raises(ConfigError) as e:
        check_resume_config(saved, changed, "runs/x", allow_changed=False)
    msg = str(e.value)
    for words in ("train.seed 0 -> 4", "train.global_batch 64 -> 32", "data.source 'digits' -> 'synthetic'",
                  "runs/x/config.json", "--allow-changed"):
        assert words in msg, msg
    notes = check_resume_config(saved, changed, "runs/x", allow_changed=True)
    assert notes and notes[0].startswith("--allow-changed: continuing runs/x with") and "train.seed 0 -> 4" in notes[0]
    assert "--max-steps" in STEER_FLAGS and "--save-every" in STEER_FLAGS and "--time-budget" in STEER_FLAGS
    assert "--seed" not in STEER_FLAGS and "--global-batch" not in STEER_FLAGS
    help_text = " ".join(build_parser().format_help().split())
    assert "--allow-changed" in help_text and "--resume-if-exists" in help_text and "--time-budget, " in help_text


def test_a_record_from_before_a_later_setting_resumes_with_its_default_and_others_stay_required():
    """A run record an earlier megapix wrote lacks the settings added since (config.LATER_FIELDS): it is whole,
    and those settings take the defaults that megapix ran with. Any other missing field still refuses it."""
    from megapix.config import LATER_FIELDS, check_record_config

    raw = Config().to_dict()
    for name in LATER_FIELDS["train"]:
        del raw["train"][name]
    cfg = check_record_config(raw, "old/config.json")
    assert all(getattr(cfg.train, n) == getattr(TrainConfig(), n) for n in LATER_FIELDS["train"])
    del raw["train"]["max_steps"]
    with pytest.raises(ConfigError, match="old/config.json: field 'train.max_steps' is missing"):
        check_record_config(raw, "old/config.json")
