"""benchmarks/gpu_check.py without a GPU: the one-line exit, and --smoke, which runs every section's code on CPU
(tiny preset, torch kernel path, SDPA math, 'n/a on CPU' for what a CPU cannot measure) and writes the report."""
from __future__ import annotations

import argparse
import glob
import json
import os

import pytest
import torch

from conftest import REPO, run

SCRIPT = os.path.join("benchmarks", "gpu_check.py")
SECTIONS = ["kernels_correct", "attention_tflops", "add_norm_gbps", "mfu", "planner_memory", "training_curves"]


def _numbers(obj) -> list:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _numbers(v)]
    return []


def _report(folder) -> tuple[dict, str]:
    (js,) = glob.glob(os.path.join(folder, "gpu_check-*.json"))
    (md,) = glob.glob(os.path.join(folder, "gpu_check-*.md"))
    assert os.path.basename(js)[:-5] == os.path.basename(md)[:-3]
    with open(js) as f, open(md) as g:
        return json.load(f), g.read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would measure it")
def test_without_cuda_it_says_so_exits_0_and_writes_nothing(tmp_path):
    out = tmp_path / "report"
    proc = run([SCRIPT, "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA" in lines[0], proc.stdout
    assert not out.exists()


@pytest.mark.slow
def test_smoke_runs_every_section_on_cpu_and_writes_json_and_markdown(tmp_path):
    proc = run([SCRIPT, "--smoke", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep, md = _report(tmp_path)
    h = rep["header"]
    assert h["mode"] == "smoke (CPU)" and h["torch"] == torch.__version__ and h["deepspeed"] and h["triton"]
    assert list(rep["sections"]) == SECTIONS
    assert h["kernel_path"] == "torch"  # what "auto" resolved to on this CPU, not a hard-coded "triton"
    assert set(rep["goals"]) == {"attention_tflops", "add_norm_gbps", "planner_memory"}
    for name, sec in rep["sections"].items():
        assert sec["status"] in ("pass", "info", "n/a (smoke)"), (name, sec.get("error"), sec.get("summary"))
        assert sec["wall_s"] >= 0 and sec["budget_s"] > 0 and sec["rows"], name
        for row in sec["rows"]:  # every row has numbers, or says why not
            assert _numbers({k: v for k, v in row.items() if k != "micro_batch"}) or row.get("skipped"), (name, row)
    s = rep["sections"]
    for row in s["kernels_correct"]["rows"]:
        assert row["ok"] and set(row["max_abs"]) == set(row["max_rel"]) and row["worst_rel"] <= 2e-2, row
    assert {r["case"].split()[0] for r in s["kernels_correct"]["rows"]} == {"attention", "add_norm"}
    (attn,) = s["attention_tflops"]["rows"]
    assert attn["megapix-torch (CPU)"]["fwd_bwd_tflops"] > 0 and attn["sdpa-math (CPU)"]["fwd_bwd_tflops"] > 0
    assert attn["ratio_vs_sdpa-math (CPU)"] > 0
    (norm,) = s["add_norm_gbps"]["rows"]
    assert norm["gbps"]["copy"] > 0 and norm["fraction_of_copy"] > 0
    assert norm["backward_gbps"]["torch"] > 0  # the norm backward, timed beside the forward
    mfu = s["mfu"]["rows"]
    assert [(r["model"], r["kernels"], r["compile"]) for r in mfu] == [
        ("tiny", "auto", "off"), ("tiny", "torch", "off"), ("tiny", "auto", "on")]
    for r in mfu:
        assert r["tflops"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] == "n/a on CPU" and r["steps_timed"] == 2
        assert r["kernel_path"] == "torch" and (r["compile_s"] > 0) == (r["compile"] == "on")
    for r in s["planner_memory"]["rows"]:
        assert r["planner_peak_gib"] > r["planner_allocator_gib"] > 0
        assert r["measured_max_allocated_gib"] == "n/a on CPU" and r["ratio"] == "n/a on CPU"
    tc = s["training_curves"]
    assert set(tc["curves"]) == {"auto", "torch"} and all(len(c) == 4 for c in tc["curves"].values())
    assert tc["max_rel_diff"] <= 2e-2 and tc["status"] == "pass"
    # the Markdown: the header, the section table, every section's own table, the loss curves, the tuning footer
    assert md.startswith("# megapix GPU check")
    assert "| section | status | wall (s) | result |" in md
    for name in SECTIONS:
        assert f"| {name} | {rep['sections'][name]['status']} |" in md and f"## {name}:" in md
    assert "| step | loss (auto) | loss (torch) |" in md and "kernels/configs.py" in md
    # the stdout table
    assert "section" in proc.stdout and all(name in proc.stdout for name in SECTIONS)


def test_spent_budget_skips_every_section_with_its_reason(tmp_path):
    proc = run([SCRIPT, "--smoke", "--budget-s", "0.001", "--out", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep, md = _report(tmp_path)
    for name, sec in rep["sections"].items():
        assert sec["status"] == "skipped" and "budget" in sec["summary"], (name, sec)
        assert f"| {name} | skipped |" in md


def test_a_failing_section_or_item_is_recorded_and_the_rest_still_runs(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import gpu_check

    def broken_section(ctx, budget):
        raise RuntimeError("simulated section failure")

    real = gpu_check.bk.add_norm_errors

    def broken_item(lead, n, res, **kw):
        if n == 40:
            raise RuntimeError("simulated kernel failure")
        return real(lead, n, res, **kw)

    monkeypatch.setitem(gpu_check.FUNCS, "attention_tflops", broken_section)
    monkeypatch.setattr(gpu_check.bk, "add_norm_errors", broken_item)
    args = gpu_check.build_parser().parse_args(
        ["--smoke", "--sections", "kernels_correct", "attention_tflops", "planner_memory"])
    assert isinstance(args, argparse.Namespace)
    rep = gpu_check.run(args)
    s = rep["sections"]
    assert s["attention_tflops"]["status"] == "error"
    assert "simulated section failure" in s["attention_tflops"]["error"]
    # one failed case: recorded in its row and the section's error, the other four still measured
    kc = s["kernels_correct"]
    assert kc["status"] == "error" and "simulated kernel failure" in kc["error"]
    assert [r["case"] for r in kc["rows"] if "error" in r] == ["add_norm (3, 5, 40) residual=False"]
    assert sum(r.get("ok") is True for r in kc["rows"]) == 4
    # section 5 reads section 4's runs, which were not selected: each row says so
    assert s["planner_memory"]["rows"] and all("section mfu" in r["skipped"] for r in s["planner_memory"]["rows"])
    assert s["mfu"]["status"] == "skipped" and s["training_curves"]["status"] == "skipped"
    md = gpu_check.markdown(rep)
    assert "simulated section failure" in md and "| attention_tflops | error |" in md
    assert "| kernels_correct | error |" in md


@pytest.mark.parametrize("failing,code", [("attention_tflops", 0), ("planner_memory", 0), ("kernels_correct", 1),
                                          ("training_curves", 1)])
def test_a_missed_goal_is_reported_and_only_a_wrong_number_exits_1(tmp_path, monkeypatch, failing, code):
    """Sections stubbed to a verdict (the real ones run in the smoke test): a speed or planner goal missed is "goal
    missed" in the table and the JSON with exit 0; kernels outside tolerance or curves apart exit 1."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import gpu_check

    def verdict(name):
        return lambda ctx, budget: {"status": "fail" if name == failing else "pass", "rows": [{"x": 1}],
                                    "summary": name}

    monkeypatch.setattr(gpu_check, "FUNCS", {name: verdict(name) for name in SECTIONS})
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == code
    rep, md = _report(tmp_path)
    expected = "goal missed" if code == 0 else "fail"
    assert rep["sections"][failing]["status"] == expected and f"| {failing} | {expected} |" in md
    if code == 0:
        assert rep["goals"][failing] == "goal missed"


def test_compile_check_specialises_launches_as_triton_does_at_the_models_strides():
    """kernels/_compile_check.py compiles what will launch: the launchers' own launches, captured at igpt-l's bf16
    shapes as on sm90, specialised by Triton's JIT binder: bf16 pointers for the norm's residual and weight (not
    fp32), the sm90 table's tiles, and tt.divisibility=16 on every pointer and on every int (the model's strides
    3d = 4608 and 96, the head dim 96, T = 1024), never on the fp32 scale."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from megapix.kernels import _compile_check as cc

    target = GPUTarget("cuda", 90, 32)
    attn = cc.attention_launches(90, torch.bfloat16, "igpt-l", True)
    norm = cc.norm_launches(90, torch.bfloat16, "igpt-l", True)
    names = [launch.kernel.__name__ for launch in attn + norm]
    assert names == ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_add_norm_fwd",
                     "_add_norm_bwd"]
    assert (attn[0].kwargs["BLOCK_M"], attn[0].kwargs["BLOCK_N"], attn[0].kwargs["num_warps"]) == (128, 64, 8)
    fwd = dict(zip(cc.specialise(attn[0], target)[0].arg_names, attn[0].args))
    assert (fwd["sqt"], fwd["sqh"], fwd["HEAD_DIM"], fwd["H"]) == (4608, 96, 96, 16)  # views of c_attn's output
    for launch in attn + norm:
        jit, signature, constexprs, attrs, _ = cc.specialise(launch, target)
        hinted = {jit.arg_names[p[0]] for p, a in attrs.items() if ["tt.divisibility", 16] in a}
        pointers = {n for n, t in signature.items() if t.startswith("*")}
        ints = {n for n, t in signature.items() if t in ("i32", "i64")}
        assert pointers and hinted == pointers | ints, launch.kernel.__name__
        assert all(signature[n] == "fp32" for n in ("qk_scale", "sm_scale", "eps") if n in signature)
    _, fwd_sig, *_ = cc.specialise(norm[0], target)
    assert (fwd_sig["X"], fwd_sig["R"], fwd_sig["W"], fwd_sig["HOUT"], fwd_sig["RSTD"]) == (
        "*bf16", "*bf16", "*bf16", "*bf16", "*fp32")
