"""The blocked attempts the DMZ tables log, read back: who in the DMZ tried to reach what. Pure.

Each log-and-drop chain logs `dmzctl <dmz> <reason>: ` (render/nft.py `log_prefix`) followed by
the kernel's netfilter log fields (IN= OUT= MAC= SRC= DST= PROTO= SPT= DPT= ...). The sender is
named by its MAC address (the second six bytes of the MAC= field, bound to the VM's NIC by libvirt's
no-mac-spoofing) or, failing that, by its source address; both from the config. The log is
rate-limited (log_rate, log_burst): these are samples, the table's counters (dmzctl metrics) are
the totals."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Optional

from .config import DMZ
from .errors import ConfigError

LINE = re.compile(r"dmzctl (?P<dmz>[a-z0-9][a-z0-9-]*) (?P<reason>[A-Za-z0-9_-]+): (?P<fields>.*)$")
DURATION = re.compile(r"^(?P<n>\d+)(?P<unit>s|m|h|d)$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class Attempt:
    """One logged drop."""

    when: float  # seconds since the epoch
    dmz: str
    reason: str
    src: str
    dst: str
    proto: str
    port: Optional[int]
    mac: Optional[str]
    vm: Optional[str] = None


@dataclass
class Group:
    dmz: str
    vm: Optional[str]
    src: str
    dst: str
    proto: str
    port: Optional[int]
    reason: str
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    sources: set = field(default_factory=set)

    def to_dict(self) -> dict:
        return {"dmz": self.dmz, "vm": self.vm, "source": self.src, "sources": sorted(self.sources),
                "destination": self.dst, "proto": self.proto,
                "port": self.port, "reason": self.reason, "count": self.count,
                "first": _iso(self.first), "last": _iso(self.last)}


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


def _fields(text: str) -> dict[str, str]:
    found = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key not in found:  # the first ID= (IP) wins over ICMP's
            found[key] = value
    return found


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def parse_line(when: float, message: str) -> Optional[Attempt]:
    match = LINE.search(message)
    if match is None:
        return None
    fields = _fields(match["fields"])
    if "SRC" not in fields or "DST" not in fields:
        return None
    mac = fields.get("MAC", "")
    octets = mac.split(":")
    sender = ":".join(octets[6:12]).lower() if len(octets) >= 12 else None
    proto = fields.get("PROTO", "?").lower()
    port = fields.get("DPT")
    if proto in ("icmp", "icmpv6") and "TYPE" in fields:
        port = fields["TYPE"]  # the ICMP type stands where a port would be
    return Attempt(when=when, dmz=match["dmz"], reason=match["reason"], src=_address(fields["SRC"]),
                   dst=_address(fields["DST"]), proto=proto, port=int(port) if port and port.isdigit() else None,
                   mac=sender)


def name_vm(attempt: Attempt, dmzs: dict[str, DMZ]) -> Attempt:
    """The VM that sent it, by MAC first (libvirt binds it to the NIC), then by configured address."""
    dmz = dmzs.get(attempt.dmz)
    if dmz is None:
        return attempt
    by_mac = {vm.mac.lower(): vm.name for vm in dmz.vms}
    by_ip = {str(a): vm.name for vm in dmz.vms for a in (vm.ip, vm.ip6) if a is not None}
    vm = by_mac.get(attempt.mac or "") or by_ip.get(attempt.src)
    return Attempt(**{**attempt.__dict__, "vm": vm})


def attempts(lines: Iterable[tuple[float, str]], dmzs: list[DMZ], since: Optional[float] = None) -> list[Attempt]:
    """The logged drops of these DMZs, oldest first."""
    known = {dmz.name: dmz for dmz in dmzs}
    found = []
    for when, message in lines:
        if since is not None and when < since:
            continue
        attempt = parse_line(when, message)
        if attempt is not None and attempt.dmz in known:
            found.append(name_vm(attempt, known))
    return found


def group(found: Iterable[Attempt]) -> list[Group]:
    """By DMZ, sender (the VM, whatever source address it forged; the source address when no VM is
    known), destination, protocol/port and reason; newest first."""
    groups: dict[tuple, Group] = {}
    for a in found:
        key = (a.dmz, a.vm or a.src, a.dst, a.proto, a.port, a.reason)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(a.dmz, a.vm, a.src, a.dst, a.proto, a.port, a.reason, first=a.when)
        g.count += 1
        g.first, g.last = min(g.first, a.when), max(g.last, a.when)
        g.sources.add(a.src)
    return sorted(groups.values(), key=lambda g: (-g.last, g.dmz, g.vm or "", g.dst))


def parse_since(value: Optional[str], now: float) -> Optional[float]:
    """10m, 1h, 2d, 30s before now, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None:
        return None
    match = DURATION.match(value.strip())
    if match:
        return now - timedelta(**{UNITS[match["unit"]]: int(match["n"])}).total_seconds()
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError([f"--since {value}: give a duration (30s, 10m, 1h, 2d) or an ISO 8601 time "
                           f"(2026-01-31T12:00:00)"]) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _target(g: Group) -> str:
    port = "" if g.port is None else (f" type {g.port}" if g.proto.startswith("icmp") else f":{g.port}")
    dst = f"[{g.dst}]" if ":" in g.dst and port.startswith(":") else g.dst
    return f"{dst}{port} {g.proto}"


def format_groups(groups: list[Group], scope: str) -> str:
    if not groups:
        return f"no blocked attempts logged ({scope})\n"
    rows = [("LAST (UTC)", "COUNT", "DMZ", "VM (SOURCE)", "DESTINATION", "REASON")]
    for g in groups:
        who = f"{g.vm or '?'} ({', '.join(sorted(g.sources))})"
        rows.append((_iso(g.last).replace("+00:00", ""), str(g.count), g.dmz, who, _target(g), g.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + f"\n{sum(g.count for g in groups)} logged attempt(s), {scope}; " \
        f"the log is rate-limited (log_rate): dmzctl metrics has the totals\n"
