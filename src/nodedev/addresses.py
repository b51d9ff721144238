"""Host names in `host:port` settings (metricsAddress, healthAddress), checked before anything listens."""

from __future__ import annotations

import ipaddress
import re

_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$")


def plausible_host(host: str) -> bool:
    """Empty (every address), an IP address (IPv6 in brackets), or a DNS name: never spaces or junk."""
    if not host:
        return True
    if host.startswith("[") and host.endswith("]"):
        return _is_ip(host[1:-1], ipaddress.IPv6Address)
    if re.fullmatch(r"[0-9.]+", host):
        return _is_ip(host, ipaddress.IPv4Address)
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _is_ip(text: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True
