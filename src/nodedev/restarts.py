"""Noticing kubelet restarts: inotify on the device-plugin directory.

A starting kubelet deletes every socket in the directory and creates a fresh
kubelet.sock. Either sign is enough: a socket of ours vanishing means serve it
again and re-register; a new kubelet.sock means re-register everything. The
watch is event-driven; a slow backstop check covers a watch that was lost (the
directory itself replaced, an inotify queue overflow).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify, flags

log = logging.getLogger("nodedev.restarts")

_MASK = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.DELETE_SELF | flags.MOVE_SELF


class PluginDirWatch:
    """Calls `on_change(names)` on the loop with the file names created or removed in a batch.

    An empty set means "something may have been missed": the caller checks everything.
    """

    def __init__(self, plugin_dir: Path, on_change: Callable[[set[str]], None]) -> None:
        self.plugin_dir = plugin_dir
        self._on_change = on_change
        self._inotify = INotify(nonblocking=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: int | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()
        loop.add_reader(self._inotify.fileno(), self._read)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._inotify.fileno())
        self._inotify.close()

    def check(self) -> None:
        """The backstop: re-arms a lost watch and asks the caller to check everything."""
        if self._watch is None or not self.plugin_dir.is_dir():
            self._arm()
        self._on_change(set())

    def _arm(self) -> None:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self._watch = self._inotify.add_watch(self.plugin_dir, _MASK)

    def _read(self) -> None:
        names: set[str] = set()
        lost = False
        for event in self._inotify.read(timeout=0):
            if event.mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED | flags.Q_OVERFLOW):
                lost = True
            elif event.name:
                names.add(event.name)
        if lost:
            log.warning("watch on %s lost (directory replaced or events overflowed); checking everything", self.plugin_dir)
            self._watch = None
            self._arm()
            names = set()
        self._on_change(names)
