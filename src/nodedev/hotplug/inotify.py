"""The three inotify(7) system calls, through the C library this process already runs on.

A few ctypes calls, not inotify_simple, whose `ctypes.util.find_library` costs
~20 ms of start-up: `nodedev serve` must register within 150 ms of starting.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

# inotify(7) event bits.
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name that follows
READ_SIZE = 64 * 1024
READS_PER_WAKEUP = 16
"""Reads per wake-up before the loop gets a turn; the descriptor stays readable for the rest."""


class Inotify:
    """The three inotify system calls, on a non-blocking close-on-exec descriptor."""

    _libc: ctypes.CDLL | None = None

    def __init__(self) -> None:
        if Inotify._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
            libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
            Inotify._libc = libc
        self._libc_ = Inotify._libc
        self.fd = self._call(self._libc_.inotify_init1, os.O_NONBLOCK | os.O_CLOEXEC)

    @staticmethod
    def _call(function: Callable[..., int], *args: object) -> int:
        while True:
            result = function(*args)
            if result != -1:
                return result
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))

    def add_watch(self, path: Path, mask: int) -> int:
        try:
            return self._call(self._libc_.inotify_add_watch, self.fd, os.fsencode(path), mask)
        except OSError as err:
            err.filename = str(path)
            raise

    def rm_watch(self, wd: int) -> None:
        try:
            self._call(self._libc_.inotify_rm_watch, self.fd, wd)
        except OSError:
            pass  # already gone with its directory

    def read(self) -> Iterator[tuple[int, int, str]]:
        """(wd, mask, name) of every event queued now; raises OSError only if the descriptor broke."""
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = os.fsdecode(data[start : start + length].split(b"\0", 1)[0])
                offset = start + length
                yield wd, mask, name

    def close(self) -> None:
        os.close(self.fd)
