"""The `nodedev` command: serve, discover, watch, status.

Only argparse, logging and the version are imported up front, so `--version`
and `--help` answer at once; each command imports what it uses when it runs
(the config's pydantic and YAML for every command, gRPC only for `serve` and
`watch --connect`, the hotplug engine only for `serve` and `watch`).

Exit codes: 0 done, 1 an environment problem (the daemon's own verdict, a
driver that would not start in `discover`, or an unexpected error, shown as
one line), 2 a config or `--simulate` problem, shown as one line naming the
file and key.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from nodedev import __version__, logs

if TYPE_CHECKING:
    from nodedev.config import Config
    from nodedev.driver import Device
    from nodedev.inventory import Inventory

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
DEFAULT_CONFIG = Path("/etc/nodedev/config.yaml")
"""Same as config.DEFAULT_PATH (a test checks), kept here so `--help` does not load pydantic."""

log = logging.getLogger("nodedev")

Reload = Callable[[], "Config"]
Command = Callable[["Config", argparse.Namespace, Reload], Coroutine[Any, Any, int]]


class _Refused(Exception):
    """A problem already worded for one line of stderr, and the exit code it ends in."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.line = line
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command and returns its exit code; whatever goes wrong ends as one line on stderr."""
    args = _parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    # nodedev uses no pydantic plugins; looking for them scans every installed
    # distribution's metadata, a real part of the time to start.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        with _simulate_workdir(args.simulate) as workdir:
            cfg, reload = _config(args, workdir)
            return _run(args, cfg, reload)
    except _Refused as err:
        print(err.line, file=sys.stderr)
        return err.code
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        return EXIT_OK
    except Exception as err:  # the last guard: one line, never a traceback (that goes to the debug log)
        log.debug("unexpected error", exc_info=True)
        print(f"nodedev: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR


def entry() -> NoReturn:
    """The `nodedev` program: main(), then an exit that does not wait on interpreter teardown.

    Once a command has returned, its sockets are removed and its output is flushed;
    what is left is tearing down gRPC and every module, which takes longer than the
    whole stop phase, and joining worker threads, one of which may be stuck in a
    driver's library call. Neither may delay a SIGTERM'd daemon's exit.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader that went away
            pass
    os._exit(code)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def _simulate_workdir(fixture: str | None) -> Iterator[Path | None]:
    """A temporary directory for --simulate's trees, removed at exit; nothing is made without it."""
    if fixture is None:
        yield None
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nodedev-sim-") as workdir:
        yield Path(workdir)


def _config(args: argparse.Namespace, workdir: Path | None) -> tuple[Config, Reload]:
    """The config, and how to read it again: the file, with --simulate's keys merged over it."""
    from nodedev import config

    overrides = _simulate(args.simulate, workdir)
    path = args.config or (None if args.simulate else config.DEFAULT_PATH)

    def reload() -> Config:
        return config.load(path, overrides)

    try:
        return reload(), reload
    except config.ConfigError as err:
        raise _Refused(f"nodedev: config error: {err}", EXIT_CONFIG) from None


def _simulate(fixture: str | None, workdir: Path | None) -> dict[str, Any]:
    """The config keys --simulate sets over the file, after building the simulated node."""
    if fixture is None or workdir is None:
        return {}
    from nodedev import simulate

    try:
        overrides = simulate.prepare(fixture, workdir)
    except simulate.SimulateError as err:
        raise _Refused(f"nodedev: --simulate: {err}", EXIT_CONFIG) from None
    log.info("simulating %s", fixture)
    return overrides


def _run(args: argparse.Namespace, cfg: Config, reload: Reload) -> int:
    """Runs the command on its own loop; its return value is the exit code, passed through."""
    import asyncio

    command: Command = _COMMANDS[args.command]
    try:
        return asyncio.run(command(cfg, args, reload))
    except BrokenPipeError:  # `nodedev discover | head`
        sys.stderr.close()
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodedev", description="Serve a node's special devices to the kubelet.")
    parser.add_argument("--version", action="version", version=f"nodedev {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon: serve every enabled driver's resources")
    _add_common(serve, log_level="info")
    serve.set_defaults(command="serve")

    discover = sub.add_parser("discover", help="show what each enabled driver finds, and exit")
    _add_common(discover, log_level="warning")
    discover.add_argument("--json", action="store_true", help="machine-readable output")
    discover.set_defaults(command="discover")

    watch = sub.add_parser("watch", help="print every device and health change as it happens")
    _add_common(watch, log_level="warning")
    watch.add_argument(
        "--connect", action="store_true", help="follow a running daemon through its status socket instead of running the drivers here"
    )
    watch.set_defaults(command="watch")

    status = sub.add_parser("status", help="ask the running daemon what it serves, its registrations and failed drivers")
    _add_common(status, log_level="warning")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(command="status")
    return parser


def _add_common(parser: argparse.ArgumentParser, log_level: str) -> None:
    """The options every command takes, added to each subparser on its own.

    Not an argparse parent parser: parents share their Action objects, so one
    subparser's set_defaults(log_level=...) would change every command's default.
    """
    parser.add_argument("--config", type=Path, metavar="PATH", help=f"node config file (default: {DEFAULT_CONFIG})")
    parser.add_argument(
        "--simulate",
        metavar="FIXTURE",
        help="run on a simulated node: one a driver ships, by name, or a fixture file a driver reads",
    )
    parser.add_argument(
        "--log-level", default=log_level, choices=["debug", "info", "warning", "error"], help=f"(default: {log_level})"
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])


async def _serve(cfg: Config, args: argparse.Namespace, reload: Reload) -> int:
    from nodedev.daemon import Daemon

    return await Daemon(cfg, reload=reload).run()


async def _watch(cfg: Config, args: argparse.Namespace, reload: Reload) -> int:
    from nodedev import watch

    return await (watch.watch_daemon(cfg.plugin_dir, cfg.status_socket) if args.connect else watch.watch_in_process(cfg))


async def _discover(cfg: Config, args: argparse.Namespace, reload: Reload) -> int:
    """Prints what every enabled driver finds; exit 1 if any of them could not start."""
    from nodedev.inventory import Inventory

    inventory = Inventory(cfg)
    await inventory.start(hotplug=False)
    try:
        rows = _rows(inventory)
        if args.json:
            import json

            print(json.dumps(rows, indent=2))
        else:
            print(_table(rows))
    finally:
        await inventory.stop()
    return EXIT_ERROR if any(runner.driver is None for runner in inventory.runners.values()) else EXIT_OK


async def _status(cfg: Config, args: argparse.Namespace, reload: Reload) -> int:
    """Asks the daemon serving this config's pluginDir over its status socket; exit 1 if none answers."""
    from nodedev import status

    path = status.socket_path(cfg.plugin_dir, cfg.status_socket)
    try:
        report = status.fetch(path)
    except status.StatusError as err:
        raise _Refused(f"nodedev: status: {err}", EXIT_ERROR) from None
    if args.json:
        import json

        print(json.dumps(report, indent=2))
        return EXIT_OK
    rows: list[dict[str, object]] = [
        {"driver": d["name"], "resource": None, "error": d["error"], "devices": []} for d in report["drivers"] if d["error"] is not None
    ]
    rows += [{"driver": r["driver"], "resource": r["name"], "devices": r["devices"]} for r in report["resources"]]
    print(status.summary(report))
    print()
    print(_table(rows))
    return EXIT_OK


_COMMANDS: dict[str, Command] = {"serve": _serve, "discover": _discover, "watch": _watch, "status": _status}


def _rows(inventory: Inventory) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for runner in inventory.runners.values():
        if runner.driver is None:
            rows.append({"driver": runner.name, "resource": None, "error": runner.error, "devices": []})
            continue
        for resource, devices in sorted(runner.devices.items()):
            rows.append({"driver": runner.name, "resource": resource, "devices": [_device_json(d) for d in devices.values()]})
    return rows


def _device_json(device: Device) -> dict[str, object]:
    return {"id": device.id, "health": device.health.value, "reason": device.reason, "numa": list(device.numa_nodes)}


def _table(rows: list[dict[str, object]]) -> str:
    lines = [("DRIVER", "RESOURCE", "DEVICES", "HEALTH", "NUMA", "REASON")]
    for row in rows:
        if row["resource"] is None:
            lines.append((str(row["driver"]), "-", "-", "FAILED", "-", str(row["error"])))
            continue
        devices: list[dict[str, object]] = row["devices"]  # type: ignore[assignment]
        if not devices:
            lines.append((str(row["driver"]), str(row["resource"]), "(none)", "-", "-", ""))
        for ids, dev in _runs(devices):
            numa = ",".join(map(str, dev["numa"])) or "-"  # type: ignore[call-overload]
            lines.append((str(row["driver"]), str(row["resource"]), ids, str(dev["health"]), numa, str(dev["reason"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1] for line in lines)


def _runs(devices: list[dict[str, object]]) -> list[tuple[str, dict[str, object]]]:
    """Folds consecutive devices that differ only in a numbered ID (kvm0..kvm999) into one row."""
    from nodedev.inventory import natural_key

    out: list[tuple[str, dict[str, object]]] = []
    run: list[dict[str, object]] = []

    def flush() -> None:
        if len(run) > 2:
            out.append((f"{run[0]['id']}..{run[-1]['id']} ({len(run)})", run[0]))
        else:
            out.extend((str(d["id"]), d) for d in run)
        run.clear()

    for dev in sorted(devices, key=lambda d: natural_key(str(d["id"]))):
        if run and not _same_but_id(run[-1], dev):
            flush()
        run.append(dev)
    flush()
    return out


def _same_but_id(a: dict[str, object], b: dict[str, object]) -> bool:
    return _stem(a) == _stem(b) and all(a[k] == b[k] for k in ("health", "reason", "numa"))


def _stem(device: dict[str, object]) -> str:
    return re.sub(r"\d+$", "", str(device["id"]))
