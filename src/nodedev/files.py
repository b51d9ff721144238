"""Files other programs read while we rewrite them: NFD's label file, CDI specs, CNI device-info files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path | str, text: str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replaces `path` with `text` in one rename: a reader sees the old file or the new one, whole.

    The temporary file is hidden (`.<name>.<pid>.tmp`), so a reader that lists the
    directory (NFD, a container runtime looking for CDI specs) skips it; its mode is
    set whatever the umask, since the reader may run as another user. `durable`
    also syncs the file and the directory, so the new file survives a crash; the
    CNI device-info files, 4,096 of them on a large node and on tmpfs, skip that.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, text.encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        with contextlib.suppress(OSError):  # the rename itself survives a crash
            dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
