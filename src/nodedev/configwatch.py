"""Following the config file: a change on disk reloads it as SIGHUP does.

The file's directory is watched (one inotify watch, shared through PathWatcher),
not the file: editors replace a file by renaming a new one over it, and a
Kubernetes ConfigMap volume never touches `config.yaml` at all. The kubelet
writes the new contents into a fresh `..<timestamp>` directory and swaps the
`..data` symlink that `config.yaml -> ..data/config.yaml` goes through. Any change
among the directory's entries, or a write to a file in it, makes the follower
read the file again; only when its bytes differ from what was last applied (or
refused) does it reload. So a swap's several events, the backstop's "anything may
have changed", and a `touch` cost one read each and no reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from nodedev.hotplug import Changes, PathWatcher, WatchHandle

log = logging.getLogger("nodedev.configwatch")

MAX_READ = (1 << 20) + 1
"""The config loader refuses more than 1 MiB; reading one byte past it is enough to differ."""


def digest(path: Path) -> str | None:
    """What the file holds now, as a hash; None if it cannot be read (the reload will say why)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(MAX_READ)).hexdigest()
    except OSError:
        return None


class ConfigFollower:
    def __init__(self, path: Path, paths: PathWatcher, reload: Callable[[], Awaitable[None]]) -> None:
        self.path = path
        self._paths = paths
        self._reload = reload
        self._touched = asyncio.Event()
        self._applied: str | None = None
        self._watch: WatchHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Watches from now on; the file as it is now counts as applied."""
        self._applied = digest(self.path)
        self._watch = self._paths.watch(self.path.parent, self._on_change, Changes.ENTRIES | Changes.WRITES)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="config-follow")

    def read_now(self) -> None:
        """A reload is about to read the file for another reason (SIGHUP): what it reads is
        applied, so the follower does not reload the same bytes again."""
        self._applied = digest(self.path)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _on_change(self, names: set[str]) -> None:
        self._touched.set()

    async def _follow(self) -> None:
        while True:
            await self._touched.wait()
            self._touched.clear()
            now = await asyncio.to_thread(digest, self.path)
            if now == self._applied:
                log.debug("%s: its directory changed, the file did not; nothing to reload", self.path)
                continue
            self._applied = now
            log.info("%s changed on disk; reloading it", self.path)
            await self._reload()
