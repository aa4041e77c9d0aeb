"""Per-VM libvirt nwfilters: anti-spoofing plus a second, independent block of the protected subnets.

The nftables table is the first layer; these filters sit on each VM's bridge
port (ebtables) and hold even if the table is deleted under a running VM.

Per VM:
  dmzctl-<dmz>-<vm>          root: references all the below (the NIC's filterref)
  dmzctl-clean-traffic       static (xml/nwfilter): MAC/IPv4/ARP anti-spoofing
  dmzctl-<dmz>-<vm>-guard4   chain ipv4-dmzctl: no DHCP server replies, holes, protected dropped
  dmzctl-<dmz>-<vm>-spoof6   chain ipv6-dmzspf: IPv6 source bound (DMZ with IPv6 only)
  dmzctl-<dmz>-<vm>-guard6   chain ipv6-dmzctl: no RAs / DHCPv6 replies, holes, protected dropped
"""

from __future__ import annotations

from typing import Iterable

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


def vm_filter_name(dmz: DMZ, vm: VM) -> str:
    return f"dmzctl-{dmz.name}-{vm.name}"


def vm_filter_parameters(dmz: DMZ, vm: VM) -> list[tuple[str, str]]:
    """$IP for libvirt's IPv4/ARP spoofing filters: the static address, or learnt from DHCP only."""
    if vm.ip is not None:
        return [("IP", str(vm.ip))]
    return [("CTRL_IP_LEARNING", "dhcp"), ("DHCPSERVER", str(dmz.gateway.ip))]


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


def _match_hole(rule: etree._Element, hole: Hole) -> None:
    tag = "ip" if hole.family == 4 else "ipv6"
    attrs = {"dstipaddr": str(hole.to.network_address), "dstipmask": str(hole.to.prefixlen)}
    proto = {"icmpv6": "icmpv6"}.get(hole.proto, hole.proto)
    attrs["protocol"] = proto
    if hole.ports is not None:
        attrs["dstportstart"] = str(hole.ports[0])
        if hole.ports[1] != hole.ports[0]:
            attrs["dstportend"] = str(hole.ports[1])
    sub(rule, tag, **attrs)


def _guard(name: str, chain: str, priority: str, family: int, dmz: DMZ, vm: VM,
           rogue_servers: Iterable[dict]) -> etree._Element:
    tag = "ip" if family == 4 else "ipv6"
    guard = etree.Element("filter", name=name, chain=chain, priority=priority)
    # Never act as a DHCP server / router for the other VMs.
    for attrs in rogue_servers:
        sub(_rule(guard, "drop", 100), tag, **attrs)
    for hole in holes_for_vm(dmz, vm, family):
        # return: leave this chain and let the remaining anti-spoofing checks decide.
        _match_hole(_rule(guard, "return", 200), hole)
    protected = dmz.protected4 if family == 4 else dmz.protected6
    for net in protected:
        sub(_rule(guard, "drop", 300), tag, dstipaddr=str(net.network_address), dstipmask=str(net.prefixlen))
    return guard


def render_nwfilters(dmz: DMZ, vm: VM) -> dict[str, etree._Element]:
    """The filters for one VM, referenced filters before those referencing them."""
    top_name = vm_filter_name(dmz, vm)
    filters: dict[str, etree._Element] = {}
    filters[f"{top_name}-guard4"] = _guard(
        f"{top_name}-guard4", "ipv4-dmzctl", GUARD4_PRIORITY, 4, dmz, vm,
        rogue_servers=[{"protocol": "udp", "srcportstart": "67"}])

    top = etree.Element("filter", name=top_name, chain="root")
    sub(top, "filterref", filter=CLEAN_TRAFFIC)
    sub(top, "filterref", filter=f"{top_name}-guard4")

    if dmz.gateway6 is not None:
        spoof6 = etree.Element("filter", name=f"{top_name}-spoof6", chain="ipv6-dmzspf",
                               priority=SPOOF6_PRIORITY)
        allowed = [("fe80::", "10"), ("::", "128")]  # neighbour discovery, duplicate address detection
        if vm.ip6 is not None:
            allowed.append((str(vm.ip6), "128"))
        else:
            allowed.append((str(dmz.subnet6.network_address), str(dmz.subnet6.prefixlen)))
        for address, mask in allowed:
            sub(_rule(spoof6, "return", 100), "ipv6", srcipaddr=address, srcipmask=mask)
        _rule(spoof6, "drop", 1000)
        filters[f"{top_name}-spoof6"] = spoof6
        filters[f"{top_name}-guard6"] = _guard(
            f"{top_name}-guard6", "ipv6-dmzctl", GUARD6_PRIORITY, 6, dmz, vm,
            rogue_servers=[{"protocol": "icmpv6", "type": "134"},  # router advertisement
                           {"protocol": "icmpv6", "type": "137"},  # redirect
                           {"protocol": "udp", "srcportstart": "547"}])  # DHCPv6 server
        sub(top, "filterref", filter=f"{top_name}-spoof6")
        sub(top, "filterref", filter=f"{top_name}-guard6")
        sub(_rule(top, "accept", ACCEPT6_PRIORITY), "mac", protocolid="ipv6")
        sub(top, "filterref", filter="allow-incoming-ipv6")
    filters[top_name] = top
    return {name: with_uuid(element) for name, element in filters.items()}
