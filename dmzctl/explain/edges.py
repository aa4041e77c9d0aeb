"""explain at the DMZ's edges (render/nft_edges.py): flows from outside into the DMZ (DNAT,
to_dmz) and the end of from_dmz (egress any, none, or the allowlist), in the rendered order."""

from __future__ import annotations

from typing import Optional

from ..config import DMZ, EgressAllow, Publish, describe_ports
from ..render.nft import log_prefix
from ..render.nft_edges import name_groups
from .flow import Decision, Flow


def _span(ports) -> str:
    return describe_ports(ports)


def _port_ok(ports, port: Optional[int]) -> bool:
    return ports is None or (port is not None and ports[0] <= port <= ports[1])


# --- from outside ---------------------------------------------------------------

def _dnat(dmz: DMZ, flow: Flow, hosts: frozenset) -> Optional[Publish]:
    """The publish entry whose DNAT rule (dstnat, config order) the flow's first packet meets."""
    if flow.family != 4 or flow.port is None:
        return None
    for entry in dmz.publish:
        if entry.listen is None or entry.proto != flow.proto:
            continue
        if entry.listen == "host":
            where = flow.dst in hosts and flow.dst not in dmz.subnet
        else:
            where = flow.dst == entry.listen
        sources = [n for n in entry.sources if n.version == 4]
        if entry.sources and not any(flow.src in n for n in sources):
            continue
        low, high = entry.listen_ports
        if where and low <= flow.port <= high:
            return entry
    return None


def hairpin(dmz: DMZ, flow: Flow, hosts: frozenset) -> Optional[tuple[Flow, str]]:
    """A flow from the DMZ to a published host address: translated (dstnat) before any filter chain sees
    it, then routed back into the DMZ by the host (and masqueraded by srcnat). The flow explain then
    judges, and the trace line that says so; None when no DNAT rule matches."""
    entry = _dnat(dmz, flow, hosts)
    if entry is None:
        return None
    vm = dmz.vm(entry.to)
    port = entry.ports[0] + flow.port - entry.listen_ports[0]
    translated = Flow(dst=vm.ip, proto=flow.proto, src=flow.src, port=port, vm=flow.vm, via_host=True,
                      flood=flow.flood, learned=flow.learned)
    return translated, (f"dstnat {entry.origin} ({entry.proto} {entry.listen} {_span(entry.listen_ports)}): "
                        f"dnat to {vm.ip}:{port}, routed back into the DMZ (srcnat masquerades it: hairpin)")


def from_outside(dmz: DMZ, flow: Flow, hosts: frozenset, trace: list[str]) -> Optional[Decision]:
    """A flow from beyond the DMZ: DNAT to a VM when published on a host address, then to_dmz.
    None: dmzctl's table lets it be (not into the DMZ, or inbound = "any")."""
    entry = _dnat(dmz, flow, hosts)
    if entry is not None:
        vm = dmz.vm(entry.to)
        port = entry.ports[0] + flow.port - entry.listen_ports[0]
        trace.append(f"dstnat {entry.origin} ({entry.proto} {entry.listen} {_span(entry.listen_ports)}): "
                     f"dnat to {vm.ip}:{port}")
        flow = Flow(dst=vm.ip, proto=flow.proto, src=flow.src, port=port, from_dmz=False)
    elif flow.dst in hosts:
        return None  # the host's own address: its input, which dmzctl's table does not judge from outside
    net = dmz.subnet if flow.family == 4 else dmz.subnet6
    if net is None or flow.dst not in net or dmz.mode != "route" or dmz.inbound != "published":
        return None if entry is None else _accepted(dmz, flow, trace, entry, "inbound = \"any\"")
    trace.append(f"forward 3 from elsewhere into the DMZ bridge {dmz.bridge}: jump to_dmz")
    return _to_dmz(dmz, flow, trace, entry)


def _accepted(dmz: DMZ, flow: Flow, trace: list[str], entry: Publish, why: str) -> Decision:
    trace.append(f"forward 3 {why}: nothing more judges flows into the DMZ; policy accept")
    return Decision(True, "published", entry.origin, "forward", "forward",
                    f"{entry.origin} forwards it to {entry.to} ({flow.dst}:{flow.port}); {why}",
                    origin=entry.origin, trace=tuple(trace))


def _to_dmz(dmz: DMZ, flow: Flow, trace: list[str], dnat: Optional[Publish]) -> Decision:
    via = f" (after {dnat.origin}'s DNAT)" if dnat is not None else ""
    protected = dmz.protected4 if flow.family == 4 else dmz.protected6
    if dmz.lan_inbound and flow.src is not None and any(flow.src in n for n in protected):
        trace.append(f"to_dmz 1 source {flow.src} in @protected{flow.family}: accept (lan_inbound)")
        return Decision(True, "lan-inbound", f"from protected IPv{flow.family} (lan_inbound)", "to_dmz", "forward",
                        f"{flow.src} is in a protected subnet, which reaches every port of the DMZ "
                        f"(lan_inbound = true){via}", trace=tuple(trace))
    trace.append("to_dmz 1 " + ("lan_inbound = false" if not dmz.lan_inbound else
                                f"source {flow.src} not in @protected{flow.family}"))
    for entry in dmz.publish:
        vm = dmz.vm(entry.to)
        own = vm.ip if flow.family == 4 else vm.ip6
        if own != flow.dst or entry.proto != flow.proto or not _port_ok(entry.ports, flow.port):
            continue
        sources = [n for n in entry.sources if n.version == flow.family]
        if entry.sources and not any(flow.src in n for n in sources):
            trace.append(f"to_dmz 3 {entry.origin}: only from {', '.join(str(n) for n in entry.sources)}")
            continue
        step, rule = ("3", entry.origin) if entry.sources else ("2", f"published IPv{flow.family}")
        trace.append(f"to_dmz {step} {entry.origin} ({entry.proto} {entry.to} {_span(entry.ports)}): accept")
        return Decision(True, "published", rule, "to_dmz", "forward",
                        f"{entry.origin} publishes {entry.proto} {_span(entry.ports)} of {entry.to}{via}",
                        origin=entry.origin, trace=tuple(trace))
    trace.append("to_dmz 4 not published: jump inbound")
    return Decision(False, "inbound", "not published", "inbound", "forward",
                    f"inbound = \"published\" and no [[dmz.publish]] opens {flow.proto} "
                    f"{flow.dst}{'' if flow.port is None else f' port {flow.port}'} to {flow.src}",
                    log_prefix=log_prefix(dmz, "inbound"), trace=tuple(trace))


# --- egress ----------------------------------------------------------------------

def _source_ok(dmz: DMZ, source_vm: Optional[str], flow: Flow) -> bool:
    if source_vm is None:
        return True
    vm = dmz.vm(source_vm)
    return flow.src is not None and flow.src == (vm.ip if flow.family == 4 else vm.ip6)


def _prefix_entry(dmz: DMZ, flow: Flow) -> Optional[EgressAllow]:
    for entry in dmz.egress_allow:
        if entry.to_net is None or entry.to_net.version != flow.family or flow.dst not in entry.to_net:
            continue
        if entry.proto == flow.proto and _port_ok(entry.ports, flow.port) and _source_ok(dmz, entry.source_vm, flow):
            return entry
    return None


def egress_end(walk, dmz: DMZ, flow: Flow) -> Decision:
    """from_dmz after the implicit blocks; `walk` is explain's _Walk. Its decide() returns a Decision."""
    if dmz.egress == "none":
        walk.trace.append('from_dmz 9 egress = "none": jump egress')
        return walk.decide(False, "egress", "egress none", "egress",
                           'egress = "none": the DMZ reaches nothing beyond its holes', log_reason="egress")
    if dmz.egress == "any":
        walk.trace.append('from_dmz 9 egress = "any": end of chain, policy accept')
        return walk.decide(True, "egress-any", "forward policy accept", "from_dmz",
                           'not protected, not the host, not implicitly blocked, and egress = "any"')
    if dmz.egress_names and flow.proto in ("tcp", "udp") and flow.port == 53:
        walk.trace.append("from_dmz 9 DNS to a resolver other than the gateway: jump dns")
        return walk.decide(False, "dns-elsewhere", "DNS to anywhere but the gateway (names are allowlisted)", "dns",
                           "the allowlist names DNS names, which it learns from the gateway's answers: DNS goes "
                           "to the gateway only, other resolvers need a [[dmz.allow]] hole", log_reason="dns-elsewhere")
    entry = _prefix_entry(dmz, flow)
    if entry is not None:
        walk.trace.append(f"from_dmz 10 {entry.origin} ({entry.proto} to {entry.to_net} {_span(entry.ports)}"
                          f"{f' from {entry.source_vm}' if entry.source_vm else ''}): accept")
        return walk.decide(True, "egress-allow", f"egress allowlist IPv{flow.family}", "from_dmz",
                           f"{entry.origin} allows it", origin=entry.origin)
    walk.trace.append(f"from_dmz 10 no allowlisted prefix matches {flow.dst}")
    decision = _by_name(walk, dmz, flow)
    if decision is not None:
        return decision
    walk.trace.append("from_dmz 12 egress allowlist: anything else: jump egress")
    return walk.decide(False, "egress", "egress allowlist: anything else", "egress",
                       'egress = "allowlist" and no entry allows it', log_reason="egress")


def _by_name(walk, dmz: DMZ, flow: Flow) -> Optional[Decision]:
    for (proto, ports, source_vm), names in name_groups(dmz):
        if proto != flow.proto or not _source_ok(dmz, source_vm, flow):
            continue
        if ports is not None and not any(_port_ok(p, flow.port) for p in ports):
            continue
        learned = [name for name in names if name in flow.learned]
        rule = f"egress to {', '.join(names)} (IPv{flow.family}, learned by the gateway's DNS)"
        if learned:
            walk.trace.append(f"from_dmz 11 {flow.dst} learned from the gateway's answer for {learned[0]}: accept")
            return walk.decide(True, "egress-name", rule, "from_dmz",
                               f"{flow.dst} is in the set the gateway's dnsmasq fills from its answers for "
                               f"{learned[0]}")
        walk.trace.append(f"from_dmz 11 {', '.join(names)}: {flow.dst} not learned from the gateway's answers")
        walk.notes.append(f"allowed once a VM has looked up {' or '.join(names)} through the gateway and the "
                          f"answer holds {flow.dst} (explain --resolved NAME)")
    return None
