"""The DMZ's edges: what the outside may reach ([[dmz.publish]], inbound, lan_inbound) and, with
egress = "allowlist", what the DMZ may reach beyond the host ([[dmz.egress_allow]])."""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

from .checker import Checker, DmzScope
from .model import VM, EgressAllow, IPNetwork, Publish

PUBLISH_KEYS = {"to", "proto", "port", "listen", "listen_port", "from"}
EGRESS_ALLOW_KEYS = {"to", "proto", "port", "from"}
EDGE_PROTOCOLS = ("tcp", "udp")
INBOUND = ("published", "any")
# A DNS name as dnsmasq's nftset= takes it: labels of letters, digits and '-', at least one dot.
NAME_RE = re.compile(r"^(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def parse_edges(check: Checker, table: dict, scope: DmzScope, vms: list[VM], declared: set[str],
                mode: Optional[str], egress: Optional[str]) -> dict:
    """publish, inbound, lan_inbound, egress_allow and dns_forwarders of the [dmz] table."""
    publish = _parse_list(check, table, "publish", lambda e, w: _publish(check, e, w, vms, declared))
    if publish and mode in ("nat", "isolated"):
        check.problem("dmz.publish", f"mode {mode!r} lets no new flow into the DMZ (libvirt rejects it after "
                                     f"dmzctl's table), so nothing can be published; use mode 'route'")
    default_inbound = "published" if publish or "publish" in table else "any"
    inbound = check.choice(table, "inbound", INBOUND, "dmz", default_inbound)
    lan_inbound = check.typed(table, "lan_inbound", bool, "dmz", default=True)
    allow = _parse_list(check, table, "egress_allow", lambda e, w: _egress(check, e, w, scope, vms, declared))
    entries = [item for group in allow for item in group]
    if "egress_allow" in table and egress is not None and egress != "allowlist":
        check.problem("dmz.egress_allow", f"is used only with egress = \"allowlist\" (egress is {egress!r})")
    if any(e.to_name for e in entries) and scope.dhcp is False:
        check.problem("dmz.egress_allow", "DNS names need the gateway's dnsmasq, which answers only with "
                                          "dhcp = true")
    forwarders = []
    for index, value in enumerate(check.typed(table, "dns_forwarders", list, "dmz", default=[]) or []):
        address = check.address(value, f"dmz.dns_forwarders[{index + 1}]")
        if address is not None:
            forwarders.append(address)
    masquerade = check.typed(table, "masquerade", bool, "dmz", default=False)
    if masquerade and mode in ("nat", "isolated"):
        check.problem("dmz.masquerade", f"is for mode 'route' (mode {mode!r} "
                                        f"{'masquerades already' if mode == 'nat' else 'reaches nothing beyond the host'})")
    return {"publish": tuple(publish), "inbound": inbound, "lan_inbound": lan_inbound,
            "egress_allow": tuple(entries), "dns_forwarders": tuple(forwarders), "masquerade": bool(masquerade)}


def _parse_list(check: Checker, table: dict, key: str, parse) -> list:
    raw = check.typed(table, key, list, "dmz", default=[], kind_name=f"a list of [[dmz.{key}]] tables")
    found = []
    for index, entry in enumerate(raw or []):
        where = f"dmz.{key}[{index + 1}]"
        if not isinstance(entry, dict):
            check.problem(where, f"must be a table [[dmz.{key}]]")
            continue
        parsed = parse(entry, where)
        if parsed is not None:
            found.append(parsed)
    return found


def _proto_ports(check: Checker, entry: dict, where: str, required_port: bool):
    proto = check.choice(entry, "proto", EDGE_PROTOCOLS, where, default=None)
    if "proto" not in entry:
        check.problem(f"{where}.proto", "required but missing; tcp or udp")
    if "port" not in entry:
        if required_port:
            check.problem(f"{where}.port", "required but missing; a port or a range 'a-b'")
            return proto, None, False
        return proto, [None], True
    value = entry["port"]
    values = value if isinstance(value, list) and not required_port else [value]
    if isinstance(value, list) and not value:
        check.problem(f"{where}.port", "is an empty list")
        return proto, None, False
    ports = [check.ports(v, f"{where}.port") for v in values]
    return proto, ports, all(p is not None for p in ports)


def _publish(check: Checker, entry: dict, where: str, vms: list[VM], declared: set[str]) -> Optional[Publish]:
    check.unknown_keys(entry, PUBLISH_KEYS, where)
    vm = _vm(check, entry, "to", where, vms, declared, required=True)
    proto, ports, ok = _proto_ports(check, entry, where, required_port=True)
    listen = _listen(check, entry, where)
    listen_port = check.typed(entry, "listen_port", int, where)
    if listen_port is not None and check.within(listen_port, 1, 65535, f"{where}.listen_port") and ok:
        if listen is None:
            check.problem(f"{where}.listen_port", "needs 'listen' (the address to forward from)")
            ok = False
        elif ports[0][0] != ports[0][1] and listen_port != ports[0][0]:
            check.problem(f"{where}.listen_port", "a port range is forwarded to the same ports; use single "
                                                  "ports to forward a different one")
            ok = False
    elif listen_port is not None:
        ok = False
    sources = _sources(check, entry, where)
    if vm is None or proto is None or not ok or listen is False or sources is None:
        return None
    if vm.ip is None and (vm.ip6 is None or listen is not None):
        check.problem(f"{where}.to", f"VM {vm.name!r} has no static address (vm.ip / vm.ip6) to publish")
        return None
    return Publish(to=vm.name, proto=proto, ports=ports[0], listen=listen, listen_port=listen_port,
                   sources=sources, origin=where.removeprefix("dmz."))


def _vm(check: Checker, entry: dict, key: str, where: str, vms: list[VM], declared: set[str],
        required: bool) -> Optional[VM]:
    name = check.typed(entry, key, str, where, required=required)
    if name is None:
        return None
    for vm in vms:
        if vm.name == name:
            return vm
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        check.problem(f"{where}.{key}", f"{name!r} is not a VM of this DMZ (its VMs: {known})")
    return None


def _listen(check: Checker, entry: dict, where: str):
    """None, "host" or an IPv4 address; False when wrong (reported)."""
    value = check.typed(entry, "listen", str, where)
    if value is None:
        return False if "listen" in entry else None
    if value == "host":
        return value
    address = check.address(value, f"{where}.listen", 4)
    if address is None:
        return False
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        check.problem(f"{where}.listen", f"{address} cannot be forwarded from; give one of the host's "
                                         f"addresses, or 'host' for all of them")
        return False
    return address


def _sources(check: Checker, entry: dict, where: str) -> Optional[tuple[IPNetwork, ...]]:
    if "from" not in entry:
        return ()
    value = entry["from"]
    values = value if isinstance(value, list) else [value]
    nets = [check.network(v, f"{where}.from") for v in values]
    if not values:
        check.problem(f"{where}.from", "is an empty list; leave 'from' out for anywhere")
        return None
    if any(n is None for n in nets):
        return None
    return tuple(nets)


def _egress(check: Checker, entry: dict, where: str, scope: DmzScope, vms: list[VM],
            declared: set[str]) -> Optional[list[EgressAllow]]:
    check.unknown_keys(entry, EGRESS_ALLOW_KEYS, where)
    target = _egress_target(check, entry, where, scope)
    proto, ports, ok = _proto_ports(check, entry, where, required_port=False)
    vm = _vm(check, entry, "from", where, vms, declared, required=False)
    if vm is not None and target is not None:
        version = target.version if not isinstance(target, str) else 4
        if (vm.ip if version == 4 else vm.ip6) is None:
            check.problem(f"{where}.from", f"VM {vm.name!r} has no static IPv{version} address "
                                           f"(vm.{'ip' if version == 4 else 'ip6'}) to match on")
            vm = None
    if target is None or proto is None or not ok or ("from" in entry and vm is None):
        return None
    name = target if isinstance(target, str) else None
    net = None if name else target
    return [EgressAllow(proto=proto, ports=p, to_net=net, to_name=name, source_vm=vm.name if vm else None,
                        origin=where.removeprefix("dmz.")) for p in ports]


def _egress_target(check: Checker, entry: dict, where: str, scope: DmzScope):
    """A prefix or address beyond the DMZ, or a DNS name (lower case)."""
    to = check.typed(entry, "to", str, where, required=True)
    if to is None:
        return None
    try:
        net = ipaddress.ip_network(to, strict=True)
    except ValueError:
        if re.fullmatch(r"[0-9a-fA-F.:/]+", to):
            check.problem(f"{where}.to", f"{to!r} is not a valid address or prefix")
            return None
        name = to.lower().rstrip(".")
        if not NAME_RE.match(name):
            check.problem(f"{where}.to", f"{to!r} is neither an address, a prefix nor a DNS name")
            return None
        return name
    own = scope.subnet(net.version)
    if own is not None and net.subnet_of(own):
        check.problem(f"{where}.to", f"{net} is inside the DMZ itself; egress is about what lies beyond it")
        return None
    if net.version == 6 and scope.gateway6 is None:
        check.problem(f"{where}.to", f"{net} is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)")
        return None
    return net


def describe_ports(ports: Optional[tuple[int, int]]) -> str:
    if ports is None:
        return "any port"
    return f"port {ports[0]}" if ports[0] == ports[1] else f"ports {ports[0]}-{ports[1]}"
