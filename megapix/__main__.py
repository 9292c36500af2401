"""`python -m megapix`: the same as the `megapix` console script."""
import os
import sys

# `python -m` puts the working directory first on sys.path. From the repository root that lets the folder kernels/
# (installed as megapix.kernels) shadow Hugging Face's `kernels` package, which transformers imports. The console
# script never has the working directory on sys.path, so drop it here as `python -P` would.
if not sys.flags.safe_path and sys.path and os.path.realpath(sys.path[0] or ".") == os.path.realpath(os.getcwd()):
    del sys.path[0]

from megapix.cli import main  # noqa: E402

sys.exit(main())
