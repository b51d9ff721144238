"""The ioctl shim as callers see it: right answers from real nodes, errors that name the node."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nodedev import native

KVM = Path("/dev/kvm")
needs_kvm = pytest.mark.skipif(not os.access(KVM, os.R_OK | os.W_OK), reason="no usable /dev/kvm")


@needs_kvm
def test_real_kvm_reports_api_12() -> None:
    assert native.kvm_api_version(KVM) == 12 == native.KVM_API_VERSION


@needs_kvm
def test_kvm_check_extension_through_raw_ioctl() -> None:
    # KVM_CAP_USER_MEMORY (3) is present on every KVM host since 2.6.x.
    fd = os.open(KVM, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert native.ioctl(fd, native.KVM_CHECK_EXTENSION, 3, path=KVM) > 0
    finally:
        os.close(fd)


def test_constants_come_from_kernel_headers() -> None:
    assert native.VFIO_API_VERSION == 0
    assert native.VFIO_TYPE1_IOMMU == 1
    assert native.VFIO_TYPE1v2_IOMMU == 3
    assert native.VFIO_GROUP_FLAGS_VIABLE == 1
    assert native.VFIO_GROUP_FLAGS_CONTAINER_SET == 2


@pytest.mark.parametrize(
    "call", [native.kvm_api_version, native.vfio_api_version, native.vfio_group_viable]
)
def test_regular_file_gives_enotty_naming_the_path(tmp_path: Path, call) -> None:
    node = tmp_path / "kvm"
    node.write_bytes(b"")
    with pytest.raises(OSError) as info:
        call(node)
    assert info.value.errno == errno.ENOTTY
    assert info.value.filename == str(node)
    assert str(node) in str(info.value)


@pytest.mark.parametrize(
    "call", [native.kvm_api_version, native.vfio_api_version, native.vfio_group_viable]
)
def test_missing_node_gives_enoent_naming_the_path(tmp_path: Path, call) -> None:
    node = tmp_path / "vfio" / "7"
    with pytest.raises(OSError) as info:
        call(node)
    assert info.value.errno == errno.ENOENT
    assert str(node) in str(info.value)


def test_bad_descriptor_error_names_the_given_path() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        native.ioctl(r, native.KVM_GET_API_VERSION, path="/dev/kvm")
    assert info.value.errno == errno.EBADF
    assert info.value.filename == "/dev/kvm"
