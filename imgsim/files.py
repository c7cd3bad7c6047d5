"""Small file utilities shared by the modules that write or verify files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, whole."""
    publish(stage(path, data), path)


def stage(path: Path, data: bytes) -> Path:
    """Write `data`, fsynced, to a hidden temporary file beside `path`; `publish` puts it in place."""
    import tempfile  # writers only: it costs a cold search ~5-10 ms (random, shutil)

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard(Path(tmp))
        raise
    return Path(tmp)


def publish(staged: Path, path: Path) -> None:
    """Rename a staged file over `path` and make the rename durable."""
    os.replace(staged, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def discard(staged: Path) -> None:
    try:
        os.unlink(staged)
    except OSError:
        pass


def leftover_stages(path: Path) -> list[Path]:
    """Temporary files `stage` left beside `path` when a process died before publishing them."""
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def why_not_writable(path: Path) -> str | None:
    """Why this process cannot write `path` (a file or folder): "is on a read-only file system" or
    "is not writable" (permissions, an immutable folder); None if it can."""
    if os.access(path, os.W_OK):
        return None
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        pass
    return "is not writable"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
