"""The pieces of the layout-changing resume that need no training run: the AutoTP restore records cut exactly what
megapix's TP table cuts, the universal folder is bridged for both ZeRO families (idempotently), and which resumes
carry the Adam moments, restart them (--reset-optimizer) or are refused. The resumes themselves:
tests/test_checkpoint.py."""
from __future__ import annotations

import json
import os
import types

import pytest
import torch

from megapix.checkpoint.universal_bridge import bridge_folder, canonical_shapes, restore_meta, tp_restore_meta
from megapix.config import ConfigError, ModelConfig

MODEL = ModelConfig(n_layer=2, d_model=64, n_head=4, resolution=8, bias=True)


@pytest.mark.parametrize("tp", [2, 4])
def test_restore_records_cut_what_the_tp_table_cuts(tp):
    """DeepSpeed's restore (_resolve_autotp_partition, what ZeRO-1/2/3 call with the record) gives every rank
    exactly megapix.parallel.tensor.shard_tensor's piece of every parameter, biases and the head included."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.checkpoint.universal_checkpoint import _resolve_autotp_partition

    from megapix.parallel.tensor import kind_of, shard_tensor

    kinds = set()
    for name, shape in canonical_shapes(MODEL).items():
        full = torch.randn(shape)
        meta = restore_meta(name, shape, MODEL.d_model)
        kinds.add(kind_of(name))
        if meta is None:  # replicated: DeepSpeed takes the whole tensor when the shapes agree
            assert all(shard_tensor(name, full, tp, r).shape == shape for r in range(tp)), name
            continue
        param = types.SimpleNamespace(**{DS_AUTOTP_UC_META: meta})
        for rank in range(tp):
            got = _resolve_autotp_partition(param, {"param": full}, full.flatten(), rank, tp)
            assert torch.equal(got, shard_tensor(name, full, tp, rank).flatten()), (name, rank)
    assert kinds == {"qkv", "column", "row", "vocab", "replicated"}


def test_restore_records_last_one_load():
    """The records and DeepSpeed's TP group are there inside the load only: a later save must not see them."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.utils import groups

    from megapix import ImageGPT
    from megapix.parallel import LossModel

    module = LossModel(ImageGPT(MODEL), loss_fn=None)
    group, before = object(), groups._TENSOR_MODEL_PARALLEL_GROUP
    with tp_restore_meta(module, MODEL, 2, group, is_pipeline=False):
        marked = {n for n, p in module.named_parameters() if hasattr(p, DS_AUTOTP_UC_META)}
        assert groups._TENSOR_MODEL_PARALLEL_GROUP is group
    assert "model.blocks.0.attn.c_attn.weight" in marked and "model.head.weight" in marked
    assert "model.wte.weight" not in marked and "model.blocks.0.attn.c_proj.bias" not in marked
    assert not any(hasattr(p, DS_AUTOTP_UC_META) for p in module.parameters())
    assert groups._TENSOR_MODEL_PARALLEL_GROUP is before


def _zero3_tp1_folder(root) -> str:
    """A converted ZeRO-3 TP 1 checkpoint's shape: bare flat tensors, the step in optimizer_state.pt only."""
    folder = os.path.join(str(root), "global_step3_universal")
    for name, shape in canonical_shapes(MODEL).items():
        os.makedirs(os.path.join(folder, "zero", "model." + name))
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.save(torch.randn(shape).flatten(), os.path.join(folder, "zero", "model." + name, f"{state}.pt"))
    groups = [{"lr": 0.01, "params": [0]}]
    torch.save({"optimizer_state_dict": {"state": {0: {"step": 3}}, "param_groups": groups}, "param_groups": groups},
               os.path.join(folder, "zero", "optimizer_state.pt"))
    for dp in range(2):
        torch.save({"global_steps": 3}, os.path.join(folder, f"zero_pp_rank_{dp}_mp_rank_00_model_states.pt"))
    return folder


def test_bridge_makes_a_zero3_conversion_loadable_by_zero1(tmp_path):
    folder = _zero3_tp1_folder(tmp_path)
    bridge_folder(folder, MODEL)
    zero = os.path.join(folder, "zero")
    entry = torch.load(os.path.join(zero, "model.blocks.0.attn.c_attn.weight", "exp_avg.pt"))
    assert isinstance(entry, dict) and entry["param"].shape == (3 * 64, 64)
    assert torch.load(os.path.join(zero, "model.head.weight", "step.pt")) == 3
    opt = torch.load(os.path.join(zero, "optimizer_state.pt"), weights_only=False)
    assert opt["ds_version"] and opt["optimizer_state_dict"]["state"][0]["step"] == 3
    assert os.path.samefile(os.path.join(folder, "mp_rank_00_model_states.pt"),
                            os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    assert not os.path.exists(os.path.join(folder, "mp_rank_01_model_states.pt"))
    files = {p: os.path.getmtime(os.path.join(b, p)) for b, _, fs in os.walk(folder) for p in fs}
    bridge_folder(folder, MODEL)  # a second resume (or one after a crash) finds it done
    assert {p: os.path.getmtime(os.path.join(b, p)) for b, _, fs in os.walk(folder) for p in fs} == files


def test_bridge_gives_a_zero1_conversion_what_zero3_reads(tmp_path):
    folder = os.path.join(str(tmp_path), "u")
    os.makedirs(os.path.join(folder, "zero", "model.head.weight"))
    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        torch.save({"param": torch.zeros(512, 64)}, os.path.join(folder, "zero", "model.head.weight", f"{state}.pt"))
    torch.save(torch.tensor(5.0), os.path.join(folder, "zero", "model.head.weight", "step.pt"))
    torch.save({"param_groups": [{"lr": 0.01}], "ds_version": "0.19.8"},
               os.path.join(folder, "zero", "optimizer_state.pt"))
    torch.save({"global_steps": 5}, os.path.join(folder, "mp_rank_01_model_states.pt"))
    bridge_folder(folder, MODEL)
    opt = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), weights_only=False)
    assert opt["optimizer_state_dict"]["state"][0]["step"] == 5 and opt["ds_version"] == "0.19.8"
    assert opt["optimizer_state_dict"]["param_groups"] == [{"lr": 0.01}]
    assert os.path.isfile(os.path.join(folder, "zero_pp_rank_0_mp_rank_01_model_states.pt"))


def _layout(zero_stage, tp=1, dp=1, pp=1):
    return types.SimpleNamespace(world=tp * dp * pp, tp=tp, pp=pp, dp=dp, zero_stage=zero_stage)


@pytest.mark.parametrize("saved,here,reset,expect", [
    (_layout(3, tp=2, dp=2), _layout(3, tp=2, dp=2), False, "same"),
    (_layout(3, tp=2, dp=2), _layout(3, tp=2, dp=1), False, "universal"),
    (_layout(1, tp=2, dp=2), _layout(3, tp=2, dp=2), False, "universal"),
    (_layout(3, tp=2, dp=2), _layout(1, tp=2), True, "universal"),  # the flag allows a restart, never forces one
    (_layout(0, tp=2), _layout(1, dp=2), True, "reshard"),
    (_layout(1, dp=2), _layout(0, tp=2), True, "reshard"),
    (_layout(0, tp=2), _layout(1, dp=2), False, "--reset-optimizer to resume"),
    (_layout(1, dp=2), _layout(0, tp=2), False, "--reset-optimizer to resume"),
    (_layout(0, tp=2), _layout(3, dp=2), True, "--zero-stage 1 --reset-optimizer"),
])
def test_which_resume_carries_the_moments(tmp_path, saved, here, reset, expect):
    from megapix.checkpoint.reshard import how_to_resume
    from megapix.checkpoint.tags import layout_record

    os.makedirs(tmp_path / "global_step3")
    (tmp_path / "global_step3" / "layout.json").write_text(json.dumps(layout_record(saved, 3)))
    if expect in ("same", "universal", "reshard"):
        assert how_to_resume(str(tmp_path), "global_step3", here, reset)[0] == expect
    else:
        with pytest.raises(ConfigError, match=expect.replace("-", r"\-")) as e:
            how_to_resume(str(tmp_path), "global_step3", here, reset)
        assert "\n" not in str(e.value) and "ZeRO-0" in str(e.value)
