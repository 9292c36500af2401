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


def test_context_parallel_runs_eager_with_a_line_and_require_refuses():
    from megapix.model.compile import UNSUPPORTED_CP

    model = ImageGPT(ModelConfig(n_layer=2, d_model=32, n_head=2, resolution=4))
    assert compile_blocks(model, "on", "cpu", UNSUPPORTED_CP) == f"--compile on: {UNSUPPORTED_CP}; running eager"
    assert all(not hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.blocks)
    with pytest.raises(ConfigError, match="--compile require: context parallelism is not compiled"):
        compile_blocks(model, "require", "cpu", UNSUPPORTED_CP)


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


# ZeRO-3's parameter hooks, pipeline stages with activation checkpointing around the compiled block, sequence
# parallelism's collectives between blocks: each compiled curve is the compiled one-rank curve (the eager layouts
# equal the eager one-rank curve: test_parallel). Context parallelism runs eager (model.compile.UNSUPPORTED_CP).
# Every layout of the parallel matrix (test_parallel_helpers.LAYOUTS) but context parallelism's and tp2 (above).
COMPOSED = {name: LAYOUTS[name] for name in
            ("dp2-zero1", "dp2-zero2", "dp2-zero3", "pp2", "pp2-actckpt", "tp2-actckpt", "tp2-sp", "tp2xpp2",
             "pp2xdp2", "tp2xdp2-zero3", "tp2-spxpp2", "tp2-spxdp2-zero1", "tp2-spxdp2-zero3")}


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPOSED)
def test_compile_composes_with_the_layouts(tmp_path, compiled_single, name):
    nproc, flags = COMPOSED[name]
    run_train(tmp_path / name, nproc, *STEPS, "--compile", *flags)
    close(records(tmp_path / name), compiled_single[0], 1e-3)


@pytest.mark.slow
def test_compiled_bert_follows_its_eager_curve(tmp_path):
    run_train(tmp_path / "eager", 1, *STEPS, "--objective", "bert")
    run_train(tmp_path / "compiled", 1, *STEPS, "--objective", "bert", "--compile")
    close(records(tmp_path / "compiled"), records(tmp_path / "eager"), 1e-3)
