"""The one thin layer that talks to the host: libvirt, nftables, namespaces, syslog."""
