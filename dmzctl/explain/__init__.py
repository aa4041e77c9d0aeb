"""`dmzctl explain`: which rule of a DMZ's policy decides a flow, without sending anything.

Pure: it works from the validated config (the DMZ the nft table is rendered from)
plus what the caller says about the host (its addresses, whether br_netfilter
passes bridged frames to the IP hooks). It walks the chains in exactly the order
dmzctl/render/nft.py renders them:

  forward  1 established/related          (not applicable: explain looks at new flows)
           2 from the DMZ bridge -> from_dmz
  from_dmz 3 a new flow -> caps: dropped as flood when its VM is over its caps
             (Flow.flood), otherwise counted and on to the next rule
           4 back into the DMZ (VM to VM): accepted, or -> vm_to_vm (isolate_vms)
           5 source outside the DMZ subnet -> spoofed
           6 holes, in config order
           7 to protected -> protected
           8 implicit blocks: another DMZ, a host or libvirt subnet, a private range
           9 egress = "none" -> egress
           otherwise the chain's policy accepts (egress = "any")
  input    1 established/related          (not applicable)
           2 the host's own multicast looped back (not applicable: explain looks at the DMZ's flows)
           3 from the DMZ bridge -> to_host
  to_host  3 a new flow -> caps, as in from_dmz
           4 source outside the DMZ subnet (link-local/unspecified allowed) -> spoofed
           5 holes
           6 DHCP/DNS to the gateway (dhcp on; DNS also to the IPv6 gateway and
             link-local; DHCPv6 to ff02::1:2), IPv6 neighbour discovery
           7 everything else -> host

After dmzctl's table, libvirt's own rules still see forwarded packets: an
isolated network rejects every forwarded packet, a NAT network lets only replies
into the DMZ. explain says so when it changes the answer.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Optional, Union

from ..config import DMZ, Hole
from ..implicit import LOG_REASONS, SET_NAMES, Blocked, HostView, blocks_for, classify
from ..render.nft import log_prefix
# The package's interface: what the CLI, verify and the tests use.
from .flow import (PORT_PROTOS, PROTO_NAMES, PROTO_NUMBERS, Decision, ExplainError, Flow,  # noqa: F401
                   format_decision, make_flow, parse_proto, parse_target)
from .order import ORDER, rule_kind  # noqa: F401
from .edges import egress_end, from_outside, hairpin

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

__all__ = ["ORDER", "PORT_PROTOS", "PROTO_NAMES", "PROTO_NUMBERS", "Decision", "ExplainError", "Flow", "explain",
           "format_decision", "host_address_set", "make_flow", "parse_proto", "parse_target", "rule_kind"]

ND_TYPES = {133: "nd-router-solicit", 135: "nd-neighbor-solicit", 136: "nd-neighbor-advert"}

LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")
ALL_DHCP6 = ipaddress.ip_address("ff02::1:2")  # All_DHCP_Relay_Agents_and_Servers
UNSPECIFIED4 = ipaddress.ip_address("0.0.0.0")
UNSPECIFIED6 = ipaddress.ip_address("::")
BROADCAST4 = ipaddress.ip_address("255.255.255.255")


# --- the policy ------------------------------------------------------------

def host_address_set(dmz: DMZ, extra: Iterable = ()) -> frozenset:
    """The gateway(s) always, plus what the caller knows the host owns."""
    addresses = {dmz.gateway.ip}
    if dmz.gateway6 is not None:
        addresses.add(dmz.gateway6.ip)
    for item in extra:
        addresses.add(ipaddress.ip_address(str(item).split("/")[0]))
    return frozenset(addresses)


def _nft_proto(proto: str) -> str:
    return "ipv6-icmp" if proto == "icmpv6" else proto


def _hole_matches(dmz: DMZ, hole: Hole, flow: Flow) -> tuple[bool, str]:
    """Does the hole's rule (as rendered by _hole_exprs) match the flow's first packet?"""
    if hole.family != flow.family:
        return False, f"IPv{hole.family} only"
    if hole.source_vm is not None:
        vm = dmz.vm(hole.source_vm)
        own = vm.ip if hole.family == 4 else vm.ip6
        if flow.src != own:
            return False, f"only from {hole.source_vm} ({own})"
    elif hole.source_net is not None:
        if flow.src is None:
            return False, f"only from {hole.source_net}, and a DHCP address may lie outside it"
        if flow.src not in hole.source_net:
            return False, f"only from {hole.source_net}"
    if flow.dst not in hole.to:
        return False, f"only to {hole.to}"
    if _nft_proto(flow.proto) != _nft_proto(hole.proto):
        return False, f"only {hole.proto}"
    if hole.ports is not None:
        span = str(hole.ports[0]) if hole.ports[0] == hole.ports[1] else f"{hole.ports[0]}-{hole.ports[1]}"
        if flow.port is None:
            return False, f"only port {span} (give --to ADDR:PORT)"
        if not hole.ports[0] <= flow.port <= hole.ports[1]:
            return False, f"only port {span}"
    return True, "matches"


def _hole_text(hole: Hole) -> str:
    text = f"{hole.proto} to {hole.to}"
    if hole.ports is not None:
        text += f" port {hole.ports[0]}" if hole.ports[0] == hole.ports[1] else f" ports {hole.ports[0]}-{hole.ports[1]}"
    if hole.source_vm:
        text += f" from {hole.source_vm}"
    elif hole.source_net:
        text += f" from {hole.source_net}"
    return text


class _Walk:
    """Collects the trace while walking one chain."""

    def __init__(self, dmz: DMZ, flow: Flow, hook: str):
        self.dmz = dmz
        self.flow = flow
        self.hook = hook
        self.trace: list[str] = [
            f"{hook} 1 established/related: not applicable (a new flow; replies to an allowed flow are accepted)",
            f"{hook} 2 enters from the DMZ bridge {dmz.bridge}: jump "
            f"{'from_dmz' if hook == 'forward' else 'to_host'}",
        ]
        self.notes: list[str] = []

    def decide(self, allowed: bool, decided_by: str, rule: str, chain: str, reason: str,
               origin: Optional[str] = None, log_reason: Optional[str] = None) -> Decision:
        return Decision(allowed=allowed, decided_by=decided_by, rule=rule, chain=chain, hook=self.hook,
                        reason=reason, origin=origin,
                        log_prefix=log_prefix(self.dmz, log_reason) if log_reason else None,
                        trace=tuple(self.trace), notes=tuple(self.notes))

    def caps(self, chain: str) -> Optional[Decision]:
        """Step 3 of from_dmz and to_host: every new flow from the bridge meets its VM's caps."""
        dmz, flow = self.dmz, self.flow
        vm = _sending_vm(dmz, flow)
        caps = dmz.caps_of(vm) if vm is not None else dmz.flow_caps
        whose = f"{vm.name}'s" if vm is not None else "its VM's"
        text = f"{caps.new_rate} new flows, burst {caps.new_burst}; {caps.flows} flows at once"
        if vm is None and any(v.flow_caps for v in dmz.vms):
            self.notes.append("caps are per VM (by MAC); VMs with caps of their own: "
                              + ", ".join(v.name for v in dmz.vms if v.flow_caps))
        if flow.flood:
            self.trace.append(f"{chain} 3 a new flow; {whose} caps ({text}) are exceeded: jump flood")
            own = [v.name for v in dmz.vms if vm is not None and vm.flow_caps and v.flow_caps == vm.flow_caps]
            rule = f"new flows over {', '.join(own)}'s max_new_flows" if own else "new flows over max_new_flows"
            return self.decide(False, "flood", rule, "flood",
                               f"the sender opens new flows faster than its caps allow ({text}): every new "
                               f"flow it starts is dropped, whatever its destination, until it slows down "
                               f"(and its open flows end, for max_flows); its established flows go on",
                               log_reason="flood")
        self.trace.append(f"{chain} 3 a new flow: counted against {whose} caps ({text}): under them, next rule")
        return None

    def spoofed(self, chain: str, step: int, allow_unspecified: bool) -> Optional[Decision]:
        dmz, flow = self.dmz, self.flow
        if flow.family == 6 and dmz.subnet6 is None:
            self.trace.append(f"{chain} {step} the DMZ has no IPv6: jump spoofed")
            return self.decide(False, "spoofed", "the DMZ has no IPv6", "spoofed",
                               f"DMZ {dmz.name} has no IPv6 (no dmz.gateway6): every IPv6 packet from it is "
                               f"dropped as spoofed", log_reason="spoofed")
        if flow.src is None:
            self.trace.append(f"{chain} {step} source: the VM's DHCP address, inside the DMZ subnet: pass")
            return None
        allowed_nets = [dmz.subnet if flow.family == 4 else dmz.subnet6]
        if allow_unspecified:
            allowed_nets += [ipaddress.ip_network(UNSPECIFIED4)] if flow.family == 4 else \
                [LINK_LOCAL6, ipaddress.ip_network(UNSPECIFIED6)]
        if any(flow.src in net for net in allowed_nets):
            self.trace.append(f"{chain} {step} source {flow.src} inside "
                              f"{', '.join(str(n) for n in allowed_nets)}: pass")
            return None
        self.trace.append(f"{chain} {step} source {flow.src} outside "
                          f"{', '.join(str(n) for n in allowed_nets)}: jump spoofed")
        return self.decide(False, "spoofed", f"IPv{flow.family} source outside the DMZ subnet", "spoofed",
                           f"source {flow.src} is not a DMZ address: anti-spoofing drops it before any hole "
                           f"is looked at", log_reason="spoofed")

    def holes(self, chain: str, step: int) -> Optional[Decision]:
        for hole in self.dmz.holes:
            matched, why = _hole_matches(self.dmz, hole, self.flow)
            if matched:
                self.trace.append(f"{chain} {step} hole {hole.origin} ({_hole_text(hole)}): matches: accept")
                return self.decide(True, "hole", f"hole {hole.origin}", chain,
                                   f"hole {hole.origin} ({_hole_text(hole)}) accepts it", origin=hole.origin)
            if hole.family == self.flow.family and self.flow.dst in hole.to:
                # Only holes to this destination are worth a line: they show what is not broader.
                self.trace.append(f"{chain} {step} hole {hole.origin} ({_hole_text(hole)}): no, {why}")
        if not any(h.family == self.flow.family and self.flow.dst in h.to for h in self.dmz.holes):
            self.trace.append(f"{chain} {step} holes: none to {self.flow.dst}")
        return None


def _sending_vm(dmz: DMZ, flow: Flow):
    """The VM the flow comes from, when known: by name, or by its static address (caps are keyed by MAC:
    a forged source still counts against the VM that sends it, which explain cannot tell)."""
    for vm in dmz.vms:
        if vm.name == flow.vm or (flow.vm is None and flow.src is not None and flow.src in (vm.ip, vm.ip6)):
            return vm
    return None


def _in_dmz_subnet(dmz: DMZ, address: IPAddress) -> bool:
    net = dmz.subnet if address.version == 4 else dmz.subnet6
    return net is not None and address in net


def _in_protected(dmz: DMZ, address: IPAddress):
    for net in (dmz.protected4 if address.version == 4 else dmz.protected6):
        if address in net:
            return net
    return None


def _is_host_destination(dmz: DMZ, dst: IPAddress, host_addresses: frozenset) -> bool:
    if dst in host_addresses or dst == BROADCAST4 or dst.is_multicast:
        return True
    if dst in LINK_LOCAL6:
        return True  # link-local is never forwarded: from the DMZ it can only be for the host
    if dst.version == 4 and dst == dmz.subnet.broadcast_address:
        return True
    return False


def explain(dmz: DMZ, flow: Flow, host_addresses: Iterable = (),
            bridge_netfilter: Optional[bool] = None, blocks: Optional[tuple[Blocked, ...]] = None) -> Decision:
    """The decision for the flow's first packet, and the rules that lead to it.

    host_addresses: the host's own addresses (the gateways are always included).
    bridge_netfilter: whether br_netfilter hands bridged frames to the IP hooks
    (/proc/sys/net/bridge/bridge-nf-call-iptables = 1); None when unknown.
    blocks: the implicit blocks the table holds (implicit.blocks_for with the
    host's view); None for those known without the host (the private ranges).
    """
    if flow.src is not None and flow.src.version != flow.dst.version:
        raise ExplainError(f"{flow.src} and {flow.dst} are of different IP versions")
    if blocks is None:
        blocks = blocks_for(dmz, HostView())
    hosts = host_address_set(dmz, host_addresses)
    if not flow.from_dmz:
        return _from_outside(dmz, flow, hosts)
    translated = hairpin(dmz, flow, hosts)
    if translated is not None and translated[0].dst == flow.src:
        return Decision(False, "layer2", "the DMZ bridge (no hairpin)", None, None,
                        f"{translated[1]}; but that is the sender itself, and the bridge never sends a frame back "
                        f"out of the port it came in on: a VM reaches its own service by its own address")
    if translated is not None:
        decision = _forward(dmz, translated[0], blocks)
        return dataclasses.replace(decision, trace=(translated[1],) + decision.trace)
    if _is_host_destination(dmz, flow.dst, hosts):
        return _to_host(dmz, flow)
    if _in_dmz_subnet(dmz, flow.dst) and not flow.via_host:
        return _vm_to_vm_bridged(dmz, flow, bridge_netfilter, blocks)
    return _forward(dmz, flow, blocks)


def _from_outside(dmz: DMZ, flow: Flow, hosts: frozenset) -> Decision:
    trace = ("forward 1 established/related: not applicable (a new flow)",
             f"forward 2 does not enter from the DMZ bridge {dmz.bridge}: the chain's policy accepts")
    decision = from_outside(dmz, flow, hosts, [trace[0], f"forward 2 does not enter from the DMZ bridge {dmz.bridge}"])
    if decision is not None:
        return decision
    if _in_dmz_subnet(dmz, flow.dst):
        if dmz.mode == "nat":
            return Decision(False, "libvirt-nat", "libvirt NAT network", None, "forward",
                            "dmzctl's table lets it pass, but libvirt's NAT mode only lets replies into the DMZ",
                            trace=trace)
        if dmz.mode == "isolated":
            return Decision(False, "libvirt-isolated", "libvirt isolated network", None, "forward",
                            "dmzctl's table lets it pass, but libvirt's isolated mode forwards nothing to or "
                            "from the DMZ", trace=trace)
        return Decision(True, "not-from-dmz", "forward policy accept", "forward", "forward",
                        "dmzctl filters what enters from the DMZ; a new flow into the DMZ is routed to the VM "
                        "and its replies are accepted as established/related", trace=trace)
    return Decision(True, "not-from-dmz", "not dmzctl's traffic", None, None,
                    "neither from nor to the DMZ: dmzctl's table does not judge it", trace=trace)


def _forward(dmz: DMZ, flow: Flow, blocks: tuple[Blocked, ...], walk: Optional[_Walk] = None) -> Decision:
    walk = walk or _Walk(dmz, flow, "forward")
    decision = walk.caps("from_dmz")
    if decision is not None:
        return decision
    if _in_dmz_subnet(dmz, flow.dst):
        if dmz.isolate_vms:
            walk.trace.append("from_dmz 4 leaves through the DMZ bridge again (isolate_vms): jump vm_to_vm")
            return walk.decide(False, "vm-to-vm", "VM to VM (isolate_vms)", "vm_to_vm",
                               f"{flow.dst} is another DMZ address and isolate_vms is on", log_reason="vm-to-vm")
        walk.trace.append("from_dmz 4 leaves through the DMZ bridge again: accept")
        return walk.decide(True, "within-dmz", "VM to VM within the DMZ", "from_dmz",
                           f"{flow.dst} is another DMZ address and isolate_vms is off")
    walk.trace.append("from_dmz 4 back into the DMZ: no")
    decision = walk.spoofed("from_dmz", 5, allow_unspecified=False) or walk.holes("from_dmz", 6)
    if decision is not None:
        return _after_libvirt(dmz, flow, decision)
    net = _in_protected(dmz, flow.dst)
    if net is not None:
        walk.trace.append(f"from_dmz 7 {flow.dst} in @protected{flow.family} ({net}): jump protected")
        return walk.decide(False, "protected", f"to protected IPv{flow.family}", "protected",
                           f"{flow.dst} is inside the protected subnet {net}", log_reason="to-protected")
    walk.trace.append(f"from_dmz 7 {flow.dst} not in @protected{flow.family}")
    block = classify(blocks, flow.dst)
    if block is not None:
        chain = SET_NAMES[block.kind]
        walk.trace.append(f"from_dmz 8 {flow.dst} in @{chain}{flow.family} ({block.net}): jump {chain}")
        return walk.decide(False, block.kind, f"to {block.kind} IPv{flow.family}", chain,
                           f"{flow.dst} is in {block.net}: {block.reason}, blocked without being listed "
                           f"(a [[dmz.allow]] hole opens it)", log_reason=LOG_REASONS[block.kind])
    walk.trace.append(f"from_dmz 8 {flow.dst} in no implicit block (other DMZs, host subnets, private ranges)")
    return _after_libvirt(dmz, flow, egress_end(walk, dmz, flow))


def _after_libvirt(dmz: DMZ, flow: Flow, decision: Decision) -> Decision:
    """libvirt's own forwarding rules run after dmzctl's table and can still reject an accepted packet."""
    if not decision.allowed or dmz.mode != "isolated" or _in_dmz_subnet(dmz, flow.dst):
        return decision
    return Decision(False, "libvirt-isolated", "libvirt isolated network", decision.chain, decision.hook,
                    f"dmzctl's table accepts it ({decision.rule}), but libvirt's isolated mode rejects every "
                    f"packet forwarded out of the DMZ", origin=decision.origin, trace=decision.trace,
                    notes=decision.notes + ("holes to addresses beyond the host cannot work in "
                                            "mode = \"isolated\"; use route or nat",))


def _vm_to_vm_bridged(dmz: DMZ, flow: Flow, bridge_netfilter: Optional[bool],
                      blocks: tuple[Blocked, ...]) -> Decision:
    """Another DMZ address, switched on the bridge: nftables sees it only through br_netfilter."""
    subnet = dmz.subnet if flow.family == 4 else dmz.subnet6
    if flow.src is not None and flow.src not in subnet and not (flow.family == 6 and flow.src in LINK_LOCAL6):
        return Decision(False, "nwfilter", "nwfilter dmzctl-clean-traffic / the VM's IPv6 source rules", None, None,
                        f"a forged source ({flow.src}) switched to another VM: the VM's nwfilter drops it on "
                        f"its libvirt NIC (nftables, even with br_netfilter, lets VM-to-VM traffic pass "
                        f"unless isolate_vms)")
    if bridge_netfilter:
        walk = _Walk(dmz, flow, "forward")
        walk.notes.append("switched on the bridge; br_netfilter (bridge-nf-call-iptables = 1) hands it to "
                          "the forward hook as if routed")
        decision = _forward(dmz, flow, blocks, walk)
        if not decision.allowed or not dmz.isolate_vms:
            return decision
    if dmz.isolate_vms:
        notes = ("between two real guest NICs libvirt's <port isolated='yes'/> cuts it at layer 2, "
                 "whatever nftables says",)
        if bridge_netfilter is None:
            notes += ("with br_netfilter loaded, dmzctl's vm_to_vm rule drops it as well",)
        return Decision(False, "port-isolation", "libvirt <port isolated='yes'/> (isolate_vms)", None, None,
                        f"{flow.dst} is another DMZ address: isolate_vms isolates the VMs' bridge ports",
                        notes=notes)
    notes = ["switched on the bridge at layer 2: nftables' IP hooks do not see it"]
    if bridge_netfilter is None:
        notes.append("with br_netfilter loaded (bridge-nf-call-iptables = 1) from_dmz sees it and accepts it "
                     "as VM to VM within the DMZ")
    return Decision(True, "layer2", "the DMZ bridge (no isolate_vms)", None, None,
                    f"{flow.dst} is another DMZ address and isolate_vms is off", notes=tuple(notes))


def _to_host(dmz: DMZ, flow: Flow) -> Decision:
    walk = _Walk(dmz, flow, "input")
    decision = walk.caps("to_host") or walk.spoofed("to_host", 4, allow_unspecified=True) \
        or walk.holes("to_host", 5)
    if decision is not None:
        return decision
    port_proto = flow.proto in ("tcp", "udp")
    if dmz.dhcp:
        if flow.family == 4 and flow.dst in (dmz.gateway.ip, BROADCAST4) and flow.proto == "udp" and flow.port == 67:
            walk.trace.append("to_host 6 DHCP to the gateway: accept")
            return walk.decide(True, "dhcp", "DHCP to the gateway", "to_host", "DHCP requests to the gateway "
                               "are accepted (dhcp = true)")
        if flow.family == 4 and flow.dst == dmz.gateway.ip and port_proto and flow.port == 53:
            walk.trace.append("to_host 6 DNS to the gateway: accept")
            return walk.decide(True, "dns", "DNS to the gateway", "to_host", "DNS to libvirt's dnsmasq on the "
                               "gateway is accepted (dhcp = true)")
        if flow.family == 6 and dmz.gateway6 is not None and port_proto and flow.port == 53 \
                and (flow.dst == dmz.gateway6.ip or flow.dst in LINK_LOCAL6):
            walk.trace.append("to_host 6 DNS to the gateway (IPv6): accept")
            return walk.decide(True, "dns6", "DNS to the gateway (IPv6)", "to_host", "DNS to libvirt's dnsmasq "
                               "on the IPv6 gateway or the bridge's link-local address (named in its router "
                               "advertisements) is accepted (dhcp = true)")
        if flow.family == 6 and dmz.gateway6 is not None and flow.proto == "udp" and flow.port == 547 \
                and flow.dst == ALL_DHCP6 and (flow.src is None or flow.src in LINK_LOCAL6):
            walk.trace.append("to_host 6 DHCPv6 to the gateway: accept")
            return walk.decide(True, "dhcp6", "DHCPv6 to the gateway", "to_host", "DHCPv6 from a link-local "
                               "address to ff02::1:2 is accepted (dhcp = true)")
        walk.trace.append("to_host 6 DHCP/DNS to the gateway: no")
    if dmz.gateway6 is not None and flow.proto == "icmpv6" and flow.icmp_type in ND_TYPES:
        walk.trace.append(f"to_host 6 IPv6 neighbour discovery ({ND_TYPES[flow.icmp_type]}): accept")
        walk.notes.append("only with hop limit 255, as genuine neighbour discovery has")
        return walk.decide(True, "nd", "IPv6 neighbour discovery", "to_host",
                           "neighbour discovery with the host is accepted")
    walk.trace.append("to_host 7 everything else to the host: jump host")
    return walk.decide(False, "host", "everything else to the host", "host",
                       f"{flow.dst} is the host's own address: the DMZ reaches the host only through its holes "
                       f"and DHCP/DNS/neighbour discovery", log_reason="to-host")


