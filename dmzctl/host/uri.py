"""Which machine a libvirt URI names: dmzctl manages only the one it runs on."""

from __future__ import annotations

import urllib.parse
from typing import Optional

from ..errors import HostError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def remote_host(uri: str) -> Optional[str]:
    """The host a libvirt URI names when it is another machine (qemu+ssh://kvm1/system), else None."""
    host = urllib.parse.urlsplit(uri).hostname
    return None if not host or host in LOCAL_HOSTS else host


def refuse_remote(uri: str) -> None:
    """Refused before connecting: the nftables tables, the hooks and the host's networks are this
    machine's, so with another host's libvirt the VMs would run there behind a firewall applied here."""
    host = remote_host(uri)
    if host is not None:
        raise HostError(f"libvirt URI {uri} is another host ({host}): dmzctl applies each DMZ's nftables "
                        f"tables on the machine it runs on, so the VMs would run on {host} and their "
                        f"firewall here; run dmzctl on {host} itself (the Ansible module does)")
