"""nodedev: one node daemon for every special device, served through the kubelet device-plugin API."""
__version__ = "0.1.0"
