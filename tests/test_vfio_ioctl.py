"""The VFIO ioctl paths on real files (this machine has no VFIO): a regular file, a directory,
a character device that is not VFIO (/dev/null) and a missing path each give one clear line
naming the path and the errno; and the driver turns them into health and pre-start answers."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from nodedev import native
from nodedev.driver import DriverError, Health
from nodedev.drivers.vfio import checks, simulate
from nodedev.drivers.vfio.driver import VfioDriver
from nodedev.drivers.vfio.fixture import VfioFixture
from tests.test_contract import build
from tests.test_vfio import T4

NULL = os.makedev(1, 3)


def cases(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    regular = tmp_path / "regular"
    regular.write_text("not a device\n")
    directory = tmp_path / "directory"
    directory.mkdir()
    return {
        "regular file": (regular, errno.ENOTTY),
        "directory": (directory, errno.EISDIR),
        "/dev/null": (Path("/dev/null"), errno.ENOTTY),
        "missing": (tmp_path / "missing", errno.ENOENT),
    }


@pytest.mark.parametrize("kind", ["regular file", "directory", "/dev/null", "missing"])
def test_the_api_check_names_the_path_and_errno(tmp_path: Path, kind: str) -> None:
    path, code = cases(tmp_path)[kind]
    problem = checks.api_problem(path)
    assert problem == f"VFIO_GET_API_VERSION on {path} failed: [Errno {code}] {os.strerror(code)}"


@pytest.mark.parametrize("kind", ["regular file", "directory", "/dev/null", "missing"])
def test_the_group_status_check_names_the_group_path_and_errno(tmp_path: Path, kind: str) -> None:
    path, code = cases(tmp_path)[kind]
    problem = checks.group_status_problem(path, 7)
    assert problem == f"IOMMU group 7: VFIO_GROUP_GET_STATUS on {path} failed: [Errno {code}] {os.strerror(code)}"


def test_the_shims_errors_carry_errno_and_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught:
        native.vfio_group_viable(Path("/dev/null"))
    assert (caught.value.errno, caught.value.filename) == (errno.ENOTTY, "/dev/null")
    assert native.VFIO_GROUP_FLAGS_VIABLE == 1 and native.VFIO_API_VERSION == 0, "numbers from linux/vfio.h"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of character devices needs root")


def checked_driver(node: VfioFixture, tmp_path: Path) -> VfioDriver:
    section = {"enabled": True, "sysfsRoot": str(node.sys), "devRoot": str(node.dev), **simulate.PERMITTED}
    driver = build("vfio", section, tmp_path)
    assert isinstance(driver, VfioDriver)
    return driver


def replace_with_null(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, NULL)


def test_without_usable_vfio_every_device_is_unhealthy_and_it_is_checked_again(tmp_path: Path) -> None:
    needs_root()
    node = simulate.build(tmp_path / "node")
    container = node.dev / "vfio" / "vfio"
    container.unlink()
    driver = checked_driver(node, tmp_path)
    driver.start()
    reasons = {d.reason for devices in driver.scan().values() for d in devices}
    assert reasons == {f"no usable VFIO on this node: {container} is missing"}
    replace_with_null(container)  # a character device, but not VFIO: the ioctl answers
    snapshot = driver.scan()
    assert {d.health for devices in snapshot.values() for d in devices} == {Health.UNHEALTHY}
    reasons = {d.reason for devices in snapshot.values() for d in devices}
    assert reasons == {f"no usable VFIO on this node: VFIO_GET_API_VERSION on {container} failed: [Errno 25] {os.strerror(errno.ENOTTY)}"}


def test_pre_start_asks_the_kernel_when_the_check_is_on(tmp_path: Path) -> None:
    needs_root()
    node = simulate.build(tmp_path / "node")
    driver = checked_driver(node, tmp_path)
    driver.scan()
    group = node.group_of(simulate.T4_GPUS[0])
    replace_with_null(node.group_node(group))
    with pytest.raises(DriverError) as caught:
        driver.pre_start(T4, [str(group)])
    assert str(caught.value) == f"IOMMU group {group}: VFIO_GROUP_GET_STATUS on {node.group_node(group)} failed: [Errno 25] {os.strerror(errno.ENOTTY)}"
