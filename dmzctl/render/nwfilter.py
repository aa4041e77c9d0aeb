"""Per-VM libvirt nwfilters: anti-spoofing plus a second, independent block of the protected subnets.

The nftables table is the first layer; these filters sit on each VM's bridge
port (ebtables) and hold even if the table is deleted under a running VM.

Per VM:
  dmzctl-<dmz>-<vm>          root: references all the below (the NIC's filterref)
  dmzctl-clean-traffic       static (xml/nwfilter): MAC/IPv4/ARP anti-spoofing
  dmzctl-<dmz>-<vm>-block    chain root (iptables layer, conntrack): holes, then new flows to the
                             protected subnets and to the host's own addresses dropped
                             (DHCP and DNS to the gateway excepted)
  dmzctl-<dmz>-<vm>-guard4   chain ipv4-dmzctl: no DHCP server replies
  dmzctl-<dmz>-<vm>-spoof6   chain ipv6-dmzspf: IPv6 source bound (DMZ with IPv6 only)
  dmzctl-<dmz>-<vm>-guard6   chain ipv6-dmzctl: no RAs / DHCPv6 replies, holes, protected dropped
"""

from __future__ import annotations

import ipaddress

from lxml import etree

from ..config import DMZ, VM, Hole
from .base import load_base, stable_uuid, sub, xml_dir

CLEAN_TRAFFIC = "dmzctl-clean-traffic"
# ebtables evaluates the root chain's jumps and rules by priority: the guards
# must run after the source checks (no-ip-spoofing is -710) and before
# clean-traffic's "accept IPv4" at -650 (and our "accept IPv6" at -550).
GUARD4_PRIORITY = "-690"
SPOOF6_PRIORITY = "-620"
GUARD6_PRIORITY = "-590"
ACCEPT6_PRIORITY = "-550"


# A VM's filters: its top filter (no suffix) and those named after it.
VM_FILTER_SUFFIXES = ("", "-guard4", "-block", "-spoof6", "-guard6")


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


def holes_for_vm(dmz: DMZ, vm: VM, family: int) -> list[Hole]:
    """Holes this VM may use; nftables matches `from` exactly, this layer per VM."""
    chosen = []
    for hole in dmz.holes:
        if hole.family != family:
            continue
        if hole.source_vm is not None and hole.source_vm != vm.name:
            continue
        if hole.source_net is not None:
            own = vm.ip if family == 4 else vm.ip6
            if own is not None and own not in hole.source_net:
                continue
        chosen.append(hole)
    return chosen


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


def _rule(parent, action: str, priority: int, direction: str = "out") -> etree._Element:
    return sub(parent, "rule", action=action, direction=direction, priority=str(priority))


def _rogue_server_guard(name: str, chain: str, priority: str, tag: str, servers: list[dict]) -> etree._Element:
    """Stateless layer-2 drops: a DMZ VM never answers as a DHCP server or router."""
    guard = etree.Element("filter", name=name, chain=chain, priority=priority)
    for attrs in servers:
        sub(_rule(guard, "drop", 100), tag, **attrs)
    return guard


# iptables-layer element per (family, protocol) for holes.
HOLE_ELEMENTS = {
    (4, "tcp"): "tcp", (4, "udp"): "udp", (4, "sctp"): "sctp", (4, "icmp"): "icmp",
    (6, "tcp"): "tcp-ipv6", (6, "udp"): "udp-ipv6", (6, "sctp"): "sctp-ipv6", (6, "icmpv6"): "icmpv6",
}
NEW_FLOWS = "NEW,INVALID"


LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")


def host_addresses(dmz: DMZ, known=()) -> list[ipaddress._BaseNetwork]:
    """The host's own addresses as /32 and /128: the gateways always, plus what the host view knows,
    and on IPv6 every link-local address (only the host can be reached there from a VM's NIC: other
    VMs' link-local traffic is switched, not firewalled here, as the drop is for new flows only)."""
    addresses = {ipaddress.ip_network(dmz.gateway.ip)}
    if dmz.gateway6 is not None:
        addresses.add(ipaddress.ip_network(dmz.gateway6.ip))
    for address in known:
        address = ipaddress.ip_address(str(address).split("/")[0])
        if address.version == 6 and dmz.gateway6 is None:
            continue  # layer 2 already drops all IPv6 of a DMZ without it
        if not address.is_link_local and not address.is_loopback:
            addresses.add(ipaddress.ip_network(address))
    return sorted(addresses, key=lambda net: (net.version, net))


def _gateway_services(block: etree._Element, dmz: DMZ) -> None:
    """What a VM may open towards the host: DHCP and DNS on the gateway, as the table allows."""
    if not dmz.dhcp:
        return
    gateway = str(dmz.gateway.ip)
    sub(_rule(block, "accept", 250), "udp", state="NEW", dstipaddr=gateway, dstportstart="67")
    for proto in ("udp", "tcp"):
        sub(_rule(block, "accept", 250), proto, state="NEW", dstipaddr=gateway, dstportstart="53")
    if dmz.gateway6 is not None:
        # libvirt's router advertisements name the bridge's link-local address as DNS server.
        for address, mask in ((str(dmz.gateway6.ip), "128"), ("fe80::", "10")):
            for proto in ("udp-ipv6", "tcp-ipv6"):
                sub(_rule(block, "accept", 250), proto, state="NEW", dstipaddr=address, dstipmask=mask,
                    dstportstart="53")


def _protected_block(name: str, dmz: DMZ, vm: VM, known_host_addresses=()) -> etree._Element:
    """The second, independent block of the protected subnets and of the host itself.

    It is stateful (conntrack, through libvirt's iptables layer): a flow the VM
    starts towards a protected subnet or one of the host's addresses is dropped,
    while its replies to flows the LAN or the host started pass. A stateless
    layer-2 drop would cut those replies too. Neighbour discovery is untracked by
    conntrack (neither NEW nor INVALID), so it passes.
    """
    block = etree.Element("filter", name=name, chain="root")
    for family in (4, 6):
        if family == 6 and dmz.gateway6 is None:
            continue  # layer 2 already drops all IPv6 of a DMZ without it
        for hole in holes_for_vm(dmz, vm, family):
            attrs = {"state": "NEW", "dstipaddr": str(hole.to.network_address),
                     "dstipmask": str(hole.to.prefixlen)}
            if hole.ports is not None:
                attrs["dstportstart"] = str(hole.ports[0])
                if hole.ports[1] != hole.ports[0]:
                    attrs["dstportend"] = str(hole.ports[1])
            # accept here means: not blocked by this filter; anti-spoofing still applies.
            sub(_rule(block, "accept", 200), HOLE_ELEMENTS[(family, hole.proto)], **attrs)
        protected = dmz.protected4 if family == 4 else dmz.protected6
        for net in protected:
            sub(_rule(block, "drop", 300), "all" if family == 4 else "all-ipv6", state=NEW_FLOWS,
                dstipaddr=str(net.network_address), dstipmask=str(net.prefixlen))
    _gateway_services(block, dmz)
    targets = host_addresses(dmz, known_host_addresses)
    if dmz.gateway6 is not None:
        targets.append(LINK_LOCAL6)
    for net in targets:
        sub(_rule(block, "drop", 350), "all" if net.version == 4 else "all-ipv6", state=NEW_FLOWS,
            dstipaddr=str(net.network_address), dstipmask=str(net.prefixlen))
    return block


def render_nwfilters(dmz: DMZ, vm: VM, known_host_addresses=()) -> dict[str, etree._Element]:
    """The filters for one VM, referenced filters before those referencing them.

    known_host_addresses: the host's own addresses beyond the gateways (the host view).
    """
    top_name = vm_filter_name(dmz, vm)
    filters: dict[str, etree._Element] = {}
    filters[f"{top_name}-guard4"] = _rogue_server_guard(
        f"{top_name}-guard4", "ipv4-dmzctl", GUARD4_PRIORITY, "ip",
        [{"protocol": "udp", "srcportstart": "67"}])  # DHCP server
    filters[f"{top_name}-block"] = _protected_block(f"{top_name}-block", dmz, vm, known_host_addresses)

    top = etree.Element("filter", name=top_name, chain="root")
    sub(top, "filterref", filter=CLEAN_TRAFFIC)
    sub(top, "filterref", filter=f"{top_name}-guard4")
    sub(top, "filterref", filter=f"{top_name}-block")

    if dmz.gateway6 is not None:
        spoof6 = etree.Element("filter", name=f"{top_name}-spoof6", chain="ipv6-dmzspf",
                               priority=SPOOF6_PRIORITY)
        allowed = [("fe80::", "10"), ("::", "128")]  # neighbour discovery, duplicate address detection
        if vm.ip6 is not None:
            allowed.append((str(vm.ip6), "128"))
            # libvirt's router advertisements also give the VM its SLAAC address, which
            # Linux then prefers as source: bind that one too (derived from the MAC).
            allowed.append((str(slaac_address(vm.mac, dmz.subnet6)), "128"))
        else:
            allowed.append((str(dmz.subnet6.network_address), str(dmz.subnet6.prefixlen)))
        for address, mask in allowed:
            sub(_rule(spoof6, "return", 100), "ipv6", srcipaddr=address, srcipmask=mask)
        _rule(spoof6, "drop", 1000)
        filters[f"{top_name}-spoof6"] = spoof6
        filters[f"{top_name}-guard6"] = _rogue_server_guard(
            f"{top_name}-guard6", "ipv6-dmzctl", GUARD6_PRIORITY, "ipv6",
            [{"protocol": "icmpv6", "type": "134"},  # router advertisement
             {"protocol": "icmpv6", "type": "137"},  # redirect
             {"protocol": "udp", "srcportstart": "547"}])  # DHCPv6 server
        sub(top, "filterref", filter=f"{top_name}-spoof6")
        sub(top, "filterref", filter=f"{top_name}-guard6")
        sub(_rule(top, "accept", ACCEPT6_PRIORITY), "mac", protocolid="ipv6")
        sub(top, "filterref", filter="allow-incoming-ipv6")
    filters[top_name] = top
    return {name: with_uuid(element) for name, element in filters.items()}
