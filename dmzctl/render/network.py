"""The DMZ's libvirt network: bridge, subnet(s), the host as gateway, DHCP."""

from __future__ import annotations

import ipaddress
from typing import Optional

from lxml import etree

from ..config import DMZ
from .base import load_base, metadata_element, replace_child, stable_uuid, sub, xml_dir


# libvirt's namespace for dnsmasq options of its own (formatnetwork.html, "dnsmasq options").
DNSMASQ_NS = "http://libvirt.org/schemas/network/dnsmasq/1.0"


def dhcp_range(gateway: ipaddress.IPv4Interface) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The half of the subnet the gateway is not in, so dynamic leases never hit the host.

    Static leases may fall in the range: dnsmasq reserves them.
    """
    net = gateway.network
    first, last = net.network_address + 1, net.broadcast_address - 1
    middle = net.network_address + net.num_addresses // 2
    if gateway.ip < middle:
        return (max(middle, first), last)
    return (first, middle - 1)


def render_network(dmz: DMZ, base: Optional[etree._Element] = None) -> etree._Element:
    net = base if base is not None else load_base(xml_dir() / "network.xml")
    for tag in ("name", "uuid"):
        replace_child(net, tag, before=("metadata", "forward", "bridge", "ip"))
    net.find("name").text = dmz.name
    net.find("uuid").text = stable_uuid("network", dmz.name)
    metadata_element(net, "network", dmz=dmz.name, config=str(dmz.source), hash=dmz.config_hash)
    # libvirt orders <metadata> right after <uuid>; keep documents in its order.
    net.find("uuid").addnext(net.find("metadata"))

    for old in net.findall("forward"):
        net.remove(old)
    if dmz.mode != "isolated":
        forward = etree.Element("forward", mode=dmz.mode)
        net.find("metadata").addnext(forward)

    bridge = net.find("bridge")
    if bridge is None:
        bridge = sub(net, "bridge", stp="on", delay="0")
    bridge.set("name", dmz.bridge)

    for old in net.findall("ip"):
        net.remove(old)
    ip4 = sub(net, "ip", address=str(dmz.gateway.ip), netmask=str(dmz.subnet.netmask))
    if dmz.dhcp:
        dhcp = sub(ip4, "dhcp")
        if any(vm.ip is None for vm in dmz.vms) or not dmz.vms:
            start, end = dhcp_range(dmz.gateway)
            sub(dhcp, "range", start=str(start), end=str(end))
        # else: every VM has its static lease and dnsmasq answers only those MACs (libvirt
        # renders "dhcp-range=...,static"), so a VM that asks for leases under made-up client
        # addresses gets none: the pool cannot be exhausted.
        for vm in dmz.vms:
            if vm.ip is not None:
                sub(dhcp, "host", mac=vm.mac, name=vm.name, ip=str(vm.ip))
    if dmz.gateway6 is not None:
        # Router advertisements from libvirt's dnsmasq give VMs SLAAC addresses and the default
        # route; DHCPv6 gives each VM with an ip6 that address (_dhcp6).
        ip6 = sub(net, "ip", family="ipv6", address=str(dmz.gateway6.ip), prefix=str(dmz.gateway6.network.prefixlen))
        _dhcp6(ip6, dmz)
    dns_for_egress(net, dmz)
    return net


OWNED_OPTIONS = ("nftset=", "cache-size=", "dhcp-range=")  # the dnsmasq options dmzctl writes (and replaces)


def nftset_options(dmz: DMZ) -> list[str]:
    """dnsmasq's `nftset=` lines: each allowlisted name's answers go to the sets of its groups
    (render/nft_edges.py), IPv4 and IPv6, in the DMZ's own table."""
    from .nft_edges import name_groups, name_set
    from .nftexpr import FAMILY, table_name

    sets: dict[str, list[str]] = {}
    for index, (_key, names) in enumerate(name_groups(dmz), 1):
        for name in names:
            sets.setdefault(name, []).extend(f"{v}#{FAMILY}#{table_name(dmz)}#{name_set(index, v)}" for v in (4, 6))
    return [f"nftset=/{name}/{','.join(targets)}" for name, targets in sets.items()]


def dns_for_egress(net: etree._Element, dmz: DMZ) -> None:
    """The DNS forwarders (<dns><forwarder/>) and, for an egress allowlist with names, the dnsmasq
    options (libvirt's dnsmasq XML namespace) that fill the table's sets from the answers. What a base
    document says besides (its own <dns> settings, its own dnsmasq options) is kept."""
    dns = net.find("dns")
    if dmz.dns_forwarders:
        if dns is None:
            dns = etree.Element("dns")
            net.find("ip").addprevious(dns)
        for old in dns.findall("forwarder"):
            dns.remove(old)
        for address in dmz.dns_forwarders:
            sub(dns, "forwarder", addr=str(address))
    holder = net.find(f"{{{DNSMASQ_NS}}}options")
    if holder is not None:
        for old in holder.findall(f"{{{DNSMASQ_NS}}}option"):
            if old.get("value", "").startswith(OWNED_OPTIONS):
                holder.remove(old)
    named = nftset_options(dmz)
    # No cache with names: an answer dnsmasq gives from its cache adds nothing to the sets, and the
    # sets are emptied whenever the table is replaced; every answer then comes through them.
    options = dhcp6_options(dmz) + (["cache-size=0"] + named if named else [])
    if options:
        if holder is None:
            holder = etree.SubElement(net, f"{{{DNSMASQ_NS}}}options", nsmap={"dnsmasq": DNSMASQ_NS})
        for value in options:
            etree.SubElement(holder, f"{{{DNSMASQ_NS}}}option", value=value)
    if holder is not None and len(holder) == 0:
        net.remove(holder)
    # Declared on <network>, where libvirt writes it back: the live document then reads as rendered.
    if net.find(f"{{{DNSMASQ_NS}}}options") is not None:
        etree.cleanup_namespaces(net, top_nsmap={"dnsmasq": DNSMASQ_NS})


def _dhcp6(ip6: etree._Element, dmz: DMZ) -> None:
    """DHCPv6 for the VMs with an ip6: each one's address bound to its MAC, and SLAAC kept.

    libvirt refuses `mac` on an IPv6 <host> (only `id`, a DUID the guest picks, or `name`, which the
    guest sends, if it does); it writes a host as `<name>,[<ip>]` into dnsmasq's hostsfile unchecked.
    A MAC in `name` is thus dnsmasq's own `dhcp-host=<mac>,[<ip>]`: it matches the client by the
    hardware address dnsmasq sees on the link (the one the VM cannot change: no-mac-spoofing), whatever
    DUID or hostname the guest sends. It stays a libvirt <host>, so a VM added or removed updates the
    running network (net-update, parent index of this <ip>) like the IPv4 leases.

    With DHCPv6, libvirt's router advertisements say "managed" (M and O flags, which make clients ask)
    but drop the prefix's autonomous flag: the `ra-only` context for the same prefix puts it back, so
    the guest's EUI-64 SLAAC address, which the anti-spoofing filter binds too, keeps working.
    """
    vms = _dhcp6_vms(dmz)
    if not vms:
        return  # router advertisements only, as libvirt renders an IPv6 <ip> without DHCP
    dhcp = sub(ip6, "dhcp")
    for vm in vms:
        sub(dhcp, "host", name=vm.mac, ip=str(vm.ip6))


def _dhcp6_vms(dmz: DMZ) -> list:
    return [vm for vm in dmz.vms if vm.ip6 is not None] if dmz.dhcp and dmz.gateway6 is not None else []


def dhcp6_options(dmz: DMZ) -> list[str]:
    """With DHCPv6 on, the `ra-only` context of the same prefix that keeps SLAAC (see _dhcp6)."""
    if not _dhcp6_vms(dmz):
        return []
    return [f"dhcp-range={dmz.gateway6.ip},ra-only,{dmz.gateway6.network.prefixlen}"]
