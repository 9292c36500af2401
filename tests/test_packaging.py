"""Packaging rules: kernels/ (installed as megapix.kernels) imports nothing from the rest of megapix, the package
and benchmarks never edit sys.path, the wheel holds megapix/kernels/ and no top-level `kernels`, and transformers gets
Hugging Face's `kernels` package in processes started from the repository root."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


def foreign_imports(source: str, filename: str = "<src>") -> list[str]:
    """Imports in a kernels/ module that reach the rest of megapix (its own megapix.kernels and relative imports
    within the package are fine; `from .. import x` would leave it)."""
    bad = []

    def outside(module: str) -> bool:
        return (module == "megapix" or module.startswith("megapix.")) and not (
            module == "megapix.kernels" or module.startswith("megapix.kernels."))

    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            bad += [f"{where}: import {a.name}" for a in node.names if outside(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                bad.append(f"{where}: from {'.' * node.level}{node.module or ''} import ...")
            elif node.level == 0 and node.module == "megapix":
                bad += [f"{where}: from megapix import {a.name}" for a in node.names if a.name != "kernels"]
            elif node.level == 0 and outside(node.module or ""):
                bad.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and outside(arg):
                bad.append(f"{where}: {name}({arg!r})")
    return bad


def test_the_check_sees_imports_of_megapix():
    src = ("import megapix.model\nfrom megapix import config\nfrom megapix.data import x\nfrom .. import utils\n"
           "import importlib\nimportlib.import_module('megapix.engine')\n"
           "from . import _ops\nfrom megapix import kernels\nimport megapix.kernels.reference\nimport torch\n")
    assert len(foreign_imports(src)) == 5, foreign_imports(src)


def test_kernels_import_nothing_from_the_rest_of_megapix():
    folder = os.path.join(REPO, "kernels")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert "__init__.py" in files and "_ops.py" in files
    bad = []
    for name in files:
        with open(os.path.join(folder, name)) as f:
            bad += foreign_imports(f.read(), f"kernels/{name}")
    assert not bad, "kernels/ must stay standalone:\n" + "\n".join(bad)


def test_no_sys_path_insert_in_the_package_or_benchmarks():
    """They import the installed package (pip install -e .), never whatever folder they happen to sit in."""
    found = []
    for top in ("megapix", "kernels", "benchmarks"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name)) as f:
                        if "sys.path.insert" in f.read():
                            found.append(os.path.relpath(os.path.join(root, name), REPO))
    assert not found, found


@pytest.mark.slow
def test_wheel_installs_kernels_as_megapix_kernels(tmp_path):
    """`pip install .` (non-editable): the wheel holds megapix/kernels/ and no top-level `kernels` package."""
    src = tmp_path / "src"  # a copy of the tracked files, so no build/ or egg-info lands in the checkout
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if os.path.isfile(os.path.join(REPO, rel)):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(REPO, rel), src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("megapix-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"megapix/kernels/__init__.py", "megapix/kernels/_ops.py", "megapix/model/ops.py"} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")], names


def test_compile_check_dims_are_the_presets():
    from megapix.kernels._compile_check import PRESET_DIMS
    from megapix.config import model_preset

    for name, dims in PRESET_DIMS.items():
        m = model_preset(name)
        assert (dims.n_head, dims.d_model, dims.n_ctx, dims.head_dim, dims.norm_eps) == (
            m.n_head, m.d_model, m.n_ctx, m.head_dim, m.norm_eps), name


# What transformers' hub-kernel integration imports from Hugging Face's `kernels` distribution; the folder kernels/
# has none of it, so the import fails if the folder shadows the package.
HUB_KERNELS_CHECK = (
    "import os, kernels, transformers.integrations.hub_kernels as hk\n"
    "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__\n"
    "print('HUB_KERNELS_OK', os.path.realpath(kernels.__file__))\n")


def hub_kernels_or_skip():
    import importlib.metadata
    import importlib.util

    pytest.importorskip("transformers")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` package is not installed (transformers < 5 does not need it)")
    if importlib.util.find_spec("transformers.integrations.hub_kernels") is None:
        pytest.skip("this transformers has no hub-kernel integration")


def test_hub_kernels_import_in_this_pytest_process():
    """make test starts pytest from the repository root: the tests still get Hugging Face's `kernels`."""
    hub_kernels_or_skip()
    exec(HUB_KERNELS_CHECK, {})
    import kernels

    assert not os.path.realpath(kernels.__file__).startswith(os.path.join(REPO, "kernels") + os.sep)


@pytest.mark.parametrize("launch", ["python -m pytest", "python -m megapix"])
def test_hub_kernels_import_in_a_process_started_from_the_repository_root(launch):
    hub_kernels_or_skip()
    if launch == "python -m pytest":
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
                "tests/test_packaging.py::test_hub_kernels_import_in_this_pytest_process"]
    else:
        # What `python -m megapix --version` does (runpy, the working directory first on sys.path), then the import
        # a user's code or a library would make in the same process.
        args = ["-c", "import os, runpy, sys\nsys.path[0] = os.getcwd()\nsys.argv = ['megapix', '--version']\n"
                      "try:\n    runpy.run_module('megapix', run_name='__main__', alter_sys=True)\n"
                      "except SystemExit as e:\n    assert e.code in (0, None), e.code\n" + HUB_KERNELS_CHECK]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if launch == "python -m megapix":
        assert "HUB_KERNELS_OK" in proc.stdout and REPO + "/kernels/" not in proc.stdout, proc.stdout
