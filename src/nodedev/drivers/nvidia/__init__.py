"""NVIDIA GPUs through NVML, named and allocated the way NVIDIA's k8s-device-plugin does."""

from nodedev.drivers.nvidia.driver import NvidiaDriver
from nodedev.drivers.nvidia.options import NvidiaOptions

__all__ = ["NvidiaDriver", "NvidiaOptions"]
