"""Install-time build steps: gRPC modules from proto/, the cffi ioctl shim from native/,
and the fake NVML library (native/fake_nvml/) that `nodedev.drivers.nvidia.simulate` loads.

setuptools runs these through the cmdclass hooks named in pyproject.toml, so a plain
`pip install .` needs nothing but a compiler and the Python and kernel headers.
`python build.py` does the same in place under src/, for working on a checkout.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import cffi
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
NATIVE_DIR = ROOT / "native"
PROTO_PACKAGE = "nodedev/api"
NATIVE_MODULE = "nodedev._native"
FAKE_NVML_SOURCE = NATIVE_DIR / "fake_nvml" / "fake_nvml.c"
# Where the fake lives inside the package; nodedev.drivers.nvidia.simulate.fake_library_path() agrees.
FAKE_NVML_RELPATH = Path("nodedev") / "drivers" / "nvidia" / "fake" / "libnvidia-ml.so.1"

# Request numbers and constants resolved by the C compiler from linux/kvm.h and
# linux/vfio.h: nothing here is computed by hand.
_CDEF = """
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CHECK_EXTENSION ...
#define VFIO_API_VERSION ...
#define VFIO_GET_API_VERSION ...
#define VFIO_CHECK_EXTENSION ...
#define VFIO_GROUP_GET_STATUS ...
#define VFIO_GROUP_FLAGS_VIABLE ...
#define VFIO_GROUP_FLAGS_CONTAINER_SET ...
#define VFIO_TYPE1_IOMMU ...
#define VFIO_TYPE1v2_IOMMU ...

long nodedev_ioctl(int fd, unsigned long request, unsigned long arg);
int nodedev_vfio_group_status(int fd, unsigned int *flags);
"""


def ffibuilder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    ffi.set_source(
        NATIVE_MODULE,
        '#include "ioctl_shim.h"',
        sources=[str(NATIVE_DIR / "ioctl_shim.c")],
        include_dirs=[str(NATIVE_DIR)],
    )
    return ffi


def generate_protos(out_root: Path) -> None:
    """Writes nodedev/api/*_pb2*.py under out_root with package-qualified imports."""
    import grpc_tools
    from grpc_tools import protoc  # build-time only dependency

    (out_root / PROTO_PACKAGE).mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        args = [
            "protoc",
            f"-I{PROTO_PACKAGE}={PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"{PROTO_PACKAGE}/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def build_fake_nvml(out: Path) -> Path:
    """Compiles the fake libnvidia-ml.so.1 to `out`.

    The SONAME must be libnvidia-ml.so.1: once the file is loaded by path, pynvml's
    own CDLL("libnvidia-ml.so.1") matches it by soname instead of searching the disk.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cmd = [
        *cc, "-shared", "-fPIC", "-O2", "-Wall",
        "-Wl,-soname,libnvidia-ml.so.1",
        "-o", str(out), str(FAKE_NVML_SOURCE), "-lpthread",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {FAKE_NVML_SOURCE} failed:\n{result.stderr}")
    return out


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        generate_protos(Path(self.build_lib))


class BuildExt(build_ext):
    """Emits the cffi C source for the shim before compiling it."""

    def run(self) -> None:
        for ext in self.extensions:
            if ext.name == NATIVE_MODULE:
                generated = Path(self.build_temp) / "_native.c"
                generated.parent.mkdir(parents=True, exist_ok=True)
                ffibuilder().emit_c_code(str(generated))
                ext.sources = [str(generated), str(NATIVE_DIR / "ioctl_shim.c")]
                ext.include_dirs = [*ext.include_dirs, str(NATIVE_DIR)]
        super().run()
        package_root = ROOT / "src" if self.inplace else Path(self.build_lib)
        build_fake_nvml(package_root / FAKE_NVML_RELPATH)


def build_in_place() -> None:
    src = ROOT / "src"
    generate_protos(src)
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffibuilder().compile(tmpdir=tmp, verbose=False))
        shutil.copy2(built, src / "nodedev" / built.name)
    build_fake_nvml(src / FAKE_NVML_RELPATH)


if __name__ == "__main__":
    build_in_place()
    sys.exit(0)
