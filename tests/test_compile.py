"""--compile: each block's forward through torch.compile (inductor's C++ backend on this CPU). The compiled curve
equals the eager one, TP2 compiled equals one rank compiled, the compile time is reported apart from the step
time, other batch sizes do not recompile at every call, and a machine that cannot compile says so in one line
(exit 2 under --compile require)."""
from __future__ import annotations

import pytest
import torch
from test_parallel_helpers import LAYOUTS, records, run_train

from megapix.config import ConfigError, ModelConfig
from megapix.model import ImageGPT
from megapix.model.compile import compile_blocks, compile_problem


@pytest.fixture
def no_compiler():
    """Inductor's compiler search as on a machine without g++ (its search is cached: cleared around the test)."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    with config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        yield
    cpp_compiler_search.cache_clear()


def test_without_a_compiler_on_runs_eager_with_a_line_and_require_refuses(no_compiler):
    model = ImageGPT(ModelConfig(n_layer=2, d_model=32, n_head=2, resolution=4))
    assert "C++ compiler" in compile_problem("cpu")
    note = compile_blocks(model, "on", "cpu")
    assert note.startswith("--compile on: inductor needs a C++ compiler") and note.endswith("running eager")
    assert all(not hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.blocks)
    with pytest.raises(ConfigError, match="--compile require: inductor needs a C"):
        compile_blocks(model, "require", "cpu")
    assert compile_blocks(model, "off", "cpu") is None


# One process with a one-rank CP group: ring attention behind its graph break in every compiled block, the
# logits and gradients against the plain eager model. Run twice over one fresh inductor cache, the second run
# finds the graphs the first saved: views of the qkv projection leaving a graph made torch 2.13 save a dangling
# view record in AOTAutograd's cache (garbage sizes or SIGSEGV; megapix.parallel.context.apply_context_parallel).
RING_IN_COMPILED_BLOCKS = """
import os, sys, torch, torch.distributed as dist
from megapix.config import ModelConfig
from megapix.model import ImageGPT
from megapix.model.compile import compile_blocks
from megapix.parallel.context import apply_context_parallel

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
config = ModelConfig(n_layer=2, d_model=32, n_head=2, resolution=8)
eager, ring = ImageGPT(config, seed=0), ImageGPT(config, seed=0)
apply_context_parallel(ring, dist.group.WORLD, config.n_ctx)
assert compile_blocks(ring, "require", "cpu") is None
tokens = torch.randint(0, 512, (3, config.n_ctx), generator=torch.Generator().manual_seed(1))
for model in (eager, ring):
    model(tokens).float().pow(2).mean().backward()
torch.testing.assert_close(ring(tokens), eager(tokens), rtol=1e-4, atol=1e-4)
for (name, a), b in zip(ring.named_parameters(), eager.parameters()):
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
print("same")
"""


@pytest.mark.slow
def test_ring_attention_in_compiled_blocks_survives_inductors_cache(tmp_path):
    from conftest import run, subprocess_env

    env = subprocess_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    for attempt in ("cold", "warm"):
        proc = run(["-c", RING_IN_COMPILED_BLOCKS, str(tmp_path / f"store-{attempt}")], env=env)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("same"), (attempt, proc.returncode,
                                                                               proc.stderr[-3000:])


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_other_batch_sizes_do_not_recompile_each_call():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = ImageGPT(ModelConfig(n_layer=3, d_model=32, n_head=2, resolution=4)).eval()
    compiled = ImageGPT(eager.config).eval()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(compiled, "on", "cpu") is None
    with torch.no_grad():
        for batch in (4, 3, 2, 5, 3, 1, 4, 6, 7, 1):  # training-size, then evaluation and last-batch sizes
            tokens = torch.randint(0, 512, (batch, eager.config.n_ctx))
            torch.testing.assert_close(compiled(tokens), eager(tokens), rtol=1e-4, atol=1e-4)
    # 8 sizes, 3 graphs, shared by the 3 blocks (same code): the first size, then a dynamic batch for the rest, and
    # batch 1, which torch specialises on (a size of 1 broadcasts)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


STEPS = ["--max-steps", "4", "--eval-every", "0", "--save-every", "0"]


@pytest.fixture(scope="module")
def compiled_single(tmp_path_factory):
    """One rank, --compile: (records, stdout)."""
    out = tmp_path_factory.mktemp("compile") / "compiled"
    proc = run_train(out, 1, *STEPS, "--compile")
    return records(out), proc.stdout


def close(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= rel * abs(y["loss"]), (y["step"], y["loss"], x["loss"])


@pytest.mark.slow
def test_compiled_training_follows_the_eager_curve_on_one_rank_and_on_tp2(tmp_path, compiled_single):
    compiled, stdout = compiled_single
    run_train(tmp_path / "eager", 1, *STEPS)
    run_train(tmp_path / "tp2", 2, *STEPS, "--compile", "--tensor-parallel", "2")
    close(compiled, records(tmp_path / "eager"), 1e-3)
    close(records(tmp_path / "tp2"), compiled, 1e-4)
    # compilation is reported apart from the step time: once, at the first step
    assert compiled[0].get("compile_s", 0) > 0 and not any("compile_s" in r for r in compiled[2:])
    said = [line for line in stdout.splitlines() if "--compile:" in line]
    assert len(said) == 1 and "s compiling the blocks in step 1" in said[0], stdout[-2000:]


@pytest.fixture(scope="module")
def compiled_bert(tmp_path_factory):
    """One rank, the BERT objective, --compile: records."""
    out = tmp_path_factory.mktemp("compile") / "compiled-bert"
    run_train(out, 1, *STEPS, "--objective", "bert", "--compile")
    return records(out)


# ZeRO-3's parameter hooks, pipeline stages with activation checkpointing around the compiled block, sequence
# parallelism's collectives between blocks, context parallelism's ring behind a graph break: each compiled curve
# is the compiled one-rank curve of its objective (the eager layouts equal the eager one-rank curve:
# test_parallel). Every layout of the parallel matrix (test_parallel_helpers.LAYOUTS) but tp2 (above); CP2 and
# CP2 x TP2 at this config's resolution rather than the matrix's 16x16.
COMPOSED = {**{name: LAYOUTS[name] for name in
               ("dp2-zero1", "dp2-zero2", "dp2-zero3", "pp2", "pp2-actckpt", "tp2-actckpt", "tp2-sp", "tp2xpp2",
                "pp2xdp2", "tp2xdp2-zero3", "tp2-spxpp2", "tp2-spxdp2-zero1", "tp2-spxdp2-zero3", "cp2xdp2-zero3",
                "cp2@bert", "tp2xpp2xdp2")},
            "cp2": (2, ["--context-parallel", "2"]),
            "cp2xtp2": (4, ["--context-parallel", "2", "--tensor-parallel", "2"])}


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPOSED)
def test_compile_composes_with_the_layouts(tmp_path, request, name):
    nproc, flags = COMPOSED[name]
    reference = (request.getfixturevalue("compiled_bert") if "bert" in flags
                 else request.getfixturevalue("compiled_single")[0])
    run_train(tmp_path / name, nproc, *STEPS, "--compile", *flags)
    close(records(tmp_path / name), reference, 1e-3)


@pytest.mark.slow
def test_compiled_bert_follows_its_eager_curve(tmp_path, compiled_bert):
    run_train(tmp_path / "eager", 1, *STEPS, "--objective", "bert")
    close(compiled_bert, records(tmp_path / "eager"), 1e-3)
