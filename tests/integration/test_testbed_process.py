"""Peers never outlive the process that started them, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.waiting import wait_for
from tests.testbed.process import ManagedProcess

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, what: str) -> None:
    wait_for(lambda: _gone(pid), timeout=10, interval=0.05, what=what)


def test_peer_dies_with_a_killed_parent(tmp_path: Path) -> None:
    # A stand-in for pytest: starts a peer, then hangs until it is killed.
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from tests.testbed.process import ManagedProcess
        p = ManagedProcess("peer", ["sleep", "300"], Path("{tmp_path}/peer.log"))
        print(p.pid, flush=True)
        time.sleep(300)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            peer_pid = int(parent.stdout.readline())
            assert not _gone(peer_pid)

            parent.send_signal(signal.SIGKILL)
            parent.wait(10)

            _wait_gone(peer_pid, "the peer to die with its SIGKILLed parent")
        finally:
            if parent.poll() is None:
                parent.kill()


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild"
    proc = ManagedProcess(
        "peer",
        ["sh", "-c", f"trap '' TERM; sleep 300 & echo $! > {marker}; wait"],
        tmp_path / "peer.log",
        grace=1,
    )
    wait_for(
        lambda: marker.exists() and marker.read_text().strip(),
        timeout=10,
        interval=0.05,
        what=f"the shell to write its child's pid (peer log: {proc.log_path})",
    )
    grandchild = int(marker.read_text())

    proc.stop()  # the shell ignores SIGTERM: only the SIGKILL to the group can end it

    _wait_gone(proc.pid, "the peer to die")
    _wait_gone(grandchild, "the peer's child, which ignores SIGTERM, to die")
