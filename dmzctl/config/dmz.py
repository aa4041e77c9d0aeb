"""One DMZ from its parsed TOML: the [dmz] table, one function per concern, then its VMs and holes."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .checker import Checker, DmzScope
from .edges import parse_edges
from .holes import parse_holes
from .limits import FLOW_CAP_KEYS, parse_flow_caps
from .model import DMZ, IFNAMSIZ, Hole, IPInterface, IPNetwork, default_bridge
from .vm import parse_vms

DMZ_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}\Z")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
RATE_RE = re.compile(r"^([1-9][0-9]*)/(second|minute|hour|day)\Z")
MODES = ("route", "nat", "isolated")
EGRESS = ("any", "none", "allowlist")
DMZ_KEYS = {
    "name", "bridge", "mode", "gateway", "gateway6", "protected", "dns", "dhcp",
    "egress", "isolate_vms", "log_rate", "log_burst", "allow", "block_private_ranges",
    "publish", "inbound", "lan_inbound", "egress_allow", "dns_forwarders", "masquerade",
} | FLOW_CAP_KEYS


def parse_dmz(data: dict, source: Path = Path("<memory>"), config_hash: str = "") -> DMZ:
    """The DMZ a parsed file describes; raise ConfigError with every problem found."""
    check = Checker(source)
    check.unknown_keys(data, {"dmz", "vm"}, "")
    table = data.get("dmz")
    if not isinstance(table, dict):
        check.problem("dmz", "required table [dmz] is missing" if table is None else "must be a table [dmz]")
        raise ConfigError(check.problems)
    check.unknown_keys(table, DMZ_KEYS, "dmz")

    fields = _network(check, table)
    fields.update(_subnets(check, table))
    fields.update(_services(check, table, fields["gateway6"]))
    fields.update(_policy(check, table))
    fields["flow_caps"] = parse_flow_caps(check, table, "dmz", None)
    scope = DmzScope(fields["name"], fields["gateway"], fields["gateway6"], fields["dhcp"], fields["flow_caps"])
    raw_vms = data.get("vm", [])
    vms = parse_vms(check, raw_vms, scope)
    holes = parse_holes(check, table, fields["dns"], scope, vms, _declared_names(raw_vms))
    if fields["mode"] == "isolated":
        _refuse_holes(check, holes)
    fields.update(parse_edges(check, table, scope, vms, _declared_names(raw_vms), fields["mode"], fields["egress"]))
    if check.problems:
        raise ConfigError(check.problems)
    return DMZ(**fields, holes=tuple(holes), vms=tuple(vms), source=source, config_hash=config_hash)


def _network(check: Checker, table: dict) -> dict:
    """The libvirt network: its name, its bridge, how it forwards."""
    name = check.typed(table, "name", str, "dmz", required=True)
    if name is not None and not DMZ_NAME_RE.match(name):
        check.problem("dmz.name", f"{name!r} must be 1-32 characters of a-z, 0-9 and '-', starting with a "
                                  f"letter or digit")
        name = None
    bridge = check.typed(table, "bridge", str, "dmz")
    if bridge is not None:
        if len(bridge) > IFNAMSIZ:
            check.problem("dmz.bridge", f"{bridge!r} is {len(bridge)} characters; Linux interface names "
                                        f"are at most {IFNAMSIZ}")
            bridge = None
        elif not BRIDGE_RE.match(bridge):
            check.problem("dmz.bridge", f"{bridge!r} may use only letters, digits, '-', '_' and '.'")
            bridge = None
    elif name is not None:
        bridge = default_bridge(name)
    return {"name": name, "bridge": bridge, "mode": check.choice(table, "mode", MODES, "dmz", "route")}


def _subnets(check: Checker, table: dict) -> dict:
    """The DMZ's own subnets (the host's address in each) and the subnets it must never reach."""
    gateway = check.interface(check.typed(table, "gateway", str, "dmz", required=True), "dmz.gateway", 4)
    if gateway is not None:
        _check_gateway(check, gateway, "dmz.gateway")
    gateway6 = check.interface(check.typed(table, "gateway6", str, "dmz"), "dmz.gateway6", 6)
    if gateway6 is not None:
        _check_gateway(check, gateway6, "dmz.gateway6")
    return {"gateway": gateway, "gateway6": gateway6, "protected": _protected(check, table, gateway, gateway6)}


def _check_gateway(check: Checker, iface: IPInterface, where: str) -> None:
    net = iface.network
    min_prefix = 30 if iface.version == 4 else 126
    if net.prefixlen > min_prefix:
        check.problem(where, f"/{net.prefixlen} leaves no room for VMs; use /{min_prefix} or shorter")
        return
    if iface.ip == net.network_address:
        check.problem(where, f"{iface.ip} is the network address of {net}; give the host an address "
                             f"inside it, e.g. {net.network_address + 1}/{net.prefixlen}")
    elif iface.version == 4 and iface.ip == net.broadcast_address:
        check.problem(where, f"{iface.ip} is the broadcast address of {net}; give the host an address "
                             f"inside it, e.g. {net.network_address + 1}/{net.prefixlen}")


def _protected(check: Checker, table: dict, gateway: Optional[ipaddress.IPv4Interface],
               gateway6: Optional[ipaddress.IPv6Interface]) -> tuple[IPNetwork, ...]:
    """dmz.protected as written, collapsed, v4 first; none may overlap the DMZ."""
    protected: list[IPNetwork] = []
    raw_protected = check.typed(table, "protected", list, "dmz", required=True)
    if raw_protected is not None and not raw_protected:
        check.problem("dmz.protected", "needs at least one subnet the DMZ must never reach, "
                                       "e.g. ['192.168.1.0/24']")
    for index, value in enumerate(raw_protected or []):
        where = f"dmz.protected[{index + 1}]"
        net = check.network(value, where)
        if net is not None and not _overlaps_dmz(check, net, where, gateway, gateway6):
            protected.append(net)
    return tuple(ipaddress.collapse_addresses(n for n in protected if n.version == 4)) + \
        tuple(ipaddress.collapse_addresses(n for n in protected if n.version == 6))


def _overlaps_dmz(check: Checker, net: IPNetwork, where: str, gateway, gateway6) -> bool:
    own, label = (gateway, "dmz.gateway") if net.version == 4 else (gateway6, "dmz.gateway6")
    if own is None or not own.network.overlaps(net):
        return False
    check.problem(where, f"{net} overlaps the DMZ subnet {own.network} ({label}); the DMZ would be "
                         f"blocked from itself and the protection silently defeated: pick "
                         f"non-overlapping subnets")
    return True


def _services(check: Checker, table: dict, gateway6: Optional[ipaddress.IPv6Interface]) -> dict:
    """What the host gives the VMs: a DNS server to reach (a hole), DHCP."""
    dns = check.address(check.typed(table, "dns", str, "dmz"), "dmz.dns")
    if dns is not None and dns.version == 6 and gateway6 is None:
        check.problem("dmz.dns", f"{dns} is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)")
    return {"dns": dns, "dhcp": check.typed(table, "dhcp", bool, "dmz", default=True)}


def _policy(check: Checker, table: dict) -> dict:
    """What the firewall lets out of the DMZ and between its VMs, and how much of it it logs."""
    fields = {
        "egress": check.choice(table, "egress", EGRESS, "dmz", "any"),
        "isolate_vms": check.typed(table, "isolate_vms", bool, "dmz", default=False),
        "block_private_ranges": check.typed(table, "block_private_ranges", bool, "dmz", default=True),
        "log_rate": check.typed(table, "log_rate", str, "dmz", default="6/hour"),
    }
    if fields["log_rate"] is not None and not RATE_RE.match(fields["log_rate"]):
        check.problem("dmz.log_rate", f"{fields['log_rate']!r} must look like N/second, N/minute, N/hour or N/day "
                                      f"(e.g. '6/hour')")
    fields["log_burst"] = check.typed(table, "log_burst", int, "dmz", default=5)
    if fields["log_burst"] is not None:
        check.within(fields["log_burst"], 1, 10000, "dmz.log_burst")
    return fields


def _declared_names(raw_vms) -> set[str]:
    """The name of every [[vm]], valid or not: a hole `from` one of them is not an unknown name."""
    if not isinstance(raw_vms, list):
        return set()
    return {t["name"] for t in raw_vms if isinstance(t, dict) and isinstance(t.get("name"), str)}


def _refuse_holes(check: Checker, holes: list[Hole]) -> None:
    # libvirt's isolated network rejects every packet forwarded out of the DMZ,
    # after dmzctl's table: a hole would be accepted by one and dropped by the other.
    for where in dict.fromkeys(f"dmz.{hole.origin}" for hole in holes):
        check.problem(where, "mode 'isolated' forwards nothing out of the DMZ, so this hole cannot work; "
                             "use mode 'route' or 'nat' (the gateway's own DNS needs no hole)")
