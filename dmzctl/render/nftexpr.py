"""nftables JSON fragments (firewalld's _fragment style) shared by the DMZ's table renderers:
render/nft.py (the table and its from-DMZ chains) and render/nft_edges.py (publish, inbound,
the egress allowlist)."""

from __future__ import annotations

from typing import Any, Optional

from ..config import DMZ

FAMILY = "inet"
HOOK_PRIORITY = -10  # before the iptables-nft tables libvirt fills (priority 0): we log first

Expr = dict[str, Any]
Command = dict[str, Any]


def table_name(dmz: DMZ) -> str:
    return f"dmzctl-{dmz.name}"


def log_prefix(dmz: DMZ, reason: str) -> str:
    return f"dmzctl {dmz.name} {reason}: "


def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def _addr(net) -> Any:
    """A host address as a plain string, a prefix as a prefix expression."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _anon_set(nets) -> Any:
    items = [_addr(n) for n in nets]
    return items[0] if len(items) == 1 else {"set": items}


def _ports(ports: tuple[int, int]) -> Any:
    return ports[0] if ports[0] == ports[1] else {"range": [ports[0], ports[1]]}


def _ipfamily(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _verdict(name: str, target: Optional[str] = None) -> Expr:
    if target is not None:
        return {name: {"target": target}}
    return {name: None}


def _counter() -> Expr:
    return {"counter": None}


def _rule(dmz: DMZ, chain: str, exprs: list[Expr], comment: str) -> Command:
    return {"add": {"rule": {"family": FAMILY, "table": table_name(dmz), "chain": chain,
                             "expr": exprs, "comment": comment}}}


def _rate(dmz: DMZ) -> Expr:
    number, per = dmz.log_rate.split("/")
    return {"limit": {"rate": int(number), "per": per, "burst": dmz.log_burst, "burst_unit": "packets"}}


def _log_drop_chain(dmz: DMZ, chain: str, reason: str) -> list[Command]:
    # The limit comes before the log: a limit after it limits nothing (openwrt packages#29255).
    return [
        _chain(dmz, chain),
        _rule(dmz, chain, [_rate(dmz), {"log": {"prefix": log_prefix(dmz, reason), "level": "warn"}}],
              f"log {reason}, rate-limited"),
        _rule(dmz, chain, [_counter(), _verdict("drop")], f"drop {reason}"),
    ]


def _chain(dmz: DMZ, name: str, hook: Optional[str] = None) -> Command:
    chain: dict[str, Any] = {"family": FAMILY, "table": table_name(dmz), "name": name}
    if hook is not None:
        chain.update({"type": "filter", "hook": hook, "prio": HOOK_PRIORITY, "policy": "accept"})
    return {"add": {"chain": chain}}


def _set(dmz: DMZ, name: str, nets, version: int) -> list[Command]:
    spec = {"family": FAMILY, "table": table_name(dmz), "name": name,
            "type": "ipv4_addr" if version == 4 else "ipv6_addr", "flags": ["interval"]}
    commands: list[Command] = [{"add": {"set": spec}}]
    if nets:
        commands.append({"add": {"element": {"family": FAMILY, "table": table_name(dmz), "name": name,
                                             "elem": [_addr(n) for n in nets]}}})
    return commands


def _hole_exprs(dmz: DMZ, hole) -> list[Expr]:
    """A hole's match: its source (VM or prefix), destination, protocol and ports; no table named."""
    ipf = _ipfamily(hole.family)
    exprs: list[Expr] = []
    if hole.source_vm is not None:
        vm = dmz.vm(hole.source_vm)
        exprs.append(_match(_payload(ipf, "saddr"), str(vm.ip if hole.family == 4 else vm.ip6)))
    elif hole.source_net is not None:
        exprs.append(_match(_payload(ipf, "saddr"), _addr(hole.source_net)))
    exprs.append(_match(_payload(ipf, "daddr"), _addr(hole.to)))
    exprs.append(_match(_meta("l4proto"), hole.proto))
    if hole.ports is not None:
        exprs.append(_match(_payload("th", "dport"), _ports(hole.ports)))
    return exprs
