"""Dead and hung ranks: every wait bounded, the rank that stopped answering named, the job requeued.

Three parts, all started by :func:`start` right after torch.distributed is up:

- **Bounded collectives.** :func:`set_collective_timeout` makes ``--collective-timeout`` the timeout of the default
  process group and of every group created afterwards. torch's ``new_group()`` without a ``timeout`` takes
  ``distributed_c10d.default_pg_timeout`` (``default_pg_nccl_timeout`` under NCCL), read when the group is made,
  not the default group's timeout; DeepSpeed's groups (the TP/DP grid, ZeRO's) are made that way, so those two
  module defaults are set too. Under gloo a peer that dies closes its sockets and the others fail at once
  ("Connection closed by peer"); a peer that hangs, or whose link is down, makes them fail after the timeout
  ("Timed out waiting ...ms"). Under NCCL, TORCH_NCCL_ASYNC_ERROR_HANDLING (slurm/launch.sh) turns the timeout
  into an error the same way.
- **Heartbeats.** A daemon thread writes ``time step`` for this rank every ``interval`` seconds to the rendezvous
  store (MASTER_ADDR:MASTER_PORT: rank 0's TCPStore, or torchrun's agent store), through a client of its own with
  a short timeout, so it never waits behind the main thread. When a collective fails, :func:`exit_if_peer_lost`
  reads the others' heartbeats and names the ranks (and their hosts) that went quiet, prints one line with the
  step, and exits 75 (the requeue code: slurm/launch.sh requeues, ``--resume`` continues from the last complete
  checkpoint, which a save's staging + rename keeps intact). Under SLURM the line is also appended to
  ``MEGAPIX_PEER_LOST_FILE``: the launcher's exit code is the dead rank's, not 75.
- **SIGTERM while blocked.** Python runs a signal handler only when the main thread is back in the interpreter; a
  main thread waiting in a collective never is, so the engine's handler (stop at the next step boundary) would
  wait for the collective's timeout. ``signal.set_wakeup_fd`` makes the C-level handler write the signal's number
  to a socket this thread watches. If the main thread has not reached a step boundary ``grace`` seconds after a
  SIGTERM (grace: the longest step seen so far, twice, and at least MIN_GRACE_S) and is not inside a save, the
  thread prints one line and ends the process with 75. Nothing is half-written by that: the only files a step
  writes are metrics.jsonl lines (a torn last line is dropped on resume), and checkpoints are never cut (saves are
  marked with :func:`protected` and waited for; their own collectives are bounded by the timeout).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta

from megapix.errors import EXIT_REQUEUE  # "requeue me": slurm/launch.sh requeues on it

DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
MIN_GRACE_S = 10.0

# What torch raises when a peer is gone: gloo's and NCCL's messages (RuntimeError or torch.distributed.DistError).
_PEER_FAILURE = re.compile(r"gloo/|NCCL|Timed out|timed out|Connection (closed|reset|refused)|Broken pipe|"
                           r"ProcessGroup|DistNetworkError|DistBackendError|Socket Timeout|unreachable", re.S)


def set_collective_timeout(seconds: float) -> timedelta:
    """Make `seconds` the timeout of every process group created from now on (see the module docstring)."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    return timeout


class Watchdog:
    def __init__(self, timeout_s: float, interval_s: float | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.timeout_s = timeout_s
        self.interval_s = interval_s or min(5.0, max(0.2, timeout_s / 10))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.step = 0  # the step the main thread is on (1-based, in flight), 0 before the first
        self.step_started = time.monotonic()
        self.longest_step_s = 0.0
        self.saving = 0
        self.term_at: float | None = None
        self.store = None
        self.store_error: str | None = None
        self._stop = threading.Event()
        box = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # keys of this launch only (torchrun's store outlives its workers)
        self.prefix = f"megapix-heartbeat/{box[0]}"
        self.master = os.environ.get("MASTER_ADDR", "?")
        try:
            self.store = self._client()
            self.store.set(f"{self.prefix}/host/{self.rank}", socket.gethostname())
            self._beat()
        except Exception as e:  # no heartbeats: failures are still bounded, only the name is missing
            self.store, self.store_error = None, str(e)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        # Two threads: a store call towards a node that is cut off can block past its timeout, and must never
        # keep the SIGTERM watch from running.
        threading.Thread(target=self._watch_signals, name="megapix-watchdog", daemon=True).start()
        if self.store is not None:
            threading.Thread(target=self._heartbeats, name="megapix-heartbeat", daemon=True).start()

    def _client(self):
        """A TCPStore client of the rendezvous store, with a short timeout (not the main thread's client)."""
        return self.dist.TCPStore(self.master, int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=max(1.0, 2 * self.interval_s)), wait_for_workers=False)

    # ---- the main thread's marks ----
    def step_begins(self, step: int) -> None:
        now = time.monotonic()
        if self.step:
            self.longest_step_s = max(self.longest_step_s, now - self.step_started)
        self.step, self.step_started = step, now

    @property
    def grace_s(self) -> float:
        return max(MIN_GRACE_S, 2 * self.longest_step_s)

    # ---- the thread ----
    def _beat(self) -> None:
        self.store.set(f"{self.prefix}/beat/{self.rank}", f"{time.time()} {self.step}")

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception as e:
                self.store_error = str(e)

    def _watch_signals(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._wake_r], [], [], min(1.0, self.interval_s))
            if readable:
                try:
                    got = self._wake_r.recv(64)
                except BlockingIOError:
                    got = b""
                if signal.SIGTERM in got and self.term_at is None:
                    self.term_at = time.monotonic()
            self._check_term()

    def _check_term(self) -> None:
        if self.term_at is None or self.saving:
            return
        since = time.monotonic() - max(self.term_at, self.step_started)
        if since > self.grace_s:
            _say(f"megapix: rank {self.rank} got SIGTERM during step {self.step} and is still blocked {since:.0f} s "
                 f"later (a collective whose peer stopped answering?); exiting {EXIT_REQUEUE} without saving: "
                 "--resume continues from the last complete checkpoint")
            os._exit(EXIT_REQUEUE)

    # ---- after a failed collective ----
    def quiet_ranks(self) -> list[str]:
        """Ranks whose heartbeat does not change over 3 intervals, as "rank R (host H, quiet for the last S s)".
        Change, not age: the ranks' clocks need not agree. Returns early once every other rank has beaten."""
        if self.store is None:
            return []
        store = self._client()
        others = [r for r in range(self.world) if r != self.rank]
        first = {r: store.get(f"{self.prefix}/beat/{r}") for r in others}
        t0 = time.monotonic()
        quiet = set(others)
        while quiet and time.monotonic() - t0 < 3 * self.interval_s:
            time.sleep(self.interval_s / 2)
            quiet = {r for r in quiet if store.get(f"{self.prefix}/beat/{r}") == first[r]}
        waited = time.monotonic() - t0
        return [f"rank {r} (host {store.get(f'{self.prefix}/host/{r}').decode()}, quiet for the last "
                f"{waited:.0f} s)" for r in sorted(quiet)]

    def who_stopped(self) -> str:
        """Who went quiet, read in a thread of its own with a bound: a read from a store on a node that is cut off
        can block past the client's timeout."""
        found: list = []

        def read():
            try:
                found.append(self.quiet_ranks())
            except Exception as e:  # the store itself is gone or out of reach
                found.append(e)

        reader = threading.Thread(target=read, name="megapix-who-stopped", daemon=True)
        reader.start()
        reader.join(5 * self.interval_s + 5)
        quiet = found[0] if found else TimeoutError(f"no answer in {5 * self.interval_s + 5:.0f} s")
        if isinstance(quiet, Exception):
            return (f"the rendezvous store on {self.master} (rank 0's node) did not answer ({_first_line(quiet)}): "
                    f"rank 0, its node, or this node's link ({socket.gethostname()}) is down; that")
        if quiet:
            return ", ".join(quiet)
        return ("no rank went quiet (every heartbeat is recent): a peer failed (see its log) or was busy longer than "
                "--collective-timeout (raise it);")

    def close(self) -> None:
        self._stop.set()


_current: Watchdog | None = None


def start(timeout_s: float) -> Watchdog | None:
    """Start the watchdog for this process (a world of more than one rank; the main thread only)."""
    global _current
    import torch.distributed as dist

    if _current is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _current = Watchdog(timeout_s)
    return _current


def step_begins(step: int) -> None:
    """The engine's mark at the top of each step (1-based): the step a failure is reported in."""
    if _current is not None:
        _current.step_begins(step)


@contextlib.contextmanager
def saving():
    """A section the SIGTERM watchdog must not cut short (a checkpoint save)."""
    w = _current
    if w is not None:
        w.saving += 1
    try:
        yield
    finally:
        if w is not None:
            w.saving -= 1
            w.step_started = max(w.step_started, time.monotonic())  # the grace restarts after a save


def protected(fn):
    """Decorator form of :func:`saving`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with saving():
            return fn(*args, **kwargs)
    return wrapper


def is_peer_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and bool(_PEER_FAILURE.search(str(error)))


def exit_if_peer_lost(error: BaseException) -> None:
    """If `error` is a collective that failed because a peer died, hung or went out of reach: one line naming
    it and the step, then exit 75 at once (no teardown: another collective would wait on the same peer)."""
    w = _current
    if w is None or not is_peer_failure(error):
        return
    when = f"at step {w.step}" if w.step else "before step 1"
    line = (f"megapix: rank {w.rank} ({socket.gethostname()}): {w.who_stopped()} stopped answering {when} "
            f"({_first_line(error)}); exiting {EXIT_REQUEUE} so the job is requeued; --resume continues from the last "
            "complete checkpoint")
    _say(line)
    _tell_launcher(line)
    os._exit(EXIT_REQUEUE)


def _tell_launcher(line: str) -> None:
    """slurm/launch.sh names a file (MEGAPIX_PEER_LOST_FILE): the launcher's own exit code is the dead rank's,
    so this line is how the batch script learns that the others asked for a requeue. One short append each."""
    path = os.environ.get("MEGAPIX_PEER_LOST_FILE")
    if not path:
        return
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(line.removeprefix("megapix: ") + "\n")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*/gloo/[^\]]*\]\s*", "", text)  # gloo's source path prefix
    return text[:200]


def _say(line: str) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        os.write(2, (line + "\n").encode())
