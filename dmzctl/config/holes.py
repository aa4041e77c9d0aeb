"""The holes: flows allowed from the DMZ into a protected subnet ([[dmz.allow]], and dmz.dns)."""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from .checker import Checker, DmzScope
from .model import VM, Hole, IPAddress, IPNetwork

ALLOW_KEYS = {"to", "proto", "port", "from"}
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "sctp")
ICMP = ("icmp", "icmpv6")


def parse_holes(check: Checker, table: dict, dns: Optional[IPAddress], scope: DmzScope, vms: list[VM],
                declared: set[str]) -> list[Hole]:
    """DNS to dmz.dns, then each valid [[dmz.allow]]. `declared`: the names of every [[vm]], valid or not."""
    holes: list[Hole] = []
    if dns is not None:
        for proto in ("udp", "tcp"):
            holes.append(Hole(to=ipaddress.ip_network(dns), proto=proto, ports=(53, 53), origin="dns"))
    raw_allow = check.typed(table, "allow", list, "dmz", default=[], kind_name="a list of [[dmz.allow]] tables")
    for index, entry in enumerate(raw_allow or []):
        hole = _parse_hole(check, entry, f"dmz.allow[{index + 1}]", scope, vms, declared)
        if hole is not None:
            holes.append(hole)
    return holes


def _parse_hole(check: Checker, entry: Any, where: str, scope: DmzScope, vms: list[VM],
                declared: set[str]) -> Optional[Hole]:
    if not isinstance(entry, dict):
        check.problem(where, "must be a table [[dmz.allow]]")
        return None
    check.unknown_keys(entry, ALLOW_KEYS, where)
    target, proto = _target(check, entry, where, scope)
    ports = None
    if "port" in entry:
        if proto in ICMP:
            check.problem(f"{where}.port", f"{proto} has no ports; remove 'port'")
            proto = None
        else:
            ports = check.ports(entry["port"], f"{where}.port")
            if ports is None:
                proto = None
    source = _source(check, entry, where, target, scope, vms, declared)
    if source is None or target is None or proto is None:
        return None
    return Hole(to=target, proto=proto, ports=ports, origin=where.removeprefix("dmz."), **source)


def _target(check: Checker, entry: dict, where: str, scope: DmzScope) -> tuple[Optional[IPNetwork], Optional[str]]:
    """`to` and `proto`: a protected address or prefix outside the DMZ, and a protocol it can take."""
    to = check.typed(entry, "to", str, where, required=True)
    proto = check.choice(entry, "proto", PROTOCOLS, where, default=None) if "proto" in entry else None
    if "proto" not in entry:
        check.problem(f"{where}.proto", f"required but missing; one of {', '.join(PROTOCOLS)}")
    target = None
    if to is not None:
        try:
            target = ipaddress.ip_network(to, strict=True)
        except ValueError:
            check.problem(f"{where}.to", f"{to!r} is not a valid address or prefix")
    own = scope.subnet(target.version) if target is not None else None
    if target is not None and own is not None and target.overlaps(own):
        check.problem(f"{where}.to", f"{target} is inside the DMZ itself; traffic between its VMs follows "
                                     f"dmz.isolate_vms, not holes")
        target = None
    if target is not None and target.version == 6 and scope.gateway6 is None:
        check.problem(f"{where}.to", f"{target} is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)")
        target = None
    if target is not None and proto in ICMP:
        wanted = "icmp" if target.version == 4 else "icmpv6"
        if proto != wanted:
            check.problem(f"{where}.proto", f"{proto} does not go to an IPv{target.version} address; use {wanted}")
            proto = None
    return target, proto


def _source(check: Checker, entry: dict, where: str, target: Optional[IPNetwork], scope: DmzScope,
            vms: list[VM], declared: set[str]) -> Optional[dict]:
    """`from`: {} when absent, {"source_vm": name} or {"source_net": prefix}; None when it is wrong."""
    if "from" not in entry:
        return {}
    source = entry["from"]
    if not isinstance(source, str):
        check.problem(f"{where}.from", f"must be a VM name or a DMZ address; got {source!r}")
        return None
    by_name = {vm.name: vm for vm in vms}
    if source in by_name:
        return {"source_vm": source} if _has_address_for(check, by_name[source], target, where) else None
    if source in declared:
        return None  # a VM of this DMZ whose own problems are already reported
    source_net = _source_net(check, source, target, scope, where)
    return {"source_net": source_net} if source_net is not None else None


def _has_address_for(check: Checker, vm: VM, target: Optional[IPNetwork], where: str) -> bool:
    """A hole from a VM matches on its static address of the target's IP version."""
    if target is None or (vm.ip if target.version == 4 else vm.ip6) is not None:
        return True
    check.problem(f"{where}.from", f"VM {vm.name!r} has no static IPv{target.version} address "
                                   f"(vm.{'ip' if target.version == 4 else 'ip6'}); a hole from a VM "
                                   f"needs one to match on")
    return False


def _source_net(check: Checker, source: str, target: Optional[IPNetwork], scope: DmzScope,
                where: str) -> Optional[IPNetwork]:
    """An address or prefix inside the DMZ, of the target's IP version."""
    try:
        source_net = ipaddress.ip_network(source, strict=True)
    except ValueError:
        check.problem(f"{where}.from", f"{source!r} is neither a VM of this DMZ nor an address")
        return None
    dmz_net = scope.subnet(source_net.version)
    if dmz_net is None or not source_net.subnet_of(dmz_net):
        check.problem(f"{where}.from", f"{source_net} is not inside the DMZ subnet")
        return None
    if target is not None and source_net.version != target.version:
        check.problem(f"{where}.from", f"{source_net} and {target} are of different IP versions")
        return None
    return source_net
