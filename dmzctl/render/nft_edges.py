"""The DMZ's edges in its nft table: publish (DNAT and the inbound policy) and the egress allowlist.

  forward (hook)  3 into the DMZ bridge from elsewhere -> to_dmz (inbound = "published")
  to_dmz          1 from a protected subnet: accepted (lan_inbound)
                  2 to a published VM address . protocol . port: accepted (one set lookup per
                    family; entries with `from` are rules of their own)
                  3 everything else -> inbound (rate limit, log, drop)
  from_dmz        after the protected and implicit blocks, with egress = "allowlist":
                  9 DNS (53) to anywhere but the gateway -> dns (only when names are listed;
                    holes, before, still open a resolver)
                 10 source . destination . protocol . port in @egress4/@egress6: accepted
                 11 per group of names (same protocol, ports and `from`): the destination in
                    the sets the gateway's dnsmasq fills from its answers (nftset=): accepted
                 12 everything else -> egress (rate limit, log, drop)
  dstnat (nat, prerouting)  publish entries with `listen`: DNAT (IPv4) to the VM; "host" is
                    `fib daddr type local` outside the DMZ subnet: every address the host has
                    now or gets later, without re-rendering the table
  srcnat (nat, postrouting) a DMZ VM reaching a published service of its own DMZ through the
                    public address (hairpin): masqueraded, so that the reply comes back the same way

Publish in IPv6 opens the VM's own address (no NAT). The sets dnsmasq fills (names<N>_<4|6>)
have no timeout: dnsmasq 2.90 adds answers without one, so they do not expire with the TTL; their
elements are state (check, plan and the guard ignore them) and live as long as the table:
replacing it (up after a change, firewall up, the guard) empties them, and the next lookup
refills them (the gateway's dnsmasq runs without a cache for that: render/network.py).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional

from ..config import DMZ, EgressAllow, Publish
from .nftexpr import (FAMILY, _addr, _anon_set, _chain, _log_drop_chain, _match, _meta, _payload,
                      _rule, _verdict, table_name)

Command = dict[str, Any]
NAT_PRIORITY = {"prerouting": -100, "postrouting": 100}
ANY_PORT = (0, 65535)
NAME_SET_RE = re.compile(r"^names[0-9]+_[46]\Z")


def _l4(proto: str, ports: Optional[tuple[int, int]]) -> list:
    exprs = [_match(_meta("l4proto"), proto)]
    if ports is not None:
        exprs.append(_match(_payload("th", "dport"), ports[0] if ports[0] == ports[1] else {"range": list(ports)}))
    return exprs


def _service(ports: Optional[tuple[int, int]]) -> Any:
    ports = ports or ANY_PORT
    return ports[0] if ports[0] == ports[1] else {"range": list(ports)}


def _port_set(ports: tuple) -> Any:
    items = [_service(p) for p in ports]
    return items[0] if len(items) == 1 else {"set": items}


def _concat_set(dmz: DMZ, name: str, types: list[str], elements: list) -> list[Command]:
    if not elements:
        return []
    spec = {"family": FAMILY, "table": table_name(dmz), "name": name, "type": types, "flags": ["interval"]}
    return [{"add": {"set": spec}},
            {"add": {"element": {"family": FAMILY, "table": table_name(dmz), "name": name,
                                 "elem": [{"concat": e} for e in elements]}}}]


# --- inbound -------------------------------------------------------------------

def _vm_address(dmz: DMZ, entry: Publish, version: int):
    vm = dmz.vm(entry.to)
    return vm.ip if version == 4 else vm.ip6


def merged_ports(ranges) -> list[tuple[int, int]]:
    """Port ranges merged where they overlap or touch: an interval set refuses two elements that
    overlap in their last field with the others equal ("File exists")."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def published_elements(dmz: DMZ, version: int) -> list:
    """VM address . protocol . port of every publish entry open to anywhere."""
    ports: dict[tuple, list] = {}
    for entry in dmz.publish:
        address = _vm_address(dmz, entry, version)
        if not entry.sources and address is not None:
            ports.setdefault((str(address), entry.proto), []).append(entry.ports)
    return [[address, proto, _service(span)] for (address, proto), spans in ports.items()
            for span in merged_ports(spans)]


def inbound_sets(dmz: DMZ) -> list[Command]:
    if dmz.inbound != "published":
        return []
    return (_concat_set(dmz, "published4", ["ipv4_addr", "inet_proto", "inet_service"], published_elements(dmz, 4))
            + _concat_set(dmz, "published6", ["ipv6_addr", "inet_proto", "inet_service"],
                          published_elements(dmz, 6)))


def _sourced_publish_rules(dmz: DMZ) -> list[Command]:
    rules = []
    for entry in (p for p in dmz.publish if p.sources):
        for version in (4, 6):
            address = _vm_address(dmz, entry, version)
            sources = [n for n in entry.sources if n.version == version]
            if address is None or not sources:
                continue
            ipf = "ip" if version == 4 else "ip6"
            rules.append(_rule(dmz, "to_dmz", [_match(_payload(ipf, "saddr"), _anon_set(sources)),
                                               _match(_payload(ipf, "daddr"), str(address))]
                               + _l4(entry.proto, entry.ports) + [_verdict("accept")], f"{entry.origin}"))
    return rules


def inbound_chains(dmz: DMZ) -> list[Command]:
    """to_dmz and its drop chain, and the forward rule that sends flows into the DMZ there."""
    if dmz.inbound != "published":
        return []
    commands = _log_drop_chain(dmz, "inbound", "inbound") + [_chain(dmz, "to_dmz")]
    commands.append(_rule(dmz, "forward", [_match(_meta("iifname"), dmz.bridge, "!="),
                                           _match(_meta("oifname"), dmz.bridge), _verdict("jump", "to_dmz")],
                          "into the DMZ (inbound published)"))
    if dmz.lan_inbound:
        for version in (4, 6):
            ipf = "ip" if version == 4 else "ip6"
            commands.append(_rule(dmz, "to_dmz", [_match(_payload(ipf, "saddr"), f"@protected{version}"),
                                                  _verdict("accept")], f"from protected IPv{version} (lan_inbound)"))
    for version, ipf in ((4, "ip"), (6, "ip6")):
        if published_elements(dmz, version):
            key = {"concat": [_payload(ipf, "daddr"), _meta("l4proto"), _payload("th", "dport")]}
            commands.append(_rule(dmz, "to_dmz", [_match(key, f"@published{version}"), _verdict("accept")],
                                  f"published IPv{version}"))
    commands += _sourced_publish_rules(dmz)
    commands.append(_rule(dmz, "to_dmz", [_verdict("jump", "inbound")], "not published"))
    return commands


def _nat_chain(dmz: DMZ, name: str, hook: str) -> Command:
    return {"add": {"chain": {"family": FAMILY, "table": table_name(dmz), "name": name, "type": "nat",
                              "hook": hook, "prio": NAT_PRIORITY[hook], "policy": "accept"}}}


def _dnat_rule(dmz: DMZ, entry: Publish) -> Command:
    vm = dmz.vm(entry.to)
    if entry.listen == "host":
        where = [_match({"fib": {"flags": ["daddr"], "result": "type"}}, "local"),
                 _match(_payload("ip", "daddr"), _addr(dmz.subnet), "!=")]
    else:
        where = [_match(_payload("ip", "daddr"), str(entry.listen))]
    if entry.sources:
        v4 = [n for n in entry.sources if n.version == 4]
        where.append(_match(_payload("ip", "saddr"), _anon_set(v4 or [ipaddress.ip_network("0.0.0.0/32")])))
    target: dict = {"family": "ip", "addr": str(vm.ip)}
    if entry.listen_ports != entry.ports:
        target["port"] = entry.ports[0]
    return _rule(dmz, "dstnat", where + _l4(entry.proto, entry.listen_ports) + [{"dnat": target}],
                 f"{entry.origin} from {entry.listen}")


def nat_chains(dmz: DMZ) -> list[Command]:
    forwarded = [p for p in dmz.publish if p.listen is not None]
    commands = []
    if forwarded:
        commands += [_nat_chain(dmz, "dstnat", "prerouting"), _nat_chain(dmz, "srcnat", "postrouting")]
        commands += [_dnat_rule(dmz, entry) for entry in forwarded]
        commands.append(_rule(dmz, "srcnat", [_match(_payload("ip", "saddr"), _addr(dmz.subnet)),
                                              _match(_payload("ip", "daddr"), _addr(dmz.subnet)),
                                              _match({"ct": {"key": "status"}}, "dnat", "in"), {"masquerade": None}],
                              "hairpin: a DMZ VM to a published address of its own DMZ"))
    if dmz.masquerade and dmz.subnet is not None:
        if not forwarded:
            commands.append(_nat_chain(dmz, "srcnat", "postrouting"))
        commands.append(_masquerade_rule(dmz))
    return commands


def _masquerade_rule(dmz: DMZ) -> Command:
    """masquerade = true: what leaves the DMZ for beyond the host takes the host's outgoing address (a host
    with one public IPv4); the protected subnets (holes) keep seeing the VM's own address. IPv6 is routed."""
    where = [_match(_payload("ip", "saddr"), _addr(dmz.subnet)),
             _match(_payload("ip", "daddr"), _addr(dmz.subnet), "!=")]
    protected = [net for net in dmz.protected if net.version == 4]
    if protected:
        where.append(_match(_payload("ip", "daddr"), _anon_set(protected), "!="))
    return _rule(dmz, "srcnat", where + [{"masquerade": None}], "masquerade: the DMZ to beyond the host")


# --- egress allowlist ----------------------------------------------------------

def _egress_source(dmz: DMZ, entry: EgressAllow, version: int):
    """The entry's source prefix: its VM's address, else the DMZ's subnet; None when it has none."""
    if entry.source_vm is None:
        return dmz.subnet if version == 4 else dmz.subnet6
    vm = dmz.vm(entry.source_vm)
    address = vm.ip if version == 4 else vm.ip6
    return ipaddress.ip_network(address) if address is not None else None


def egress_elements(dmz: DMZ, version: int) -> list:
    """source . destination . protocol . port of every allowlisted prefix or address, merged until no
    two elements overlap in one field with the others equal (the set would refuse them)."""
    found = set()
    for entry in dmz.egress_allow:
        if entry.to_net is not None and entry.to_net.version == version:
            source = _egress_source(dmz, entry, version)
            if source is not None:
                found.add((source, entry.to_net, entry.proto, entry.ports or ANY_PORT))
    for _round in range(6):
        merged = _merge_field(_merge_field(_merge_field(found, 3), 1), 0)
        if merged == found:
            break
        found = merged
    found = _without_covered(found)
    return [[_addr(s), _addr(n), p, _service(span)] for s, n, p, span in sorted(found)]


def _without_covered(elements: set) -> set:
    """Without the elements that lie inside another in every field: the set refuses them. Looked up by
    each destination's supernets (at most 129), not by pairs: linear in the number of elements."""
    def key(proto, net, length):
        bits = net.max_prefixlen
        mask = ((1 << length) - 1) << (bits - length)
        return proto, int(net.network_address) & mask, length

    by_destination: dict[tuple, list] = {}
    for element in elements:
        by_destination.setdefault(key(element[2], element[1], element[1].prefixlen), []).append(element)
    kept = set()
    for element in elements:
        source, net, proto, (low, high) = element
        if not any(other != element and source.subnet_of(other[0]) and other[3][0] <= low and high <= other[3][1]
                   for length in range(net.prefixlen, -1, -1)
                   for other in by_destination.get(key(proto, net, length), ())):
            kept.add(element)
    return kept


def _merge_field(elements: set, field: int) -> set:
    """Merge the elements that are equal but in one field: port ranges joined, prefixes collapsed."""
    groups: dict[tuple, list] = {}
    for element in elements:
        groups.setdefault(element[:field] + element[field + 1:], []).append(element[field])
    merged = set()
    for rest, values in groups.items():
        joined = merged_ports(values) if field == 3 else ipaddress.collapse_addresses(values)
        merged |= {rest[:field] + (value,) + rest[field:] for value in joined}
    return merged


def name_groups(dmz: DMZ) -> list[tuple[tuple, list[str]]]:
    """The allowlisted names grouped by (protocol, ports, from), in config order: one pair of sets each.
    One [[dmz.egress_allow]] table is one name with its ports (a list: several entries of one origin)."""
    tables: dict[str, list] = {}
    for entry in dmz.egress_allow:
        if entry.to_name is not None:
            tables.setdefault(entry.origin, []).append(entry)
    groups: dict[tuple, list[str]] = {}
    for entries in tables.values():
        first = entries[0]
        ports = None if any(e.ports is None for e in entries) else tuple(e.ports for e in entries)
        names = groups.setdefault((first.proto, ports, first.source_vm), [])
        if first.to_name not in names:
            names.append(first.to_name)
    return list(groups.items())


def is_name_set(name: str) -> bool:
    """Whether a set of the table is one dnsmasq fills (its elements are state, not config)."""
    return NAME_SET_RE.match(name) is not None


def name_set(index: int, version: int) -> str:
    return f"names{index}_{version}"


def egress_sets(dmz: DMZ) -> list[Command]:
    if dmz.egress != "allowlist":
        return []
    commands = _concat_set(dmz, "egress4", ["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"],
                           egress_elements(dmz, 4))
    commands += _concat_set(dmz, "egress6", ["ipv6_addr", "ipv6_addr", "inet_proto", "inet_service"],
                            egress_elements(dmz, 6))
    for index, _group in enumerate(name_groups(dmz), 1):
        for version in (4, 6):
            commands.append({"add": {"set": {"family": FAMILY, "table": table_name(dmz),
                                              "name": name_set(index, version),
                                              "type": "ipv4_addr" if version == 4 else "ipv6_addr"}}})
    return commands


def _name_rules(dmz: DMZ) -> list[Command]:
    rules = []
    for index, ((proto, ports, source_vm), names) in enumerate(name_groups(dmz), 1):
        for version, ipf in ((4, "ip"), (6, "ip6")):
            exprs = []
            if source_vm is not None:
                vm = dmz.vm(source_vm)
                address = vm.ip if version == 4 else vm.ip6
                if address is None:
                    continue
                exprs.append(_match(_payload(ipf, "saddr"), str(address)))
            elif version == 6 and dmz.subnet6 is None:
                continue
            exprs += [_match(_payload(ipf, "daddr"), f"@{name_set(index, version)}"), _match(_meta("l4proto"), proto)]
            if ports is not None:
                exprs.append(_match(_payload("th", "dport"), _port_set(ports)))
            rules.append(_rule(dmz, "from_dmz", exprs + [_verdict("accept")],
                               f"egress to {', '.join(names)} (IPv{version}, learned by the gateway's DNS)"))
    return rules


def egress_rules(dmz: DMZ) -> list[Command]:
    """The end of from_dmz: nothing (egress any), a drop (none), or the allowlist then a drop."""
    if dmz.egress == "any":
        return []
    if dmz.egress == "none":
        return [_rule(dmz, "from_dmz", [_verdict("jump", "egress")], "egress none")]
    rules = []
    if dmz.egress_names:
        rules.append(_rule(dmz, "from_dmz", [_match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
                                             _match(_payload("th", "dport"), 53), _verdict("jump", "dns")],
                           "DNS to anywhere but the gateway (names are allowlisted)"))
    for version, ipf in ((4, "ip"), (6, "ip6")):
        if any(e.to_net is not None and e.to_net.version == version and _egress_source(dmz, e, version)
               for e in dmz.egress_allow):
            key = {"concat": [_payload(ipf, "saddr"), _payload(ipf, "daddr"), _meta("l4proto"),
                              _payload("th", "dport")]}
            rules.append(_rule(dmz, "from_dmz", [_match(key, f"@egress{version}"), _verdict("accept")],
                               f"egress allowlist IPv{version}"))
    rules += _name_rules(dmz)
    rules.append(_rule(dmz, "from_dmz", [_verdict("jump", "egress")], "egress allowlist: anything else"))
    return rules


def egress_drop_chains(dmz: DMZ) -> list[Command]:
    commands = _log_drop_chain(dmz, "egress", "egress") if dmz.egress != "any" else []
    if dmz.egress == "allowlist" and dmz.egress_names:
        commands += _log_drop_chain(dmz, "dns", "dns-elsewhere")
    return commands


def edge_commands(dmz: DMZ, part: str) -> list[Command]:
    """The edges' share of render_table, by the place it goes: sets, chains, forward."""
    if part == "sets":
        return inbound_sets(dmz) + egress_sets(dmz) + egress_drop_chains(dmz)
    if part == "forward":
        return inbound_chains(dmz)
    if part == "nat":
        return nat_chains(dmz)
    raise ValueError(part)

