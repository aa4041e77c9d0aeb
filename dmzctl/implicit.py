"""What a DMZ must not reach although nobody listed it: secure by default.

`protected` names the LAN the admin thought of. Everything else on the host is
blocked too, without being listed: the other DMZs, every subnet on the host's
interfaces and in libvirt's networks (the DMZ's own excepted), and the private
and special-purpose ranges. A DMZ then reaches only what lies beyond the host
and is not private, plus its holes.

Pure: the host's networks come in as a HostView, gathered by dmzctl/host/facts.py.
Each blocked prefix carries the reason explain and verify name.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

PRIVATE_RANGES: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT (RFC 6598): VPNs such as Tailscale live here
    "169.254.0.0/16",  # link-local, and the cloud metadata address 169.254.169.254
    "fc00::/7",  # unique local (RFC 4193)
    "fe80::/10",  # link-local
))

# The classes, in the order the table checks them, with the word its log prefix and explain use.
OTHER_DMZ = "other-dmz"
HOST_NET = "host-net"
PRIVATE = "private"
CLASSES = (OTHER_DMZ, HOST_NET, PRIVATE)
LOG_REASONS = {OTHER_DMZ: "to-other-dmz", HOST_NET: "to-host-net", PRIVATE: "to-private"}
SET_NAMES = {OTHER_DMZ: "other_dmz", HOST_NET: "host_nets", PRIVATE: "private"}


@dataclass(frozen=True)
class HostNetwork:
    """A subnet the host is attached to, or that one of libvirt's networks defines."""

    subnet: IPNetwork
    interface: Optional[str] = None  # the host interface carrying it, if any
    libvirt_network: Optional[str] = None  # the libvirt network defining it, if any
    dmz: Optional[str] = None  # the dmzctl DMZ owning that network, if any
    config: Optional[str] = field(default=None, compare=False)  # that DMZ's config file


@dataclass(frozen=True)
class HostView:
    """The host's networks, read when the table is rendered; empty when unknown (pure rendering)."""

    networks: tuple[HostNetwork, ...] = ()
    addresses: tuple = ()  # the host's own addresses (global scope): a change wakes the guard


@dataclass(frozen=True)
class Blocked:
    """One implicitly blocked prefix and why."""

    net: IPNetwork
    kind: str  # one of CLASSES
    reason: str  # "another DMZ (rg)", "host subnet on eth0", "private range 10.0.0.0/8"


def _describe(network: HostNetwork) -> tuple[str, str]:
    if network.dmz is not None:
        return OTHER_DMZ, f"another DMZ ({network.dmz})"
    if network.libvirt_network is not None:
        where = f" on {network.interface}" if network.interface else ""
        return HOST_NET, f"libvirt network {network.libvirt_network}{where}"
    return HOST_NET, f"host subnet on {network.interface}"


def implicit_blocks(name: str, own_subnets: tuple[IPNetwork, ...], bridge: str, view: HostView,
                    private_ranges: bool = True) -> tuple[Blocked, ...]:
    """Every implicitly blocked prefix of DMZ `name`, in class order (the DMZ's own networks excepted)."""
    found: list[Blocked] = []
    for network in view.networks:
        if network.dmz == name or network.interface == bridge or network.subnet in own_subnets:
            continue
        if network.subnet.is_loopback or network.subnet.is_link_local:
            continue  # never forwarded: the host's own, judged by the input chain
        kind, reason = _describe(network)
        found.append(Blocked(network.subnet, kind, reason))
    if private_ranges:
        found += [Blocked(net, PRIVATE, f"private range {net}") for net in PRIVATE_RANGES]
    order = {kind: index for index, kind in enumerate(CLASSES)}
    return tuple(sorted(dict.fromkeys(found), key=lambda b: (order[b.kind], b.net.version, b.net)))


def blocks_for(dmz, view: HostView) -> tuple[Blocked, ...]:
    """implicit_blocks for a config.DMZ."""
    own = tuple(net for net in (dmz.subnet, dmz.subnet6) if net is not None)
    return implicit_blocks(dmz.name, own, dmz.bridge, view, dmz.block_private_ranges)


def set_elements(blocks: tuple[Blocked, ...], kind: str, version: int) -> list[IPNetwork]:
    """The prefixes of one class and family, merged: nft interval sets refuse overlapping elements."""
    nets = [b.net for b in blocks if b.kind == kind and b.net.version == version]
    return list(ipaddress.collapse_addresses(nets))


def classify(blocks: tuple[Blocked, ...], address) -> Optional[Blocked]:
    """The first implicit block (in the table's order) containing the address, if any."""
    for block in blocks:
        if block.net.version == address.version and address in block.net:
            return block
    return None
