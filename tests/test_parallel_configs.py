"""Every ds_configs/*.json builds an engine and trains on CPU (tiny model), so none goes stale; the csv monitor
writes its files."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from test_parallel_helpers import ROOT, env, free_port, micro_config
import pytest

pytestmark = pytest.mark.slow  # every test here starts training runs

WORKER = r'''
import glob, json, math, os, sys
sys.path.insert(0, os.environ["MEGAPIX_ROOT"])
from megapix.config import Config
from megapix.parallel.launch import init_distributed
init_distributed()
from megapix.engine import Trainer
import torch.distributed as dist
micro, out_root = json.loads(os.environ["MEGAPIX_MICRO"]), os.environ["MEGAPIX_OUT"]
for path in sorted(glob.glob(os.path.join(os.environ["MEGAPIX_ROOT"], "ds_configs", "*.json"))):
    name = os.path.basename(path)[:-5]
    raw = json.loads(json.dumps(micro))
    raw["train"].update(max_steps=2, out=os.path.join(out_root, name))
    if name == "pipeline":
        raw["train"].update(pipeline_parallel=2, micro_batch=2)
    if name == "activation_checkpointing":
        raw["train"]["activation_checkpointing"] = True
    if name == "bf16":
        raw["train"]["precision"] = "bf16"
    import deepspeed.utils.groups as ds_groups
    ds_groups.mpu = None  # DeepSpeed keeps the previous engine's mpu process-wide; one engine per process in real runs
    trainer = Trainer(Config.from_dict(raw), path)
    assert trainer.fit() == 0
    if dist.get_rank() == 0:
        with open(os.path.join(out_root, name, "metrics.jsonl")) as f:
            recs = [json.loads(l) for l in f]
        assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs), (name, recs)
        print(f"CONFIG-OK {name} zero={trainer.layout.zero_stage} loss={recs[-1]['loss']:.4f}", flush=True)
    dist.barrier()
'''


def test_every_ds_config_builds_and_trains(tmp_path):
    configs = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
    for must in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "pipeline", "bf16",
                 "activation_checkpointing", "monitor"):
        assert must in configs
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    e = env()
    e.update(MEGAPIX_ROOT=ROOT, MEGAPIX_MICRO=json.dumps(micro_config()), MEGAPIX_OUT=str(tmp_path / "runs"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ok = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("CONFIG-OK")]
    assert ok == configs, proc.stdout
    # DeepSpeed's csv monitor wrote its files under <out>/monitor (megapix/loss among them)
    csvs = glob.glob(str(tmp_path / "runs" / "monitor" / "monitor" / "**" / "*.csv"), recursive=True)
    assert any("loss" in os.path.basename(c) for c in csvs), csvs
