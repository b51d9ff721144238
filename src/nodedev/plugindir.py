"""The kubelet's device-plugin directory, taken by one daemon at a time.

Two daemons on one directory would unlink each other's sockets. The lock is an
flock on the directory itself, not on a file in it: the kubelet's restart wipes
every file in the directory but its checkpoint, and a lock file would go with
them. The holder's PID comes from /proc/locks, so the refusal can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

PROC_LOCKS = Path("/proc/locks")


class PluginDirError(Exception):
    """The plugin directory cannot be used; one line naming the path and why."""


@dataclass
class PluginDirLock:
    path: Path
    fd: int

    @classmethod
    def acquire(cls, path: Path) -> PluginDirLock:
        """Makes the directory if needed, checks it is one, and takes it for this process."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise PluginDirError(f"pluginDir {path}: exists and is not a directory") from None
        except NotADirectoryError:
            raise PluginDirError(f"pluginDir {path}: a parent of it is not a directory") from None
        except OSError as err:
            raise PluginDirError(f"pluginDir {path}: cannot create it: {err.strerror}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise PluginDirError(f"pluginDir {path}: cannot open it: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PluginDirError(f"pluginDir {path}: cannot lock it: {err.strerror}") from None
            holder = lock_holder(path)
            who = f"PID {holder}" if holder else "another process"
            raise PluginDirError(f"pluginDir {path}: already served by another nodedev ({who}); one daemon per directory") from None
        if not os.access(path, os.W_OK):
            os.close(fd)
            raise PluginDirError(f"pluginDir {path}: not writable")
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def lock_holder(path: Path, locks: Path = PROC_LOCKS) -> int | None:
    """The PID holding an flock on `path`, read from /proc/locks, or None if not found.

    Lines look like `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`, the device
    as hex major:minor and the inode in decimal.
    """
    try:
        st = path.stat()
        text = locks.read_text()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in text.splitlines():
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:
            continue
        try:
            at = fields.index("FLOCK")
            pid, where = int(fields[at + 3]), fields[at + 4]
            major, minor, inode = where.split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                return pid
        except (IndexError, ValueError):
            continue
    return None
