"""Malformed config files: each is one line naming the file and the key, exit code 2, and nothing on disk.

The table pins the exact message for config.load; a few go through the real
command line to check the exit code, the single stderr line and that no
directory was created.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nodedev import config
from tests.conftest import nodedev_command

LAUGHS = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10 if i else ["1"] * 10) + "]\n" for i in range(6))
"""'Billion laughs': six lines that expand to a million values."""

ABSOLUTE = "must be an absolute path (starting with /), got"
HOST = "is not a host name or IP address (an IPv6 address goes in brackets: [::1]:9465)"
RESYNC = "must be 0 (off) or from 1 to 86400 seconds, got"

MALFORMED: list[tuple[str, str | bytes, str]] = [
    # Paths: absolute, no NUL, and room for the socket names.
    ("empty-plugin-dir", "pluginDir: ''\n", f"pluginDir: {ABSOLUTE} ''"),
    ("relative-plugin-dir", "pluginDir: var/lib/kubelet/device-plugins\n", f"pluginDir: {ABSOLUTE} 'var/lib/kubelet/device-plugins'"),
    ("relative-sysfs-root", "sysfsRoot: sys\n", f"sysfsRoot: {ABSOLUTE} 'sys'"),
    ("relative-dev-root", "devRoot: ./dev\n", f"devRoot: {ABSOLUTE} './dev'"),
    ("tilde-proc-root", "procRoot: '~/proc'\n", f"procRoot: {ABSOLUTE} '~/proc'"),
    ("nul-in-path", 'pluginDir: "/tmp/a\\0b"\n', "pluginDir: must not contain a NUL byte, got '/tmp/a\\x00b'"),
    ("driver-sysfs-root", "drivers:\n  kvm: {enabled: true, sysfsRoot: sys}\n", f"drivers.kvm.sysfsRoot: {ABSOLUTE} 'sys'"),
    ("driver-dev-root", "drivers:\n  tun: {devRoot: dev}\n", f"drivers.tun.devRoot: {ABSOLUTE} 'dev'"),
    ("driver-proc-root", "drivers:\n  vhost-net: {enabled: true, procRoot: ''}\n", f"drivers.vhost-net.procRoot: {ABSOLUTE} ''"),
    (
        "plugin-dir-too-long",
        "pluginDir: /" + "p" * 58 + "\n",
        "pluginDir: is 59 bytes long; at most 58, so that <pluginDir>/nodedev-<resource>.sock fits the 107-byte limit"
        " of a unix socket path",
    ),
    # Repeated keys, which PyYAML would silently resolve to the last.
    ("duplicate-top", "pluginDir: /a\npluginDir: /b\n", "pluginDir: duplicate key on line 2 (first on line 1)"),
    (
        "duplicate-nested",
        "drivers:\n  kvm:\n    enabled: true\n    shares: 2\n    shares: 5\n",
        "drivers.kvm.shares: duplicate key on line 5 (first on line 4)",
    ),
    (
        "duplicate-flow",
        "hotplug: {source: udev, source: kernel}\n",
        "hotplug.source: duplicate key on line 1 (first earlier on the same line)",
    ),
    ("duplicate-quoted", "drivers:\n  kvm: {}\n  'kvm': {enabled: true}\n", "drivers.kvm: duplicate key on line 3 (first on line 2)"),
    # Nesting and size: bounded work however the document is shaped.
    ("ten-thousand-brackets", "[" * 10_000, "[0][0][0][0][0][0][0][0]...: nested more than 32 levels deep (line 1)"),
    (
        "deep-blocks",
        "a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(40)),
        "a.k0.k1.k2.k3.k4.k5.k6...: nested more than 32 levels deep (line 33)",
    ),
    ("alias-cycle", "drivers: &d\n  kvm: *d\n", "drivers.kvm.kvm.kvm.kvm.kvm.kvm.kvm...: nested more than 32 levels deep through aliases"),
    ("billion-laughs", LAUGHS, "l3[7][8][8][5]: the document has more than 10000 values once aliases are expanded"),
    ("many-values", "".join(f"k{i}: 1\n" for i in range(6000)), "(top level): the document has more than 10000 values (line 5000)"),
    # Tags and scalars.
    ("unknown-tag", "pluginDir: !secret x\n", "pluginDir: unsupported tag '!secret' (line 1)"),
    ("bad-int-tag", "hotplug: {resyncSeconds: !!int ten}\n", "hotplug.resyncSeconds: cannot read 'ten' as int (line 1)"),
    ("bad-timestamp-tag", "pluginDir: !!timestamp soon\n", "pluginDir: cannot read 'soon' as timestamp (line 1)"),
    # Numbers.
    ("resync-microsecond", "hotplug: {resyncSeconds: 0.000001}\n", f"hotplug.resyncSeconds: {RESYNC} 1e-06"),
    ("resync-half-second", "hotplug: {resyncSeconds: 0.5}\n", f"hotplug.resyncSeconds: {RESYNC} 0.5"),
    ("resync-negative", "hotplug: {resyncSeconds: -1}\n", f"hotplug.resyncSeconds: {RESYNC} -1.0"),
    ("resync-over-a-day", "hotplug: {resyncSeconds: 86401}\n", f"hotplug.resyncSeconds: {RESYNC} 86401.0"),
    ("resync-nan", "hotplug: {resyncSeconds: .nan}\n", f"hotplug.resyncSeconds: {RESYNC} nan"),
    ("resync-inf", "hotplug: {resyncSeconds: .inf}\n", f"hotplug.resyncSeconds: {RESYNC} inf"),
    # metricsAddress hosts.
    ("metrics-space", "metricsAddress: 'local host:9465'\n", f"metricsAddress: 'local host' {HOST}"),
    ("metrics-bare-ipv6", "metricsAddress: '::1:9465'\n", f"metricsAddress: '::1' {HOST}"),
    ("metrics-bad-ipv4", "metricsAddress: '999.0.0.1:9465'\n", f"metricsAddress: '999.0.0.1' {HOST}"),
    ("metrics-hyphens", "metricsAddress: '-node-:9465'\n", f"metricsAddress: '-node-' {HOST}"),
    ("metrics-underscore", "metricsAddress: 'node_1:9465'\n", f"metricsAddress: 'node_1' {HOST}"),
    ("metrics-bad-brackets", "metricsAddress: '[not-ipv6]:9465'\n", f"metricsAddress: '[not-ipv6]' {HOST}"),
    # Unknown keys (refused before this change, untested until now).
    ("unknown-top-key", "plugindir: /var/lib/kubelet/device-plugins\n", "plugindir: unknown key"),
    ("unknown-hotplug-key", "hotplug: {source: udev, resync: 30}\n", "hotplug.resync: unknown key"),
    ("unknown-hotplug-case", "hotplug: {resyncseconds: 30}\n", "hotplug.resyncseconds: unknown key"),
    # Keys and values that could break the one line.
    ("integer-key", "1: one\n", "(top level): key 1: must be a string"),
    ("newline-in-key", '"plugin\\nDir": /x\n', "'plugin\\nDir': unknown key"),
    (
        "huge-value",
        "pluginDir: [" + "'/x', " * 1000 + "]\n",
        "pluginDir: Input should be a valid string (got ['/x', '/x', '/x', '/x', ...])",
    ),
    ("escape-character", "pluginDir: /a\x1b[31m\n", "line 1, column 14: character U+001B is not allowed in YAML"),
    (
        "two-documents",
        "pluginDir: /a\n---\npluginDir: /b\n",
        "(top level): not valid YAML (line 2, column 1): expected a single document in the stream, but found another document",
    ),
    (
        "unclosed-flow",
        "drivers:\n  kvm: {enabled: true\n",
        "drivers.kvm: not valid YAML (line 3, column 1): expected ',' or '}', but got '<stream end>'",
    ),
    # Bytes.
    ("latin-1", b"pluginDir: /var/lib/caf\xe9\n", "not UTF-8 text (byte 23, 0xe9, on line 1)"),
    ("utf-16", "pluginDir: /x\n".encode("utf-16"), "not UTF-8 text (byte 0, 0xff, on line 1)"),
]


@pytest.mark.parametrize(("text", "message"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_malformed_file_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())

    with pytest.raises(config.ConfigError) as caught:
        config.load(path)

    assert str(caught.value) == f"{path}: {message}"


EDGES: list[tuple[str, list[str], str, str]] = [
    (
        "resync-range",
        [f"hotplug: {{resyncSeconds: {seconds}}}\n" for seconds in ("0", "1", "2.5", "86400")],
        "hotplug: {resyncSeconds: 0.999}\n",
        f"hotplug.resyncSeconds: {RESYNC} 0.999",
    ),
    (
        "metrics-hosts",
        [f"metricsAddress: '{host}:9465'\n" for host in ("", "0.0.0.0", "[::]", "[fe80::1]", "localhost", "node-1.example.com.")],
        "metricsAddress: 'node 1:9465'\n",
        f"metricsAddress: 'node 1' {HOST}",
    ),
    (
        "plugin-dir-58-bytes",
        ["pluginDir: /" + "p" * 57 + "\n", "pluginDir: /var/snap/microk8s/common/var/lib/kubelet/device-plugins/\n"],
        "pluginDir: /" + "p" * 58 + "\n",
        "pluginDir: is 59 bytes long; at most 58",
    ),
    (
        "merge-keys-and-aliases",
        ["drivers:\n  kvm:\n    <<: {enabled: true, shares: 3}\n    shares: 4\n", "drivers:\n  kvm: &k {enabled: true}\n  tun: *k\n"],
        "drivers:\n  kvm:\n    <<: {enabled: true}\n    shares: 3\n    shares: 4\n",
        "drivers.kvm.shares: duplicate key on line 5 (first on line 4)",
    ),
]


@pytest.mark.parametrize(("accepted", "refused", "message"), [case[1:] for case in EDGES], ids=[case[0] for case in EDGES])
def test_each_limit_refuses_one_step_past_the_edge_and_nothing_before_it(accepted: list[str], refused: str, message: str) -> None:
    """The bounds refuse nonsense only: the edges of each range, and YAML merge keys, still load."""
    for text in accepted:
        config.parse(text, Path("c.yaml"))

    with pytest.raises(config.ConfigError) as caught:
        config.parse(refused, Path("c.yaml"))
    assert str(caught.value).startswith(f"c.yaml: {message}")


CLI_CASES = [
    ("relative-plugin-dir", b"pluginDir: plugins\n", "pluginDir: must be an absolute path"),
    ("duplicate-key", b"drivers:\n  kvm: {enabled: true}\n  kvm: {enabled: false}\n", "drivers.kvm: duplicate key on line 3"),
    ("deep-nesting", b"[" * 10_000, "nested more than 32 levels deep"),
    ("not-utf-8", b"pluginDir: /tmp/\xff\n", "not UTF-8 text (byte 16, 0xff, on line 1)"),
    ("resync-too-fast", b"hotplug: {resyncSeconds: 0.000001}\n", "hotplug.resyncSeconds: must be 0 (off)"),
]


@pytest.mark.parametrize(("text", "message"), [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES])
def test_the_command_exits_2_with_one_line_and_creates_nothing(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text)

    result = subprocess.run(nodedev_command("serve", "--config", str(path)), cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"nodedev: config error: {path}: "), result.stderr
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
