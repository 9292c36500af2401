"""The one place an error becomes an exit code, for every command: bad input (megapix.errors.InputError) and a
refused write are one line and EXIT_USAGE, a diverged run EXIT_FAILURE, a lost peer EXIT_REQUEUE (the watchdog
exits at once); anything else is a bug and keeps its traceback. The command's output locks are released either
way."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from megapix.errors import EXIT_FAILURE, EXIT_USAGE, InputError
from megapix.runfolder import disk_error, release_all


def out_flag(argv) -> Callable[[], str | None]:
    """The --out a command line names (for naming the folder in a refused write), read only when needed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return lambda: argv[argv.index("--out") + 1] if "--out" in argv[:-1] else None


def run(prog: str, body: Callable[[], int | None], out: Callable[[], str | None] = lambda: None) -> int:
    """body()'s exit code, or the one its error maps to, with the error as one line `<prog>: error: ...`."""
    try:
        return int(body() or 0)
    except InputError as e:
        _say(prog, e)
        return EXIT_USAGE
    except Exception as e:
        from megapix.divergence import NonFiniteStop
        from megapix.parallel.watchdog import exit_if_peer_lost

        if isinstance(e, NonFiniteStop):  # every rank saw it at the same step; rank 0 says it
            if int(os.environ.get("RANK", "0")) == 0:
                _say(prog, e)
            return EXIT_FAILURE
        exit_if_peer_lost(e)  # a peer died, hung or went out of reach: one line, exit 75 (requeue)
        problem = disk_error(e, out())  # a full, read-only or forbidden disk: one line, not a traceback
        if problem is None:
            raise
        _say(prog, problem)
        return EXIT_USAGE
    finally:
        release_all()


def _say(prog: str, error: BaseException) -> None:
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
