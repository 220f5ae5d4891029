"""Start peer processes so that none outlives the test run.

Each peer runs in its own process group (so teardown can signal it and anything it forked) and
with ``PR_SET_PDEATHSIG`` = SIGKILL, so the kernel kills it if the Python process that started it
dies, even by SIGKILL. Caveat: the death signal fires when the *thread* that forked the child
exits, so start peers from the main thread (pytest fixtures do), not from a short-lived worker.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.support.waiting import wait_for

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def _child_setup() -> None:  # runs in the child between fork and exec: keep it minimal
    os.setpgid(0, 0)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and stays likely free until a server binds it.

    Chosen at random *below* the kernel's ephemeral range: a port from bind(0) comes from that
    range, and the many outgoing connections of a test run (apiserver clients, watches) can be
    given the very same port before our server binds it (seen in CI: "Address already in use").
    Never the same port twice in one test process.
    """
    high = _ephemeral_start() - 1
    low = max(1024, high - 12000)
    for _ in range(500):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded range: fall back
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeerStartupError(RuntimeError):
    """A peer did not become ready; the message carries the tail of its log."""


class ManagedProcess:
    """A peer process with its own process group and log file.

    ``stop()`` sends SIGTERM to the group, waits ``grace`` seconds, then SIGKILLs the group. It
    is idempotent and also runs at interpreter exit for anything still alive.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        grace: float = 10.0,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.grace = grace
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_child_setup,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        """The peer's process id (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the peer's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Poll ``check`` until it returns True; fail with the log tail on timeout or early exit."""
        last_exc: BaseException | None = None

        def ready() -> bool:
            nonlocal last_exc
            if not self.alive():
                raise self.startup_error(f"exited with code {self.proc.returncode} before {what}")
            try:
                return bool(check())
            except Exception as exc:  # readiness probes fail in many ways until the peer is up
                last_exc = exc
                return False

        try:
            wait_for(ready, timeout, what=what)
        except TimeoutError:
            detail = f" (last probe error: {last_exc!r})" if last_exc else ""
            raise self.startup_error(f"not {what} after {timeout:.0f}s{detail}") from None

    def startup_error(self, why: str) -> PeerStartupError:
        """A PeerStartupError naming the peer, the reason and its log tail."""
        return PeerStartupError(f"{self.name} {why}; log {self.log_path}:\n{self.tail()}")

    def stop(self) -> None:
        """Terminate the process group: SIGTERM, then SIGKILL after the grace period."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self.proc.poll() is None:
            _killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(self.grace)
        # Whatever the leader did, make sure no straggler in its group survives.
        _killpg(self.pid, signal.SIGKILL)
        # SIGKILL cannot be refused, but a big process (kube-apiserver) on a loaded machine can
        # take seconds to go; an unreaped Popen warns when collected, failing whichever test is
        # running then (seen in CI after an apiserver restart). So wait long, not forever.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        self._log.close()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _stop_all() -> None:
    # Normal teardown stops everything; this catches paths that skip fixture finalizers.
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        p.stop()
