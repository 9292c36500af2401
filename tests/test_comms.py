"""The planner's communication terms (megapix.plan.comm_bytes) against what the engine sends in one step, recorded by
megapix.plan.comms (every torch.distributed collective and p2p call, DeepSpeed's included): TP2, PP2, DP2 under
ZeRO-0/1/2/3, and TP2 x PP2 x DP2, tiny preset in fp32 on CPU, one launch per world size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megapix.config import model_preset
from megapix.plan.comms import bytes_by_kind
from megapix.parallel.layout import Layout
from megapix.plan import comm_bytes
from test_parallel_helpers import launch_layouts, run_train, torchrun_cmd

pytestmark = pytest.mark.slow  # every test here starts training runs

TOLERANCE = 0.05

WORKER = r'''
import json, os, sys
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
import numpy as np
from megapix.parallel.launch import init_distributed
init_distributed()
import torch.distributed as dist
from megapix.config import Config, DataConfig, TrainConfig, model_preset
from megapix.engine import Trainer
from megapix.plan.comms import CommsRecorder, layout_groups

rank, world = dist.get_rank(), dist.get_world_size()
work = os.environ["WORK"]
palette = os.path.join(work, "palette.npy")
if rank == 0 and not os.path.exists(palette):
    np.save(palette, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    # ZeRO-3 with every parameter partitioned: tiny's are all below DeepSpeed's default persistence threshold
    with open(os.path.join(work, "zero3_gather_all.json"), "w") as f:
        json.dump({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}, f)
dist.barrier()
for spec in json.loads(os.environ["LAYOUTS"]):
    dp = world // (spec["tp"] * spec["pp"] * spec.get("cp", 1))
    cfg = Config(model=model_preset("tiny", kernels="torch"), data=DataConfig(source="synthetic:32", palette=palette),
                 train=TrainConfig(global_batch=4 * dp, micro_batch=2, max_steps=2, eval_every=0,
                                   zero_stage=spec["zero"], tensor_parallel=spec["tp"], pipeline_parallel=spec["pp"],
                                   precision="fp32", sequence_parallel=spec.get("sp", False),
                                   context_parallel=spec.get("cp", 1), out=os.path.join(work, "run")))
    ds = os.path.join(work, "zero3_gather_all.json") if spec["zero"] == 3 else None
    tr = Trainer(cfg, ds)
    tr.train_step(tr._next_batches())  # the first step builds DeepSpeed's buffers; record the second
    tr.step += 1
    batches = tr._next_batches()
    with CommsRecorder() as rec:
        tr.train_step(batches)
    row = dict(spec, rank=rank, stage=tr.layout.pp_rank,
               groups=layout_groups(tr.layout.topology, rank, tr.layout.cp_group), calls=rec.summary())
    with open(os.path.join(work, f"rows-{world}-{rank}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    del tr
'''

LAUNCHES = {  # world size -> layouts (data-parallel first: DeepSpeed keeps the last engine's mpu in a global)
    2: [dict(tp=1, pp=1, zero=z) for z in (0, 1, 2, 3)] + [dict(tp=1, pp=1, zero=1, cp=2), dict(tp=2, pp=1, zero=0),
                                                           dict(tp=1, pp=2, zero=0),
                                                           dict(tp=2, pp=1, zero=0, sp=True)],
    8: [dict(tp=2, pp=2, zero=1)],
}


def measured(row) -> dict:
    """Bytes per group kind: p2p messages are pp (the CP ring's: cp); collectives are classified by their group's
    ranks."""
    return bytes_by_kind(row["calls"], row["groups"])


@pytest.fixture(scope="module")
def comms_rows(tmp_path_factory):
    return launch_layouts(tmp_path_factory.mktemp("comms"), WORKER, LAUNCHES)


def planned(row) -> dict:
    cp = row.get("cp", 1)
    lay = Layout(tp=row["tp"], pp=row["pp"], dp=row["world"] // (row["tp"] * row["pp"] * cp), zero_stage=row["zero"],
                 micro_batch=2, sp=row.get("sp", False), cp=cp)
    stage = comm_bytes(model_preset("tiny"), lay, 4 * lay.dp, nbytes=4)[row["stage"]]
    return {key: stage[key] for key in ("tp", "pp", "dp_reduce", "dp_gather", "cp")}


def check(rows):
    assert rows
    for r in rows:
        got, want = measured(r), planned(r)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=TOLERANCE, abs=1), (r["tp"], r["pp"], r["zero"],
                                                                               r["rank"], key, got, want)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_dp2_bytes_per_step_equal_the_planners(comms_rows, zero):
    check([r for r in comms_rows if r["world"] == 2 and r["tp"] == r["pp"] == 1 and r["zero"] == zero
           and r.get("cp", 1) == 1])


def test_tp2_and_pp2_bytes_per_step_equal_the_planners(comms_rows):
    rows = [r for r in comms_rows if r["world"] == 2 and (r["tp"] == 2 or r["pp"] == 2) and not r.get("sp")]
    assert {(r["tp"], r["pp"]) for r in rows} == {(2, 1), (1, 2)}
    check(rows)
    # the TP all-reduces split between forward (row-parallel outputs) and backward (column-parallel inputs)
    tp = next(r for r in rows if r["tp"] == 2)
    assert {c["in_backward"] for c in tp["calls"] if c["op"] == "all_reduce"} == {True, False}


def test_tp2_pp2_dp2_bytes_per_step_equal_the_planners(comms_rows):
    rows = [r for r in comms_rows if r["world"] == 8]
    assert len(rows) == 8
    check(rows)


def test_profile_comms_writes_what_the_recorder_records(comms_rows, tmp_path):
    """`train --profile-comms 1` on the fixture's DP2 ZeRO-1 run (tiny, fp32, 2 steps): rank 0 writes
    <out>/comms_profile.json with step 2's calls on every rank, the ones the recorder saw in the fixture's second
    step, their bytes by kind beside the planner's, and DeepSpeed's comms_logger record of its own calls."""
    palette = tmp_path / "palette.npy"
    np.save(palette, np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model": {"preset": "tiny", "kernels": "torch"}, "data": {"source": "synthetic:32", "palette": str(palette)},
        "train": {"global_batch": 8, "micro_batch": 2, "max_steps": 2, "eval_every": 0, "precision": "fp32",
                  "zero_stage": 1}}))
    proc = run_train(tmp_path / "run", 2, "--profile-comms", "1", config=str(config), cmd=torchrun_cmd(2))
    assert "communication profile of step 2 on 2 rank(s)" in proc.stdout, proc.stdout[-2000:]
    prof = json.loads((tmp_path / "run" / "comms_profile.json").read_text())
    assert prof["steps"] == [2] and [r["rank"] for r in prof["ranks"]] == [0, 1]
    fixture = {r["rank"]: r for r in comms_rows if r["world"] == 2 and r["tp"] == r["pp"] == 1 and r["zero"] == 1
               and r.get("cp", 1) == 1}
    for rank in prof["ranks"]:
        merged = {}  # the file's rows are per message size: merged per (op, group, backward) as the fixture's
        for c in rank["calls"]:
            row = merged.setdefault((c["op"], tuple(c["ranks"]), c["in_backward"]), [0, 0])
            row[0] += c["calls"]
            row[1] += c["bytes"]
        want = {(c["op"], tuple(c["ranks"]), c["in_backward"]): [c["calls"], c["bytes"]]
                for c in fixture[rank["rank"]]["calls"]}
        assert merged == want, rank["rank"]
        for key, planned in rank["planned_per_step"].items():
            assert rank["bytes_per_step"][key] == pytest.approx(planned, rel=TOLERANCE, abs=1), key
        assert rank["bytes_per_step"]["dp_reduce"] > 0 and rank["bytes_per_step"]["dp_gather"] > 0
        ds = rank["deepspeed_comms_logger"]
        assert ds and {r["op"] for r in ds} <= {c["op"] for c in rank["calls"]}
        assert all(r["calls"] > 0 and r["total_ms"] >= 0 for r in ds)


def test_tp2_sequence_parallel_bytes_per_step_equal_the_planners(comms_rows):
    """SP's all-gathers and reduce-scatters (gloo has no reduce_scatter: an all-reduce of the same input, so the same
    payload) and the chunk-applied parameters' gradient all-reduces, against comm_bytes; more bytes than TP's
    all-reduces (the backward re-gathers each column-parallel input), each half an all-reduce's ring cost."""
    rows = [r for r in comms_rows if r.get("sp")]
    assert len(rows) == 2
    check(rows)
    assert "all_gather" in {c["op"] for c in rows[0]["calls"]}
    tp_only = next(r for r in comms_rows if r["tp"] == 2 and not r.get("sp") and r["rank"] == rows[0]["rank"])
    assert measured(rows[0])["tp"] > measured(tp_only)["tp"]


def test_context_parallel_ring_bytes_per_step_equal_the_planners(comms_rows):
    """CP2 with ZeRO-1 over DeepSpeed's data axis (DP x CP = 2 ranks): the ring's K/V sends and receives forward and
    backward, and the gradient all-reduce and parameter all-gather over both CP ranks."""
    rows = [r for r in comms_rows if r.get("cp", 1) == 2]
    assert len(rows) == 2
    check(rows)
    assert all(measured(r)["cp"] > 0 and measured(r)["dp_reduce"] > 0 for r in rows)
