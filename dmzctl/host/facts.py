"""Read-only facts about the host that rendering needs: its networks and addresses.

The host view (implicit.HostView) comes from two places, both read without
calling libvirt, so that the libvirt hooks (which must never call back into
libvirtd) and every command see the same view and render the same table:
- the kernel's addresses on every interface (`ip -j address`);
- libvirt's network definitions as libvirtd stores them: persistent ones in
  /etc/libvirt/qemu/networks, running ones (transient included) in
  /run/libvirt/network. A network that is defined but not running is protected
  too: it becomes reachable the moment someone starts it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator, Optional

from lxml import etree

from ..errors import HostError
from ..implicit import HostNetwork, HostView
from ..render.base import NS

NETWORK_DIRS = (Path("/etc/libvirt/qemu/networks"), Path("/run/libvirt/network"))


def interface_networks() -> tuple[list[HostNetwork], list]:
    """(the subnet of every address on every interface, the host's global addresses)."""
    try:
        result = subprocess.run(["ip", "-j", "address", "show"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HostError(f"cannot read the host's addresses (ip -j address): {error}") from None
    if result.returncode != 0:
        raise HostError(f"cannot read the host's addresses: {result.stderr.strip()}")
    networks, addresses = [], []
    for link in json.loads(result.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") not in ("inet", "inet6") or "local" not in info:
                continue
            interface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            networks.append(HostNetwork(interface.network, interface=link["ifname"]))
            if info.get("scope") == "global":
                addresses.append(interface.ip)
    return networks, addresses


def _network_documents() -> Iterator[etree._Element]:
    for directory in NETWORK_DIRS:
        try:
            paths = sorted(directory.glob("*.xml"))
        except OSError:
            continue
        for path in paths:
            try:
                root = etree.parse(str(path)).getroot()
            except (OSError, etree.XMLSyntaxError):
                continue  # being rewritten by libvirtd; the next read sees it
            # Status files wrap the definition: <networkstatus><network>...</network></networkstatus>.
            network = root if root.tag == "network" else root.find("network")
            if network is not None:
                yield network


def _ip_networks(network: etree._Element) -> Iterator[ipaddress._BaseNetwork]:
    for ip in network.findall("ip"):
        address = ip.get("address")
        if not address:
            continue
        length = ip.get("prefix") or ip.get("netmask")
        if length is None:
            length = "64" if ":" in address else "24"
        try:
            yield ipaddress.ip_interface(f"{address}/{length}").network
        except ValueError:
            continue


def libvirt_networks() -> list[HostNetwork]:
    """Every libvirt network's subnets, with its bridge and the dmzctl DMZ owning it (if any)."""
    found = {}
    for network in _network_documents():
        name = network.findtext("name")
        bridge = network.find("bridge")
        owned = network.find(f"metadata/{{{NS}}}network")
        owner: Optional[str] = owned.get("dmz") if owned is not None else None
        config = owned.get("config") if owned is not None else None
        for subnet in _ip_networks(network):
            found[(name, subnet)] = HostNetwork(subnet, interface=bridge.get("name") if bridge is not None else None,
                                                libvirt_network=name, dmz=owner, config=config)
    return list(found.values())


def host_view() -> HostView:
    """The host's networks: libvirt's first (they carry the better name), then the interfaces'."""
    interfaces, addresses = interface_networks()
    named = libvirt_networks()
    known = {network.subnet for network in named}
    networks = named + [network for network in interfaces if network.subnet not in known]
    unique = list(dict.fromkeys(networks))
    return HostView(networks=tuple(unique), addresses=tuple(dict.fromkeys(addresses)))


def uplink() -> Optional[str]:
    """The interface of the IPv4 default route (else IPv6's), if the host has one: its uplink."""
    for family in ("-4", "-6"):
        try:
            result = subprocess.run(["ip", "-j", family, "route", "show", "default"], capture_output=True, text=True,
                                    timeout=10)
            routes = json.loads(result.stdout or "[]") if result.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired, ValueError):
            continue
        for route in routes:
            if route.get("dev"):
                return route["dev"]
    return None


def running_as_root() -> bool:
    return os.geteuid() == 0
