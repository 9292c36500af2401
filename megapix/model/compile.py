"""torch.compile applied to a model from outside, one block at a time (regional compilation, as torchtitan does):
each Block's forward is compiled, and since every block has the same code, the graph is traced once and reused by
all of them (torch inlines nn.Modules, so parameters are inputs, not constants). The module stays a plain
nn.Module; what wraps a block (activation checkpointing, a pipeline stage) wraps the compiled forward.

Shapes: the first call compiles for its batch size; a call with another size (an evaluation batch, the last short
batch of an extraction) recompiles once with a dynamic batch dimension and that graph serves every later size."""
from __future__ import annotations

import torch

from megapix.errors import ConfigError

COMPILE_MODES = ("off", "on", "require")


def compile_problem(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile cannot run here (no C++ compiler for inductor on CPU, no Triton on a GPU, a torch without
    dynamo), or None."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} on this Python has no torch.compile (dynamo is not supported here)"
    if torch.device(device).type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor raises its own InvalidCxxCompiler
            return f"inductor needs a C++ compiler on CPU and finds none ({type(e).__name__}; set CXX or install g++)"
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return "inductor needs Triton on a GPU and it is not installed"
    return None


def compile_blocks(module: torch.nn.Module, mode: str, device: torch.device | str = "cpu") -> str | None:
    """Compile the forward of every Block in `module` when mode is on or require. Returns a line saying why it ran
    eager instead (mode on and compilation impossible here), else None; mode require raises that as a
    ConfigError."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return None
    problem = compile_problem(device)
    if problem is not None:
        if mode == "require":
            raise ConfigError(f"--compile require: {problem}; use --compile on (eager when impossible) or off")
        return f"--compile on: {problem}; running eager"
    from megapix.model.igpt import Block

    for block in module.modules():
        if isinstance(block, Block):
            block.forward = torch.compile(block.forward)  # the bound method: wrappers added later wrap this
    return None


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo's own timer over every compile and recompile)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))
