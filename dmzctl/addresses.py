"""A VM's addresses in `status`: those its config names, apart from those seen on the host. Pure.

Observed addresses come from libvirt's DHCP leases, the DMZ bridge's neighbour table (the host's ARP
and NDP cache) and, when the VM runs the QEMU guest agent, from the guest itself; each is matched by
the VM's MAC. Link-local addresses are left out (every VM has one; they say nothing about what it
can reach). A VM that is not running has no observed addresses at all: None, and only what is
configured is shown, never an address as if it were in use.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional

LEASE, NEIGHBOUR, AGENT = "dhcp lease", "neighbour", "guest agent"
NO_ADDRESS_STATES = {"FAILED", "INCOMPLETE", "NOARP"}


@dataclass(frozen=True)
class ObservedAddress:
    address: str
    sources: tuple[str, ...]  # in the order LEASE, NEIGHBOUR, AGENT

    def to_dict(self) -> dict:
        return {"address": self.address, "sources": list(self.sources)}


def observed_addresses(mac: str, leases: Iterable[dict] = (), neighbours: Iterable[dict] = (),
                       agent: Iterable[tuple[str, str]] = ()) -> list[ObservedAddress]:
    """The VM's addresses, each once with every source that saw it.

    leases: libvirt's lease dicts (`mac`, `ipaddr`); neighbours: `ip -j neigh` entries (`dst`, `lladdr`,
    `state`); agent: (MAC, address) pairs the guest agent reports.
    """
    mac = mac.lower()
    seen: dict[ipaddress._BaseAddress, list[str]] = {}

    def add(address: Optional[str], source: str) -> None:
        try:
            parsed = ipaddress.ip_address(str(address).split("%")[0].split("/")[0])
        except ValueError:
            return
        if parsed.is_link_local or parsed.is_loopback or parsed.is_unspecified or parsed.is_multicast:
            return
        sources = seen.setdefault(parsed, [])
        if source not in sources:
            sources.append(source)

    for lease in leases:
        if str(lease.get("mac") or "").lower() == mac:
            add(lease.get("ipaddr"), LEASE)
    for entry in neighbours:
        if str(entry.get("lladdr") or "").lower() == mac and not NO_ADDRESS_STATES & set(entry.get("state") or ()):
            add(entry.get("dst"), NEIGHBOUR)
    for hwaddr, address in agent:
        if str(hwaddr).lower() == mac:
            add(address, AGENT)
    return [ObservedAddress(str(address), tuple(seen[address]))
            for address in sorted(seen, key=lambda a: (a.version, a))]


def format_addresses(configured: list[str], observed: Optional[list[ObservedAddress]]) -> str:
    """`configured: 10.0.0.10 fd00::10 · observed: 10.0.0.10 (dhcp lease, neighbour), ...`; without the
    observed part for a VM that is not running (observed None)."""
    text = f"configured: {' '.join(configured) if configured else 'none'}"
    if observed is None:
        return text
    seen = ", ".join(f"{o.address} ({', '.join(o.sources)})" for o in observed)
    return f"{text} · observed: {seen or 'none yet'}"
