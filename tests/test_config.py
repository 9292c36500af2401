"""Config building and loading: presets, YAML/JSON files, and one clear ConfigError for each bad value."""
from __future__ import annotations

import json

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
