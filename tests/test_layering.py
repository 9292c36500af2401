"""The shape of the code: arrows point down (no module imports from a package above it, function-level imports
included), and every module stays in pieces a reader can carry (files <= 600 lines, functions <= 60)."""
from __future__ import annotations

import ast
import os

from conftest import REPO

# Lowest first. A module may import from its own level and below; the package root `megapix` (its __init__: the
# public API and the version) runs before any of its modules anyway and is not ranked.
LEVELS = [
    ("kernels",),  # installs as megapix.kernels; imports nothing else of megapix
    ("errors",),  # the error classes and exit codes every level raises and returns
    ("config",),
    ("utils",),
    ("model",),  # never imports parallel/: parallelism is applied from outside
    ("parallel",),
    # runfolder: locks, folder kinds and disk errors, which checkpoint's store uses as much as the commands do
    ("data", "checkpoint", "dsconfig", "runlog", "divergence", "tasks", "runfolder", "tracking"),
    ("cliargs", "plan"),  # argparse from the config fields; the planner (a model of the engine, and its CLI)
    ("engine",),
    ("features", "probe", "probe_results", "attentive", "finetune", "sample", "trainprobe"),
    ("commands",),  # one module per command: flags, file I/O, exit codes (commands.runner)
    ("train", "cli", "__main__"),  # the launchers' entry point and `megapix <command>`
]
LEVEL = {unit: i for i, units in enumerate(LEVELS) for unit in units}
# Upward imports allowed for now; an entry that no longer occurs fails the test, so the list only shrinks.
KNOWN: set[tuple[str, str]] = set()


def _package(name: str, path: str) -> str:
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def _modules():
    """(module name, path) of every megapix module and of kernels/ (as megapix.kernels)."""
    for top, prefix in (("megapix", "megapix"), ("kernels", "megapix.kernels")):
        for folder, _dirs, files in os.walk(os.path.join(REPO, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), os.path.join(REPO, top))[:-3].replace(os.sep, ".")
                    name = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
                    yield name, os.path.join(folder, f)


def _imported(tree: ast.AST, package: str):
    """The megapix modules a module imports anywhere in it (relative imports resolved against its package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base == "megapix":  # `from megapix import cliargs`: the submodules named
                yield from (f"megapix.{a.name}" for a in node.names)
            else:
                yield base


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "megapix" and len(parts) > 1 else None


def test_no_module_imports_from_a_package_above_it():
    upward, unranked, seen_known = [], set(), set()
    for name, path in _modules():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        package = _package(name, path)
        mine = _unit(name)
        if mine is None:
            continue
        for target in _imported(tree, package):
            theirs = _unit(target)
            if theirs is None or theirs == mine:
                continue
            for unit in (mine, theirs):
                if unit not in LEVEL and unit not in ("__init__", "__version__"):
                    unranked.add(unit)
            if mine not in LEVEL or theirs not in LEVEL:
                continue
            if LEVEL[theirs] > LEVEL[mine]:
                if (name, theirs) in KNOWN:
                    seen_known.add((name, theirs))
                else:
                    upward.append(f"{name} imports {target} (level {LEVEL[mine]} -> {LEVEL[theirs]})")
    assert not unranked, f"modules with no level: add them to LEVELS in tests/test_layering.py: {sorted(unranked)}"
    assert not upward, "imports from a package above:\n" + "\n".join(upward)
    assert seen_known == KNOWN, f"no longer imported upward, drop from KNOWN: {sorted(KNOWN - seen_known)}"


def test_kernels_import_nothing_else_of_megapix():
    for name, path in _modules():
        if name.startswith("megapix.kernels"):
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            others = [t for t in _imported(tree, _package(name, path))
                      if t.startswith("megapix") and not t.startswith("megapix.kernels")]
            assert not others, (name, others)


MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def test_files_and_functions_stay_small():
    """Every module of megapix/ (kernels/ included) is at most 600 lines and every function in it at most 60
    (docstring included): past that a reader cannot carry it, and the piece wants a name of its own."""
    too_long = []
    for _name, path in _modules():
        with open(path) as fh:
            src = fh.read()
        where = os.path.relpath(path, REPO)
        if src.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{where}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}: {node.name} is {n} lines")
    assert not too_long, too_long
