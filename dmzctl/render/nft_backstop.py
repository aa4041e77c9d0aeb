"""The backstop: a second nftables table per DMZ, the independent block of the protected subnets
and of the host itself.

    table inet dmzctl-<dmz>.backstop      (a DMZ name has no dot: it never names a main table)
      backstop_forward (hook forward, priority -5) -> backstop_from_dmz for new flows from the bridge:
          holes not blocked, the protected subnets dropped
      backstop_input (hook input, priority -5)     -> backstop_to_host for new flows from the bridge:
          holes, DHCP/DNS/DHCPv6 to the gateway not blocked, everything else dropped

It holds when the main table (render/nft.py) is deleted, flushed or wrong: a separate table, in
its own base chains, rendered from the config by this short module and nothing else. Both go in
one transaction, so they never disagree for a moment. It runs after the main table (-10), which
logs first; its counters (metrics' reasons backstop-protected and backstop-host) count only what
the main table let through: normally nothing.

Why not the per-VM nwfilter (before this design): libvirt re-creates each VM's iptables-layer
chains one command at a time, on every libvirtd restart and on every change of a filter. With
the host's addresses in each VM's filter, one more DMZ (a new gateway address) re-instantiated
every other VM's filters: about 4 s per VM (docs/benchmarks-scale.md). This table is one
transaction whatever the number of VMs, and needs no host address: in the input hook every
destination is the host's.

Neighbour discovery and MLD are untracked by conntrack, never "new": they pass, as they must.
"""

from __future__ import annotations

from typing import Any

from ..config import DMZ
from .nftexpr import (FAMILY, _anon_set, _counter, _hole_exprs, _ipfamily, _match, _meta, _payload, _verdict,
                      table_name)

Command = dict[str, Any]

BACKSTOP_PRIORITY = -5  # after the main table (-10), before the iptables-nft tables (0)
SUFFIX = ".backstop"
NEW_FLOWS = ["new", "invalid"]


def backstop_name(dmz_or_table) -> str:
    """The backstop of a DMZ, or of a main table given by name."""
    table = dmz_or_table if isinstance(dmz_or_table, str) else table_name(dmz_or_table)
    return table + SUFFIX


def main_table_of(backstop: str) -> str:
    return backstop[: -len(SUFFIX)] if backstop.endswith(SUFFIX) else backstop


def _chain(table: str, name: str, hook: str = "") -> Command:
    chain: dict[str, Any] = {"family": FAMILY, "table": table, "name": name}
    if hook:
        chain.update({"type": "filter", "hook": hook, "prio": BACKSTOP_PRIORITY, "policy": "accept"})
    return {"add": {"chain": chain}}


def _rule(table: str, chain: str, exprs: list, comment: str) -> Command:
    return {"add": {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": exprs,
                             "comment": comment}}}


def render_backstop(dmz: DMZ) -> list[Command]:
    """Every command that creates the backstop table from nothing, in order."""
    table = backstop_name(dmz)
    from_bridge = _match(_meta("iifname"), dmz.bridge)
    new_flow = _match({"ct": {"key": "state"}}, NEW_FLOWS, "in")
    commands: list[Command] = [{"add": {"table": {"family": FAMILY, "name": table}}}]

    commands += [_chain(table, "backstop_forward", "forward"), _chain(table, "backstop_from_dmz")]
    commands.append(_rule(table, "backstop_forward", [from_bridge, new_flow, _verdict("jump", "backstop_from_dmz")],
                          "a new flow from the DMZ"))
    for hole in dmz.holes:
        commands.append(_rule(table, "backstop_from_dmz", _hole_exprs(dmz, hole) + [_verdict("return")],
                              f"hole {hole.origin}"))
    for version, nets in ((4, dmz.protected4), (6, dmz.protected6)):
        if nets:
            commands.append(_rule(table, "backstop_from_dmz", [
                _match(_payload(_ipfamily(version), "daddr"), _anon_set(nets)), _counter(), _verdict("drop")],
                "drop backstop-protected"))

    commands += [_chain(table, "backstop_input", "input"), _chain(table, "backstop_to_host")]
    commands.append(_rule(table, "backstop_input", [from_bridge, new_flow, _verdict("jump", "backstop_to_host")],
                          "a new flow from the DMZ"))
    for hole in dmz.holes:
        commands.append(_rule(table, "backstop_to_host", _hole_exprs(dmz, hole) + [_verdict("return")],
                              f"hole {hole.origin}"))
    if dmz.dhcp:
        commands.append(_rule(table, "backstop_to_host", [
            _match(_payload("ip", "daddr"), {"set": [str(dmz.gateway.ip), "255.255.255.255"]}),
            _match(_meta("l4proto"), "udp"), _match(_payload("udp", "dport"), 67),
            _verdict("return")], "DHCP to the gateway"))
        commands.append(_rule(table, "backstop_to_host", [
            _match(_payload("ip", "daddr"), str(dmz.gateway.ip)),
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _match(_payload("th", "dport"), 53),
            _verdict("return")], "DNS to the gateway"))
        if dmz.gateway6 is not None:
            commands.append(_rule(table, "backstop_to_host", [
                _match(_payload("ip6", "daddr"),
                       {"set": [str(dmz.gateway6.ip), {"prefix": {"addr": "fe80::", "len": 10}}]}),
                _match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _match(_payload("th", "dport"), 53),
                _verdict("return")], "DNS to the gateway (IPv6)"))
            commands.append(_rule(table, "backstop_to_host", [
                _match(_payload("ip6", "saddr"), {"prefix": {"addr": "fe80::", "len": 10}}),
                _match(_payload("ip6", "daddr"), "ff02::1:2"),
                _match(_meta("l4proto"), "udp"), _match(_payload("udp", "dport"), 547),
                _verdict("return")], "DHCPv6 to the gateway"))
    # Every other new flow to the host, whatever its address.
    commands.append(_rule(table, "backstop_to_host", [_counter(), _verdict("drop")], "drop backstop-host"))
    return commands


def backstop_commands(dmz: DMZ) -> list[Command]:
    """Replace the backstop whole, inside the main table's transaction: add (so delete never fails),
    delete, recreate."""
    table = {"table": {"family": FAMILY, "name": backstop_name(dmz)}}
    return [{"add": table}, {"delete": table}] + render_backstop(dmz)


def delete_backstop_commands(main_table: str) -> list[Command]:
    table = {"table": {"family": FAMILY, "name": backstop_name(main_table)}}
    return [{"add": table}, {"delete": table}]
