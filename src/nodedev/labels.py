"""Node labels: every driver's `labels()`, merged and written as a Node Feature Discovery local feature file.

NFD's worker reads each file in `features.d` (hidden files excepted) as `key=value`
lines and puts the labels on the node; a file that goes away takes its labels
with it. nodedev writes one such file (default
`/etc/kubernetes/node-feature-discovery/features.d/nodedev`):

- after each scan, with every started driver's labels merged (a key two drivers
  give is taken from the first, in config order, and the clash logged once);
- atomically: a hidden temporary file beside it, fsynced, then renamed over it,
  so NFD never reads half a file;
- only when the content changes: a scan that changes no label touches nothing;
- not at all while its directory is missing (NFD is not deployed there): that
  is said once, and each later scan tries again;
- and it is removed at stop.

Labels are computed on the loop (each driver returns what its scan found); the
file is written in a worker thread, one write at a time, the last content
winning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodedev.files import write_atomically

if TYPE_CHECKING:
    from nodedev.inventory import Inventory

log = logging.getLogger("nodedev.labels")

DEFAULT_PATH = Path("/etc/kubernetes/node-feature-discovery/features.d/nodedev")
HEADER = "# Node labels from nodedev (Node Feature Discovery local features); rewritten as they change, removed at stop.\n"

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_PREFIX = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Source = tuple[str, Mapping[str, str]]
"""(driver name, its labels)."""


def label_problem(key: str, value: str) -> str | None:
    """Why Kubernetes (and NFD) would refuse this label; None if it is fine."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _PREFIX.match(prefix)):
        return f"label {key!r}: the prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _NAME.match(name):
        return f"label {key!r}: the name must be 1 to 63 of [A-Za-z0-9._-], starting and ending alphanumeric"
    if len(value) > 63 or not _VALUE.match(value):
        return f"label {key}={value!r}: the value must be at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric"
    return None


def merge(sources: Iterable[Source], said: set[str] | None = None) -> dict[str, str]:
    """Every driver's labels in one mapping; invalid ones and clashes are logged (once each, with `said`) and left out."""
    said = said if said is not None else set()
    merged: dict[str, str] = {}
    owner: dict[str, str] = {}
    for driver, labels in sources:
        for key, value in labels.items():
            problem = label_problem(key, value)
            if problem is None and key in owner and merged[key] != value:
                problem = f"label {key}: driver {owner[key]} gives {merged[key]!r}, kept over {value!r}"
            if problem is not None:
                if (line := f"driver {driver}: {problem}") not in said:
                    said.add(line)
                    log.warning("%s; left out", line)
                continue
            merged.setdefault(key, value)
            owner.setdefault(key, driver)
    return merged


def render(labels: Mapping[str, str]) -> str:
    """The file's text: a comment, then `key=value` lines sorted by key. No labels: an empty string."""
    if not labels:
        return ""
    return HEADER + "".join(f"{key}={labels[key]}\n" for key in sorted(labels))


class LabelWriter:
    """Keeps the feature file equal to what `sources()` says; see the module docstring.

    `refresh()` runs on the loop (from an inventory listener, or by hand after a
    reload); `close()` waits for a write in flight, then removes the file.
    """

    def __init__(self, path: Path, sources: Callable[[], Sequence[Source]]) -> None:
        self.path = path
        self._sources = sources
        self._said: set[str] = set()
        self._wanted = ""
        self._written: str | None = None
        """The text the file holds as far as this writer knows; None before the first write."""
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.writes = 0
        """Files written (for tests and the log)."""

    @classmethod
    def for_inventory(cls, inventory: Inventory, path: Path) -> LabelWriter:
        """A writer fed by every started driver of `inventory`, refreshed after each of its scans."""

        def sources() -> list[Source]:
            found: list[Source] = []
            for runner in inventory.runners.values():
                if runner.driver is not None:
                    try:
                        found.append((runner.name, runner.driver.labels()))
                    except Exception as err:  # noqa: BLE001 - one driver's bug must not stop the others' labels
                        writer._say(logging.WARNING, f"driver {runner.name}: labels() failed: {err!r}; its labels left out")
            return found

        writer = cls(path, sources)

        def listener(resource: str, devices: Any, changes: Any) -> None:
            writer.refresh()

        inventory.add_listener(listener)
        return writer

    @property
    def labels(self) -> dict[str, str]:
        """What the file should hold now."""
        return merge(self._sources(), self._said)

    def refresh(self) -> None:
        """Recomputes the labels (on the loop, no I/O) and starts a write if the text changed."""
        if self._closed:
            return
        self._wanted = render(self.labels)
        if self._wanted != self._written and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._write(), name="node-labels")

    async def flush(self) -> None:
        """Waits for the write in flight, if any (and those it chains)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """No more writes; the file goes (labels must not outlive the daemon that vouches for them)."""
        self._closed = True
        with contextlib.suppress(Exception):
            await self.flush()
        if self._written:
            await asyncio.to_thread(self._remove)
        self._written = None

    async def _write(self) -> None:
        while not self._closed and self._wanted != self._written:
            text = self._wanted
            try:
                if text:
                    await asyncio.to_thread(write_atomically, self.path, text)
                else:
                    await asyncio.to_thread(self._remove)
            except FileNotFoundError:  # no features.d: NFD is not deployed here (yet); not an error of ours
                self._say(logging.INFO, f"node labels not written: {self.path.parent} does not exist (is Node Feature "
                          "Discovery deployed?); tried again at each scan")
                return
            except OSError as err:
                self._say(logging.WARNING, f"node labels not written to {self.path}: {err.strerror or err}; tried again at each scan")
                return
            self._written = text
            if text:
                self.writes += 1
                log.info("node labels written to %s (%d)", self.path, text.count("\n") - 1)
            else:
                log.info("no node labels: %s removed", self.path)

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _say(self, level: int, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            log.log(level, "%s", line)
