"""dmzctl: a libvirt DMZ whose VMs provably cannot reach the LAN or the host."""

__version__ = "0.1.0"
