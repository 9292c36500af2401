"""The step lines a user reads while training: what each says, and when."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from megapix import runlog
from megapix.runlog import RunLog, _clock


def step_record(step: int, **extra) -> dict:
    return {"step": step, "loss": 2.0, "bpd": 2.885, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
            "step_time_s": 0.25, "mfu": 0.031, **extra}


def test_step_lines_carry_ms_per_step_mfu_elapsed_and_time_left(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 110.0, 120.0])  # begin, then two steps 10 s apart
    monkeypatch.setattr("megapix.runlog.time.monotonic", lambda: next(clock))
    log = RunLog(str(tmp_path), is_rank0=True, plot=False)
    log.begin("train", total=10, initial=4, log_every=1)  # a resumed run: steps 5..10 in this process
    log._interactive = False  # as under make/CI (stdout is not a terminal)
    log.record(step_record(5))
    log.record(step_record(6, mfu=None))
    log.end()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train step")]
    assert len(lines) == 2, lines
    # step 5: one step done in 10 s since begin, 5 steps left -> 50 s
    assert lines[0].endswith("1000 tokens/s, 250 ms/step, MFU 3.1%, 0:10 elapsed, 0:50 left"), lines[0]
    # step 6: two steps in 20 s, 4 left -> 40 s; no MFU when the device's peak is unknown
    assert lines[1].endswith("250 ms/step, 0:20 elapsed, 0:40 left"), lines[1]
    assert "MFU" not in lines[1]
    assert re.match(r"train step 6/10: loss 2\.0000 \(2\.885 bits/dim\), lr 0\.001, grad_norm 0\.5", lines[1])


def test_clock_format():
    assert [_clock(s) for s in (0, 59.6, 61, 3599, 3600, 86399)] == ["0:00", "1:00", "1:01", "59:59", "1:00:00",
                                                                     "23:59:59"]


def test_every_evaluation_gets_a_line_between_log_every_steps(tmp_path, capsys):
    log = RunLog(str(tmp_path), is_rank0=True, plot=False)
    log.begin("finetune", total=30, initial=0, log_every=10)
    log._interactive = False
    for step in range(1, 13):
        log.record(step_record(step, **({"val_loss": 1.5, "val_acc": 0.4321} if step == 3 else {})))
    log.end()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("finetune step")]
    assert [line.split(":")[0] for line in lines] == ["finetune step 3/30", "finetune step 10/30"]
    assert "val_loss 1.5000, val_acc 43.21%" in lines[0] and "val_acc" not in lines[1]


@pytest.mark.parametrize("gflops", [76.0, 1.3])  # this machine's fp32 on 2 threads; its bf16 (no AVX512-BF16)
def test_the_cpu_peak_probe_keeps_to_its_budget_and_finds_the_rate(monkeypatch, gflops):
    """A CPU on which a matmul runs at `gflops`: the probe spends about its `seconds` however slow the dtype is (the
    fixed 1024^3 probe took 13 s of every bf16 run's start here), and reports that rate."""
    now, sizes = [0.0], []

    def mm(a, b):  # a matmul on a clock of its own: 2 n^3 flops at the given rate
        sizes.append(a.shape[0])
        now[0] += 2 * a.shape[0] ** 3 / (gflops * 1e9)
        return a

    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(runlog, "_MATMUL_PEAK", {})
    peak = runlog.measured_matmul_tflops(torch.float32, seconds=1.0)
    assert peak == pytest.approx(gflops / 1e3)
    assert now[0] < 1.2, f"the probe took {now[0]:.1f} s of its 1 s budget"
    assert max(sizes) == (1024 if gflops > 70 else 256)  # 1024 where it fits, smaller where it would not


def test_the_cpu_peak_is_measured_once_per_machine_and_kept(monkeypatch, tmp_path):
    """The first run measures and keeps the peak; the next reads it without the probe (every run on a machine divides
    its MFU by the same number). A crafted or damaged cache only means measuring again; a symlink at the cache's
    path is replaced, never written through; an unwritable cache still gives the measured peak."""
    calls = []
    monkeypatch.setattr(runlog, "measured_matmul_tflops", lambda dtype: calls.append(dtype) or 0.5 * len(calls))
    monkeypatch.setenv("MEGAPIX_CACHE_DIR", str(tmp_path / "cache"))
    path = runlog.peak_cache_file()
    assert path == str(tmp_path / "cache" / "cpu_matmul_peak.json")
    assert runlog.cached_matmul_tflops(torch.float32) == (0.5, path)
    assert runlog.cached_matmul_tflops(torch.float32) == (0.5, path) and len(calls) == 1
    assert runlog.cached_matmul_tflops(torch.bfloat16)[0] == 1.0  # another dtype: its own probe, both kept
    assert sorted(k.split(" | ")[3] for k in json.load(open(path))) == ["bfloat16", "float32"]
    for crafted in ('[1, 2]', '{"x": ', json.dumps({k: v for k, v in ((runlog._cpu_key(torch.float32), -1.0),)})):
        open(path, "w").write(crafted)
        before = len(calls)
        assert runlog.cached_matmul_tflops(torch.float32)[0] == 0.5 * (before + 1)  # measured again
        assert json.load(open(path))[runlog._cpu_key(torch.float32)] > 0  # and kept
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    os.remove(path)
    os.symlink(victim, path)
    runlog.cached_matmul_tflops(torch.float32)
    assert victim.read_text() == "a user's file" and not os.path.islink(path)
    monkeypatch.setenv("MEGAPIX_CACHE_DIR", str(victim / "cannot-be-a-folder"))
    before = len(calls)
    assert runlog.cached_matmul_tflops(torch.float32)[0] == 0.5 * (before + 1)
