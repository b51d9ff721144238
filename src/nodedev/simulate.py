"""`--simulate FIXTURE`: run the host on a node that a driver simulates.

The host knows no vendor here. Each driver lists the simulated nodes it ships
(`Driver.simulations()`) and builds one on request (`Driver.simulate()`),
returning its own config section; `prepare` asks the drivers in turn and hands
the CLI a partial config to merge over the user's file. Because a driver's
section sets only that driver's roots (`sysfsRoot`, `devRoot`, `procRoot`), the
drivers that are not simulated keep reading the real /sys and /dev.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodedev import drivers


class SimulateError(ValueError):
    """No driver takes the fixture, or the driver that takes it cannot build it (one line)."""


def shipped() -> dict[str, list[str]]:
    """Driver name -> the simulated nodes it ships, for drivers that ship any."""
    found: dict[str, list[str]] = {}
    for name in drivers.NAMES:
        names = list(drivers.load(name).simulations())
        if names:
            found[name] = names
    return found


def prepare(fixture: str, workdir: Path) -> dict[str, Any]:
    """`{"drivers": {<name>: <section>}}` from the first driver that takes `fixture`.

    `fixture` is a shipped name or a path to a file; the driver builds what it
    needs under `workdir/<name>`. Raises SimulateError when no driver takes it,
    naming the fixture and every shipped name, or when the driver that takes it
    fails (a file that does not parse, a fake library not built).
    """
    for name in drivers.NAMES:
        cls = drivers.load(name)
        try:
            section = cls.simulate(fixture, Path(workdir) / name)
        except (ValueError, OSError) as err:
            raise SimulateError(f"{fixture}: drivers.{name}: {_one_line(err)}") from None
        if section is not None:
            return {"drivers": {name: section}}
    raise SimulateError(f"no simulated node {fixture!r}: not a file any driver reads, nor a shipped one ({_shipped_list()})")


def _shipped_list() -> str:
    listed = [f"{name}: {', '.join(sorted(names))}" for name, names in shipped().items()]
    return "; ".join(listed) or "no driver ships one"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
