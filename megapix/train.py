"""`deepspeed megapix/train.py [flags]` (also torchrun, mpiexec, srun, or plain python): the launchers' entry point
of `megapix train`, whose code is megapix.commands.train. Run as a script, it checks first that megapix is installed
in this Python, and names the venv to use when it is not."""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script (deepspeed/torchrun megapix/train.py): needs the installed package
    # the script's folder is sys.path[0]: drop it, or megapix's own modules (utils, config, errors, data, ...) would
    # shadow a dependency's imports of the same top-level names
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    try:
        import megapix  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "megapix":
            raise
        import shlex

        venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "python")
        if not os.path.relpath(venv).startswith(".."):
            venv = os.path.relpath(venv)
        fix = (f"run it with the repository's venv, {shlex.join([venv, *sys.argv])} (or `source "
               f"{os.path.dirname(venv)}/activate` first)" if os.path.exists(venv) else
               "run `make train` in the repository (it builds .venv), or `pip install -e .` into this Python")
        print(f"megapix: error: the megapix package is not installed in this Python ({sys.executable}): {fix}",
              file=sys.stderr)
        sys.exit(2)

from megapix.commands.train import main  # noqa: E402  (after the check above)

if __name__ == "__main__":
    sys.exit(main())
