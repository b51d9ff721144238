"""The `nodedev` command: serve, discover, watch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from nodedev import __version__, config, logs
from nodedev.driver import Device
from nodedev.inventory import Inventory, natural_key

EXIT_CONFIG = 2

log = logging.getLogger("nodedev")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    with tempfile.TemporaryDirectory(prefix="nodedev-sim-") as workdir:
        try:
            cfg, args.reload = _config(args, Path(workdir))
        except config.ConfigError as err:
            print(f"nodedev: config error: {err}", file=sys.stderr)
            return EXIT_CONFIG
        except (ValueError, FileNotFoundError) as err:  # a fixture that is not there or does not parse
            print(f"nodedev: --simulate: {err}", file=sys.stderr)
            return EXIT_CONFIG
        return _run(args, cfg)


def _config(args: argparse.Namespace, workdir: Path) -> tuple[config.Config, Callable[[], config.Config]]:
    """The config, and how to read it again: the file, with --simulate's keys merged over it."""
    overrides: dict[str, object] = {}
    path = args.config or (None if args.simulate else config.DEFAULT_PATH)
    if args.simulate:
        from nodedev import simulate

        node = simulate.prepare(simulate.resolve_fixture(args.simulate), workdir)
        log.info("simulating %s: %d GPU(s) from %s", args.simulate, len(node.gpus), node.fixture)
        overrides = node.config_overrides()
    reload = lambda: config.load(path, overrides)  # noqa: E731
    return reload(), reload


def _run(args: argparse.Namespace, cfg: config.Config) -> int:
    try:
        return asyncio.run(args.command(cfg, args))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `nodedev discover | head`
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="PATH", help=f"node config file (default: {config.DEFAULT_PATH})")
    common.add_argument(
        "--simulate",
        metavar="FIXTURE",
        help="run on a simulated node: a fake NVML from FIXTURE (gpu-1, dgx-8, mig, or a path), with matching sysfs and /dev trees",
    )
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    common.add_argument("--log-format", default="text", choices=["text", "json"])

    parser = argparse.ArgumentParser(prog="nodedev", description="Serve a node's special devices to the kubelet.")
    parser.add_argument("--version", action="version", version=f"nodedev {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the daemon: serve every enabled driver's resources")
    serve.set_defaults(command=_serve)

    discover = sub.add_parser("discover", parents=[common], help="show what each enabled driver finds, and exit")
    discover.add_argument("--json", action="store_true", help="machine-readable output")
    discover.set_defaults(log_level="warning")
    discover.set_defaults(command=_discover)

    watch = sub.add_parser("watch", parents=[common], help="print every device and health change as it happens")
    watch.add_argument("--connect", action="store_true", help="follow a running daemon's sockets in pluginDir instead of running the drivers here")
    watch.set_defaults(command=_watch, log_level="warning")
    return parser


async def _serve(cfg: config.Config, args: argparse.Namespace) -> int:
    from nodedev.daemon import Daemon  # gRPC is loaded only by the commands that use it

    return await Daemon(cfg, reload=args.reload).run()


async def _watch(cfg: config.Config, args: argparse.Namespace) -> int:
    from nodedev import watch

    return await (watch.watch_daemon(cfg.plugin_dir) if args.connect else watch.watch_in_process(cfg))


async def _discover(cfg: config.Config, args: argparse.Namespace) -> int:
    inventory = Inventory(cfg)
    await inventory.start(hotplug=False)
    try:
        rows = _rows(inventory)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(_table(rows))
    finally:
        await inventory.stop()
    return 0


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
            numa = ",".join(map(str, dev["numa"])) or "-"  # type: ignore[arg-type]
            lines.append((str(row["driver"]), str(row["resource"]), ids, str(dev["health"]), numa, str(dev["reason"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def _runs(devices: list[dict[str, object]]) -> list[tuple[str, dict[str, object]]]:
    """Folds consecutive devices that differ only in a numbered ID (kvm0..kvm999) into one row."""
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
    stem = lambda d: re.sub(r"\d+$", "", str(d["id"]))  # noqa: E731
    return stem(a) == stem(b) and all(a[k] == b[k] for k in ("health", "reason", "numa"))


