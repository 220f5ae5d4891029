"""Atomic file writes: a reader (or a crash) never sees half a key or half a chain, nor a key
from one set beside a certificate from another (:func:`write_file_set`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DATA_LINK", "write_atomic", "write_file_set"]


def write_atomic(path: str | Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, rename.

    The temp file is created with ``mode`` from the start (0600 for keys), so a private key
    is never world-readable, not even for an instant.
    """
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: The symlink that names the current version directory (Kubernetes' AtomicWriter uses ``..data``).
DATA_LINK = "..data"
_VERSION_PREFIX = "..v-"


def write_file_set(directory: str | Path, files: Mapping[str, tuple[bytes, int]]) -> Path:
    """Publish ``files`` (name -> (content, mode)) in ``directory`` as one set, atomically.

    Kubernetes' AtomicWriter scheme (how Secret and ConfigMap volumes are updated): the files
    go to a new hidden version directory ``..v-<random>``, fsynced; then the symlink ``..data``
    is pointed at it with one ``rename`` (atomic on POSIX); each visible name is a symlink
    ``name -> ..data/name``, created once. So every path lookup resolves through exactly one
    version directory: at any instant the directory shows either the whole old set or the whole
    new one, never a new certificate beside an old key. The previous version directory is kept
    until the next write, so a reader that resolved ``..data`` just before a swap still reads a
    complete (old) set; older ones are removed. Names not in ``files`` that were published
    before stay pointing into ``..data`` (and so disappear from view if the new set lacks them).

    Each file is created with its mode from the start (0600 for keys). Returns the new version
    directory.
    """
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    for name in files:
        if "/" in name or name.startswith(".") or not name:
            raise ValueError(f"file set names must be plain, visible file names, got {name!r}")
    previous = _current_version(base)
    version = Path(tempfile.mkdtemp(prefix=_VERSION_PREFIX, dir=base))
    try:
        # Readable like the directory it replaces (apps list it); each file keeps its own mode.
        os.chmod(version, 0o755)  # noqa: S103
        for name, (payload, mode) in files.items():
            fd = os.open(version / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)  # the umask must not widen or narrow it
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(version)
        _replace_symlink(base / DATA_LINK, version.name)
        for name in files:
            link = base / name
            target = f"{DATA_LINK}/{name}"
            if not (link.is_symlink() and os.readlink(link) == target):
                _replace_symlink(link, target)
        _fsync_dir(base)
    except BaseException:
        if _current_version(base) != version.name:
            shutil.rmtree(version, ignore_errors=True)
        raise
    for old in base.glob(_VERSION_PREFIX + "*"):
        if old.name not in (version.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return version


def _current_version(base: Path) -> str | None:
    try:
        return os.readlink(base / DATA_LINK)
    except OSError:
        return None


def _replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` with one rename (replaces a file or link of that name)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
