"""The errors a megapix command reports as one line, and the exit codes every command and launcher agrees on.

A user-facing error is an `InputError`: something the user gave (a flag, a config, a file) that megapix cannot
use, with a message that names it and the fix. Its subclasses say which kind of input was wrong; every one of them
exits EXIT_USAGE. megapix.commands.runner is where an error becomes an exit code.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the run itself failed (a diverged run): rerunning the same steps would fail again
EXIT_USAGE = 2  # bad input: a flag, a config, a file; nothing was written
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint saved or a peer lost; slurm/launch.sh requeues the job on it


class InputError(ValueError):
    """A bad flag, config value, path or file; the message names it and what would be accepted."""


ConfigError = InputError  # the name most of megapix raises: a bad setting is the common case


class DataError(InputError):
    """A data file that cannot be read as what it claims to be (a corrupt image, a damaged shard or manifest)."""


class CheckpointError(InputError):
    """A checkpoint or export that cannot be loaded (damaged, of another model, or a file megapix refuses)."""
