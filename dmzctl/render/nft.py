"""The DMZ's nftables table as libnftables JSON: rules as data, applied in one batch.

One `inet` table per DMZ named dmzctl-<dmz>, so IPv4 and IPv6 share one policy.
Chain order is the contract (tests check it):

  forward (hook)  1 established/related accepted
                  2 from the DMZ bridge -> from_dmz
  from_dmz        3 a new flow -> caps: over its VM's caps -> flood (log, drop)
                  4 back into the DMZ (VM to VM, switched with br_netfilter or routed
                    by the host): accepted, or -> vm_to_vm when isolate_vms
                  5 source outside the DMZ subnet -> spoofed (log, drop)
                  6 holes accepted
                  7 to protected -> protected (rate limit, log, drop), every protocol
                  8 implicit blocks, each class to its own log-and-drop chain
                    (dmzctl/implicit.py): another DMZ -> other_dmz, a host or
                    libvirt subnet -> host_net, a private or special range -> private
                  9 anything else dropped when egress = "none"
  input (hook)    1 established/related accepted
                  2 the host's own multicast looped back on the DMZ bridge (its router
                    advertisements): accepted unlogged, not the DMZ's doing
                  3 from the DMZ bridge -> to_host
  to_host         3 a new flow -> caps, as in from_dmz (a flood of the host's own
                    addresses fills the conntrack table too)
                  4 source outside the DMZ subnet -> spoofed
                  5 holes accepted (a protected address may be the host's own)
                  6 DHCP/DNS to the gateway (dhcp on; DNS also on the IPv6 gateway and the
                    bridge's link-local address, which libvirt's router advertisements name),
                    neighbour discovery (IPv6 on)
                  7 everything else -> host (rate limit, log, drop)
  caps            (VMs with caps of their own -> caps_N, which does the same with theirs)
                  new flows over max_new_flows -> flood; flows over max_flows -> flood;
                  otherwise back to the calling chain

The caps come first so that nothing the DMZ starts escapes them: VM to VM (conntrack sees
it too with br_netfilter), forged sources (dropped later, but counted against the VM that
sent them), holes, DHCP and DNS. They are keyed by the sender's MAC address, not its IP
address: one budget per VM for IPv4, IPv6 (static, SLAAC and link-local) and DHCP from
0.0.0.0 alike, and a key space a VM cannot widen by choosing source addresses (libvirt's
no-mac-spoofing binds the MAC to the NIC). Per packet: a `ct state` test on flows that are
not established, then two hash lookups (a vmap first when some VMs have caps of their own),
whatever the number of VMs. Only new flows are counted; replies and the flows the LAN
opens into the DMZ are established/related or never enter from the bridge.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from ..config import DMZ, FlowCaps
from .nftexpr import (FAMILY, HOOK_PRIORITY, _addr, _anon_set, _chain, _counter, _hole_exprs, _ipfamily,  # noqa: F401
                      _log_drop_chain, _match, _meta, _payload, _ports, _rate, _rule, _set, _verdict, log_prefix,
                      table_name)
from .nft_backstop import backstop_commands, delete_backstop_commands
from .nft_edges import edge_commands, egress_rules
from ..implicit import CLASSES, LOG_REASONS, SET_NAMES, Blocked, HostView, blocks_for, set_elements

Expr = dict[str, Any]
Command = dict[str, Any]


def _source_checks(dmz: DMZ, chain: str, allow_unspecified: bool) -> list[Command]:
    """Anti-spoofing: drop sources outside the DMZ's own subnets (all IPv6 when it has none)."""
    v4_ok = [dmz.subnet] + ([ipaddress.ip_network("0.0.0.0/32")] if allow_unspecified else [])
    rules = [_rule(dmz, chain, [_match(_payload("ip", "saddr"), _anon_set(v4_ok), "!="),
                                _verdict("jump", "spoofed")], "IPv4 source outside the DMZ subnet")]
    if dmz.subnet6 is not None:
        v6_ok = [dmz.subnet6]
        if allow_unspecified:
            # Neighbour discovery and duplicate address detection to the host.
            v6_ok += [ipaddress.ip_network("fe80::/10"), ipaddress.ip_network("::/128")]
        rules.append(_rule(dmz, chain, [_match(_payload("ip6", "saddr"), _anon_set(v6_ok), "!="),
                                        _verdict("jump", "spoofed")], "IPv6 source outside the DMZ subnet"))
    else:
        rules.append(_rule(dmz, chain, [_match(_meta("nfproto"), "ipv6"), _verdict("jump", "spoofed")],
                           "the DMZ has no IPv6"))
    return rules


def _implicit_rules(dmz: DMZ, chain: str) -> list[Command]:
    """One rule per class and family, whatever the number of prefixes: they are set elements."""
    rules = []
    for kind in CLASSES:
        for version in (4, 6):
            rules.append(_rule(dmz, chain, [_match(_payload(_ipfamily(version), "daddr"),
                                                   f"@{SET_NAMES[kind]}{version}"),
                                            _verdict("jump", SET_NAMES[kind])],
                               f"to {kind} IPv{version}"))
    return rules



# --- per-VM caps on new and concurrent flows (conntrack exhaustion) ---------

CAPS_SET_SIZE = 65535  # MAC keys: a DMZ's VMs; a forged MAC never reaches the bridge past no-mac-spoofing
PERIOD_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def _caps_groups(dmz: DMZ) -> list[tuple[FlowCaps, list]]:
    """VMs with caps of their own, grouped by equal caps, in config order (one chain per group)."""
    groups: dict[FlowCaps, list] = {}
    for vm in dmz.vms:
        if vm.flow_caps is not None and vm.flow_caps != dmz.flow_caps:
            groups.setdefault(vm.flow_caps, []).append(vm)
    return list(groups.items())


def _rate_set_timeout(dmz: DMZ) -> int:
    """Long enough that an element never expires before its bucket would have refilled: expiry then
    changes nothing (a fresh element starts with a full bucket, as an idle old one would)."""
    every = [dmz.flow_caps] + [caps for caps, _vms in _caps_groups(dmz)]
    refill = max(-(-caps.new_burst * PERIOD_SECONDS[caps.rate[1]] // caps.rate[0]) for caps in every)
    return max(60, refill)


def _caps_rules(dmz: DMZ, chain: str, caps: FlowCaps, whose: str) -> list[Command]:
    sender = {"payload": {"protocol": "ether", "field": "saddr"}}
    number, per = caps.rate
    over_rate = {"limit": {"rate": number, "per": per, "burst": caps.new_burst, "burst_unit": "packets",
                           "inv": True}}
    over_count = {"ct count": {"val": caps.flows, "inv": True}}
    return [
        _rule(dmz, chain, [{"set": {"op": "update", "elem": sender, "set": "@new_flows", "stmt": [over_rate]}},
                           _counter(), _verdict("jump", "flood")], f"new flows over {whose}max_new_flows"),
        _rule(dmz, chain, [{"set": {"op": "add", "elem": sender, "set": "@flows", "stmt": [over_count]}},
                           _counter(), _verdict("jump", "flood")], f"flows over {whose}max_flows"),
    ]


def _flow_caps(dmz: DMZ) -> list[Command]:
    """The sets, the `caps` chain (and one chain per group of VMs with caps of their own) and `flood`."""
    table = table_name(dmz)
    commands: list[Command] = [
        {"add": {"set": {"family": FAMILY, "table": table, "name": "new_flows", "type": "ether_addr",
                         "flags": ["timeout"], "timeout": _rate_set_timeout(dmz),
                         "size": CAPS_SET_SIZE}}},
        {"add": {"set": {"family": FAMILY, "table": table, "name": "flows", "type": "ether_addr",
                         "size": CAPS_SET_SIZE}}},
    ]
    commands += _log_drop_chain(dmz, "flood", "flood")
    commands.append(_chain(dmz, "caps"))
    groups = _caps_groups(dmz)
    mapping = []
    for index, (caps, vms) in enumerate(groups, 1):
        commands.append(_chain(dmz, f"caps_{index}"))
        commands += _caps_rules(dmz, f"caps_{index}", caps, f"{', '.join(vm.name for vm in vms)}'s ")
        mapping += [[vm.mac, _verdict("goto", f"caps_{index}")] for vm in vms]
    if mapping:
        commands.append(_rule(dmz, "caps", [{"vmap": {"key": {"payload": {"protocol": "ether", "field": "saddr"}},
                                                       "data": {"set": mapping}}}],
                              "VMs with caps of their own"))
    commands += _caps_rules(dmz, "caps", dmz.flow_caps, "")
    return commands


def _caps_jump(dmz: DMZ, chain: str) -> Command:
    return _rule(dmz, chain, [_match({"ct": {"key": "state"}}, "new", "in"), _verdict("jump", "caps")],
                 "new flows: per-VM caps")



def render_table(dmz: DMZ, blocks: Optional[tuple[Blocked, ...]] = None) -> list[Command]:
    """Every command that creates the table from nothing, in order.

    blocks: the implicit blocks (implicit.blocks_for with the host's view); None
    renders those known without looking at the host (the private ranges).
    """
    if blocks is None:
        blocks = blocks_for(dmz, HostView())
    name = table_name(dmz)
    bridge = dmz.bridge
    from_bridge = _match(_meta("iifname"), bridge)
    established = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
    commands: list[Command] = [{"add": {"table": {"family": FAMILY, "name": name}}}]
    commands += _set(dmz, "protected4", dmz.protected4, 4)
    commands += _set(dmz, "protected6", dmz.protected6, 6)
    for kind in CLASSES:
        for version in (4, 6):
            commands += _set(dmz, f"{SET_NAMES[kind]}{version}", set_elements(blocks, kind, version), version)
    log_drop_chains = [("spoofed", "spoofed"), ("protected", "to-protected"), ("host", "to-host")]
    log_drop_chains += [(SET_NAMES[kind], LOG_REASONS[kind]) for kind in CLASSES]
    if dmz.isolate_vms:
        log_drop_chains.append(("vm_to_vm", "vm-to-vm"))
    for chain, reason in log_drop_chains:
        commands += _log_drop_chain(dmz, chain, reason)
    commands += edge_commands(dmz, "sets") + _flow_caps(dmz)

    # forward: the DMZ towards everything routed through the host.
    commands += [_chain(dmz, "forward", "forward"), _chain(dmz, "from_dmz")]
    commands.append(_rule(dmz, "forward", [established, _verdict("accept")], "replies to allowed flows"))
    commands.append(_rule(dmz, "forward", [from_bridge, _verdict("jump", "from_dmz")], "from the DMZ"))
    commands += edge_commands(dmz, "forward")
    commands.append(_caps_jump(dmz, "from_dmz"))
    # Next: with br_netfilter the forward hook also sees frames switched between
    # VMs (IPv6 link-local included), which neither spoofing nor egress concerns.
    if dmz.isolate_vms:
        commands.append(_rule(dmz, "from_dmz", [_match(_meta("oifname"), bridge), _verdict("jump", "vm_to_vm")],
                              "VM to VM (isolate_vms)"))
    else:
        commands.append(_rule(dmz, "from_dmz", [_match(_meta("oifname"), bridge), _verdict("accept")],
                              "VM to VM within the DMZ"))
    commands += _source_checks(dmz, "from_dmz", allow_unspecified=False)
    for hole in dmz.holes:
        commands.append(_rule(dmz, "from_dmz", _hole_exprs(dmz, hole) + [_counter(), _verdict("accept")],
                              f"hole {hole.origin}"))
    commands.append(_rule(dmz, "from_dmz", [_match(_payload("ip", "daddr"), "@protected4"),
                                            _verdict("jump", "protected")], "to protected IPv4"))
    commands.append(_rule(dmz, "from_dmz", [_match(_payload("ip6", "daddr"), "@protected6"),
                                            _verdict("jump", "protected")], "to protected IPv6"))
    commands += _implicit_rules(dmz, "from_dmz")
    commands += egress_rules(dmz)

    # input: the DMZ towards the host itself, whatever address it is sent to.
    commands += [_chain(dmz, "input", "input"), _chain(dmz, "to_host")]
    commands.append(_rule(dmz, "input", [established, _verdict("accept")], "replies to allowed flows"))
    # The host's own router advertisements (and MLD) come back to it on the bridge
    # through multicast loopback, sourced from its own link-local address: they are
    # not the DMZ's doing and must neither be logged nor counted as drops. A VM cannot
    # send an RA (its nwfilter drops them), and only ICMPv6 multicast matches.
    commands.append(_rule(dmz, "input", [from_bridge, _match(_meta("pkttype"), "multicast"),
                                         _match(_meta("l4proto"), "ipv6-icmp"),
                                         _match({"fib": {"flags": ["saddr"], "result": "type"}}, "local"),
                                         _verdict("accept")], "the host's own multicast, looped back"))
    commands.append(_rule(dmz, "input", [from_bridge, _verdict("jump", "to_host")], "from the DMZ"))
    commands.append(_caps_jump(dmz, "to_host"))
    commands += _source_checks(dmz, "to_host", allow_unspecified=True)
    for hole in dmz.holes:
        commands.append(_rule(dmz, "to_host", _hole_exprs(dmz, hole) + [_counter(), _verdict("accept")],
                              f"hole {hole.origin}"))
    if dmz.dhcp:
        commands.append(_rule(dmz, "to_host", [
            _match(_payload("ip", "daddr"), {"set": [str(dmz.gateway.ip), "255.255.255.255"]}),
            _match(_meta("l4proto"), "udp"), _match(_payload("udp", "dport"), 67),
            _verdict("accept")], "DHCP to the gateway"))
        commands.append(_rule(dmz, "to_host", [
            _match(_payload("ip", "daddr"), str(dmz.gateway.ip)),
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _match(_payload("th", "dport"), 53),
            _verdict("accept")], "DNS to the gateway"))
        if dmz.gateway6 is not None:
            commands.append(_rule(dmz, "to_host", [
                _match(_payload("ip6", "daddr"),
                       {"set": [str(dmz.gateway6.ip), {"prefix": {"addr": "fe80::", "len": 10}}]}),
                _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _match(_payload("th", "dport"), 53),
                _verdict("accept")], "DNS to the gateway (IPv6)"))
            # DHCPv6 from the client's link-local address to All_DHCP_Relay_Agents_and_Servers.
            commands.append(_rule(dmz, "to_host", [
                _match(_payload("ip6", "saddr"), {"prefix": {"addr": "fe80::", "len": 10}}),
                _match(_payload("ip6", "daddr"), "ff02::1:2"),
                _match(_meta("l4proto"), "udp"), _match(_payload("udp", "dport"), 547),
                _verdict("accept")], "DHCPv6 to the gateway"))
    if dmz.gateway6 is not None:
        commands.append(_rule(dmz, "to_host", [
            _match(_meta("l4proto"), "ipv6-icmp"),
            _match(_payload("icmpv6", "type"),
                   {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]}),
            # Genuine neighbour discovery never crosses a router.
            _match(_payload("ip6", "hoplimit"), 255),
            _verdict("accept")], "IPv6 neighbour discovery"))
    commands.append(_rule(dmz, "to_host", [_verdict("jump", "host")], "everything else to the host"))
    return commands + edge_commands(dmz, "nat")


def apply_batch(dmz: DMZ, blocks: Optional[tuple[Blocked, ...]] = None) -> dict:
    """One transaction that replaces the table and its backstop (render/nft_backstop.py) whole:
    add (so delete never fails), delete, recreate."""
    name = table_name(dmz)
    table = {"table": {"family": FAMILY, "name": name}}
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, {"add": table}, {"delete": table}]
            + render_table(dmz, blocks) + backstop_commands(dmz)}


def delete_batch(table: str) -> dict:
    """Remove the table and its backstop in one transaction."""
    spec = {"table": {"family": FAMILY, "name": table}}
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, {"add": spec}, {"delete": spec}]
            + delete_backstop_commands(table)}
