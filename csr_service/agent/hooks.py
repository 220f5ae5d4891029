"""What runs after a write: ``--on-rotate COMMAND`` and ``--signal-pid-file FILE --signal SIG``.

For applications that load their certificate once and reload on a command or a signal (nginx
``-s reload``, HAProxy, Prometheus ``SIGHUP``). Both are best effort: a failing hook is logged
and counted but never undoes the write, and the next rotation runs it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from pathlib import Path

__all__ = ["Hooks"]

log = logging.getLogger(__name__)

#: A hook that hangs must not stall rotation forever.
HOOK_TIMEOUT = 60.0


class Hooks:
    def __init__(self, *, command: str | None, pid_file: Path | None, sig: signal.Signals) -> None:
        self._argv = shlex.split(command) if command else None
        self._pid_file = pid_file
        self._sig = sig

    async def after_write(self, output: str, env: dict[str, str]) -> None:
        """Run the command (argv, no shell; ``env`` added to ours), then send the signal."""
        if self._argv:
            await self._run(output, env)
        if self._pid_file is not None:
            self._signal(output)

    async def _run(self, output: str, env: dict[str, str]) -> None:
        assert self._argv is not None
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv,
                env={**os.environ, **env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            log.warning("--on-rotate: cannot run %s: %s", self._argv[0], exc)
            return
        try:
            _, err = await asyncio.wait_for(proc.communicate(), HOOK_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("--on-rotate: %s did not finish in %ss; killed", self._argv[0], HOOK_TIMEOUT)
            return
        if proc.returncode:
            tail = err.decode(errors="replace").strip()[-500:]
            log.warning(
                "--on-rotate: %s exited with %s after writing %s: %s", self._argv[0], proc.returncode, output, tail
            )
        else:
            log.info("--on-rotate: %s ran after writing %s", self._argv[0], output)

    def _signal(self, output: str) -> None:
        assert self._pid_file is not None
        try:
            pid = int(self._pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            log.warning("--signal-pid-file: no pid in %s (%s); %s not sent", self._pid_file, exc, self._sig.name)
            return
        try:
            os.kill(pid, self._sig)
        except OSError as exc:
            log.warning("--signal: cannot send %s to pid %d: %s", self._sig.name, pid, exc.strerror)
            return
        log.info("sent %s to pid %d after writing %s", self._sig.name, pid, output)
