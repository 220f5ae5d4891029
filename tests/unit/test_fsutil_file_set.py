"""write_file_set: a directory of files replaced as one set (Kubernetes' AtomicWriter scheme)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from csr_service.infra.fsutil import DATA_LINK, write_file_set


def _set(n: int) -> dict[str, tuple[bytes, int]]:
    return {"cert-chain.pem": (f"cert {n}".encode(), 0o644), "key.pem": (f"key {n}".encode(), 0o600)}


def test_files_modes_and_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out).mkdir()
    (out / "key.pem").write_text("a plain file from an older writer")
    write_file_set(out, _set(1))
    assert (out / "key.pem").read_bytes() == b"key 1"
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "cert-chain.pem").stat().st_mode) == 0o644
    assert os.readlink(out / "key.pem") == f"{DATA_LINK}/key.pem"
    for n in range(2, 6):
        write_file_set(out, _set(n))
    # The current and the previous version directory remain; older ones are removed.
    versions = sorted(p.name for p in out.iterdir() if p.name.startswith("..v-"))
    assert len(versions) == 2
    assert os.readlink(out / DATA_LINK) in versions
    assert (out / "cert-chain.pem").read_bytes() == b"cert 5"


def test_a_reader_never_sees_a_mixed_set(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_file_set(out, _set(0))
    stop = threading.Event()
    seen: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []
    misses: list[int] = []

    def reader() -> None:
        # Resolve ..data once (a directory fd) and read both files from that one version: what
        # "one atomic set" promises. A version directory is removed two writes after it was
        # replaced, so a reader descheduled that long between its calls may find it gone
        # (counted, allowed: it retries); it can never find a mixed pair.
        while not stop.is_set():
            try:
                fd = os.open(out / DATA_LINK, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    seen.append((_read_at(fd, "cert-chain.pem"), _read_at(fd, "key.pem")))
                finally:
                    os.close(fd)
            except FileNotFoundError:
                misses.append(1)
            # The visible names exist at every instant (the symlinks are never removed).
            try:
                (out / "key.pem").read_bytes()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for n in range(1, 100):
        write_file_set(out, _set(n))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) > 10
    assert all(cert[5:] == key[4:] for cert, key in seen), "a certificate beside another set's key"


def _read_at(dirfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
