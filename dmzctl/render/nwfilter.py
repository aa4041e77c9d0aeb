"""Per-VM libvirt nwfilters: the port's anti-spoofing and rogue-server guards, at layer 2 only.

One filter per VM, named after it, referenced by its NIC:

  dmzctl-<dmz>-<vm>       root chain: dmzctl-clean-traffic (MAC/IPv4/ARP anti-spoofing), then rules
                          of its own in the root chain: no DHCP server replies; with IPv6, no router
                          advertisements, redirects or DHCPv6 server replies, the IPv6 source bound
                          to the VM's addresses, and IPv6 let in
  dmzctl-clean-traffic    static (xml/nwfilter), shared by every VM

Only ebtables rules, and no chain of dmzctl's own: libvirt re-creates every chain of every running
VM one command at a time on each libvirtd restart, so each chain costs restart time on every
host with many VMs. The stateful block of the protected subnets and of the host's own addresses,
which sat here until issue 14 (an iptables-layer filter per VM listing the host's addresses),
is the backstop table now (render/nft_backstop.py): docs/benchmarks-scale.md has the before and
after.
"""

from __future__ import annotations

import ipaddress

from lxml import etree

from ..config import DMZ, VM
from .base import load_base, stable_uuid, sub, xml_dir

CLEAN_TRAFFIC = "dmzctl-clean-traffic"
# ebtables evaluates the root chain's rules and its jumps by priority: the guards run after the
# source checks (no-ip-spoofing is -710) and before clean-traffic's "accept IPv4" at -650; IPv6
# sources are bound next, and what is left of the VM's IPv6 is dropped before no-other-l2-traffic.
GUARD_PRIORITY = "-690"
SPOOF6_ACCEPT_PRIORITY = "-620"
SPOOF6_DROP_PRIORITY = "-610"
ACCEPT6_IN_PRIORITY = "-550"


# A VM's filters: its one filter (no suffix). Earlier designs also defined these, which `up`
# and `destroy` remove where they are still defined.
VM_FILTER_SUFFIXES = ("",)
LEGACY_FILTER_SUFFIXES = ("-guard4", "-block", "-spoof6", "-guard6")


def vm_filter_name(dmz: DMZ, vm: VM) -> str:
    return f"dmzctl-{dmz.name}-{vm.name}"


def vm_filter_parameters(dmz: DMZ, vm: VM) -> list[tuple[str, str]]:
    """$IP for libvirt's IPv4/ARP spoofing filters: the static address, or learnt from DHCP only."""
    if vm.ip is not None:
        return [("IP", str(vm.ip))]
    return [("CTRL_IP_LEARNING", "dhcp"), ("DHCPSERVER", str(dmz.gateway.ip))]


def slaac_address(mac: str, prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The modified EUI-64 address SLAAC forms from a MAC in a /64 (RFC 4291 appendix A)."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    interface_id = bytes(octets[:3] + [0xFF, 0xFE] + octets[3:])
    return ipaddress.IPv6Address(prefix.network_address.packed[:8] + interface_id)


def with_uuid(element: etree._Element) -> etree._Element:
    """A stable uuid per filter name: libvirt only redefines a filter whose uuid matches."""
    for old in element.findall("uuid"):
        element.remove(old)
    uuid = etree.Element("uuid")
    uuid.text = stable_uuid("nwfilter", element.get("name"))
    element.insert(0, uuid)
    return element


def clean_traffic_filter() -> etree._Element:
    return with_uuid(load_base(xml_dir() / "nwfilter" / f"{CLEAN_TRAFFIC}.xml"))


def _rule(parent, action: str, priority: str, direction: str = "out") -> etree._Element:
    return sub(parent, "rule", action=action, direction=direction, priority=priority)


# Stateless drops: a DMZ VM never answers as a DHCP server or a router.
ROGUE_SERVERS4 = [{"protocol": "udp", "srcportstart": "67"}]  # DHCP server
ROGUE_SERVERS6 = [{"protocol": "icmpv6", "type": "134"},  # router advertisement
                  {"protocol": "icmpv6", "type": "137"},  # redirect
                  {"protocol": "udp", "srcportstart": "547"}]  # DHCPv6 server


def ipv6_sources(dmz: DMZ, vm: VM) -> list[tuple[str, str]]:
    """(address, prefix length) a VM may send IPv6 from."""
    allowed = [("fe80::", "10"), ("::", "128")]  # neighbour discovery, duplicate address detection
    if vm.ip6 is not None:
        allowed.append((str(vm.ip6), "128"))
        # libvirt's router advertisements also give the VM its SLAAC address, which
        # Linux then prefers as source: bind that one too (derived from the MAC).
        allowed.append((str(slaac_address(vm.mac, dmz.subnet6)), "128"))
    else:
        allowed.append((str(dmz.subnet6.network_address), str(dmz.subnet6.prefixlen)))
    return allowed


def render_nwfilters(dmz: DMZ, vm: VM) -> dict[str, etree._Element]:
    """The VM's filter (dmzctl-clean-traffic, which it references, is defined on its own)."""
    name = vm_filter_name(dmz, vm)
    top = etree.Element("filter", name=name, chain="root")
    sub(top, "filterref", filter=CLEAN_TRAFFIC)
    for attrs in ROGUE_SERVERS4:
        sub(_rule(top, "drop", GUARD_PRIORITY), "ip", **attrs)
    if dmz.gateway6 is not None:
        for attrs in ROGUE_SERVERS6:
            sub(_rule(top, "drop", GUARD_PRIORITY), "ipv6", **attrs)
        for address, mask in ipv6_sources(dmz, vm):
            sub(_rule(top, "accept", SPOOF6_ACCEPT_PRIORITY), "ipv6", srcipaddr=address, srcipmask=mask)
        sub(_rule(top, "drop", SPOOF6_DROP_PRIORITY), "mac", protocolid="ipv6")
        sub(_rule(top, "accept", ACCEPT6_IN_PRIORITY, direction="in"), "mac", protocolid="ipv6")
    return {name: with_uuid(top)}
