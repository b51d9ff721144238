"""rtnetlink link messages (RTM_NEWLINK/RTM_DELLINK), for the state changes that send no uevent.

A link losing its carrier or going down sends no uevent at all, so without these
a network driver would see a pulled cable only at the next periodic resync. Each
message becomes `Uevent(action="link", subsystem="net", sys_name=<ifname>)`, with
INTERFACE, IFINDEX and RTM (NEWLINK or DELLINK) as its properties, so a
`UdevMatch("net", ..., properties={"INTERFACE": ...})` filters both alike.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Iterator

from nodedev.hotplug.uevents import DRAIN_LIMIT, OnEvent, OnLost, Uevent, set_receive_buffer

RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFLA_IFNAME = 3
LINK_ACTION = "link"
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
_RTATTR = struct.Struct("=HH")  # length, type


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_link_messages(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(message type, ifindex, ifname) of each RTM_NEWLINK/RTM_DELLINK in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        body = offset + _NLMSGHDR.size
        if msg_type in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            _family, _type, index, _ifflags, _change = _IFINFOMSG.unpack_from(data, body)
            name = _link_name(data, body + _IFINFOMSG.size, offset + length)
            if name:
                yield msg_type, index, name
        offset += _align4(length)


def _link_name(data: bytes, offset: int, end: int) -> str:
    while offset + _RTATTR.size <= end:
        length, attr_type = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return ""
        if attr_type == IFLA_IFNAME:
            return data[offset + _RTATTR.size : offset + length].split(b"\0", 1)[0].decode(errors="replace")
        offset += _align4(length)
    return ""


def link_event(msg_type: int, index: int, name: str) -> Uevent:
    what = "NEWLINK" if msg_type == RTM_NEWLINK else "DELLINK"
    return Uevent(action=LINK_ACTION, subsystem="net", sys_name=name, properties={"INTERFACE": name, "IFINDEX": str(index), "RTM": what})


def open_link_socket(buffer: int, log: logging.Logger) -> socket.socket:
    """A non-blocking socket in the link multicast group (tests replace it)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        set_receive_buffer(sock, buffer)
    except OSError as err:
        log.warning("rtnetlink: cannot set a %d byte receive buffer: %s", buffer, err)
    try:
        sock.bind((0, RTMGRP_LINK))
    except OSError:
        sock.close()
        raise
    return sock


class LinkChannel:
    kind = "rtnetlink link monitor"

    def __init__(self, buffer: int, on_event: OnEvent, on_lost: OnLost, log: logging.Logger) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        self._sock = open_link_socket(buffer, log)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._on_lost("rtnetlink: receive buffer overrun (ENOBUFS), link changes were dropped")
                continue
            for msg_type, index, name in parse_link_messages(data):
                self._on_event(link_event(msg_type, index, name))

    def close(self) -> None:
        self._sock.close()
