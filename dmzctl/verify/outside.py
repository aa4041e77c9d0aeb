"""`dmzctl verify --from-outside`: the DMZ's inbound edge proven with real packets from a temporary
namespace outside every DMZ, routed by the host (host.netns.OutsideNamespace): each published port on
the VM's own addresses and through its DNAT address, the port just beside each, and a sample of
unpublished ports of every VM, compared with what `dmzctl explain` says of a flow from outside.
Nothing leaves the machine: the namespace's packets go to the host, which routes them to the DMZ.

Its source addresses default to 198.18.255.254 and 2001:db8:ffff::fe (benchmarking and documentation
ranges: "the internet", never a LAN); give the LAN's to see what lan_inbound lets through.
"""

from __future__ import annotations

import ipaddress
from typing import Callable, Iterable, Optional

from .probes import Probe

DEFAULT_SOURCE4 = "198.18.255.254"
DEFAULT_SOURCE6 = "2001:db8:ffff::fe"
SAMPLES = (("tcp", 22), ("tcp", 3306), ("udp", 53))


def _listen_address(dmz, entry, hosts: Iterable):
    if entry.listen != "host":
        return entry.listen
    return next((a for a in hosts if a.version == 4 and a not in dmz.subnet and not a.is_loopback), None)


def plan_outside(dmz, src4, src6, host_addresses: Iterable = ()) -> tuple[list[Probe], list[str]]:
    """The probes, each with explain's decision for a flow from outside; and notes on what is not probed."""
    from ..explain import Flow, explain, host_address_set

    hosts = host_address_set(dmz, host_addresses)
    probes: list[Probe] = []
    notes: list[str] = []
    seen: set = set()

    def add(kind: str, dst, proto: str, port: int, note: str) -> None:
        src = src4 if dst.version == 4 else src6
        if src is None or (dst, proto, port) in seen:
            return
        seen.add((dst, proto, port))
        flow = Flow(dst=dst, proto=proto, src=src, port=port, from_dmz=False)
        probes.append(Probe(id=f"o{len(probes) + 1}", kind=kind, dst=dst, proto=proto, port=port, note=note,
                            expected=explain(dmz, flow, hosts)))

    for entry in dmz.publish:
        vm = dmz.vm(entry.to)
        beside = entry.ports[1] + 1 if entry.ports[1] < 65535 else entry.ports[0] - 1
        for address in (vm.ip, vm.ip6):
            if address is not None:
                add("published", address, entry.proto, entry.ports[0], f"{entry.origin} on {vm.name}")
                add("unpublished", address, entry.proto, beside, f"beside {entry.origin}")
        if entry.listen is not None:
            listen = _listen_address(dmz, entry, sorted(hosts, key=str))
            if listen is None:
                notes.append(f"{entry.origin}: listen = \"host\" but no host IPv4 address outside the DMZ is known")
            else:
                add("published", listen, entry.proto, entry.listen_ports[0], f"{entry.origin} through DNAT")
    for vm in dmz.vms:
        for address in (vm.ip, vm.ip6):
            for proto, port in SAMPLES:
                if address is not None:
                    add("unpublished", address, proto, port, f"a sample port of {vm.name}")
    if not dmz.publish:
        notes.append(f"DMZ {dmz.name} publishes nothing; inbound = {dmz.inbound!r}")
    notes.append("an allowed probe to a VM that is not running, or to a port nothing answers on, is 'unconfirmed'")
    return probes, notes


def verify_outside(dmz, host_addresses: Optional[Iterable] = None, address=None, address6=None,
                   timeout: float = 4.0, skip: Iterable = (), say: Callable[[str], None] = lambda _m: None):
    """Probe the DMZ's inbound edge from a temporary namespace outside it; gone when this returns or raises."""
    from ..errors import ConfigError
    from ..host.netns import OutsideNamespace, bridge_exists, read_host_addresses
    from ..ops.common import require_root, table_only
    from . import Report, _firewall_problems, _table_state, run_agent
    from ..errors import HostError

    require_root()
    if not bridge_exists(dmz.bridge):
        raise HostError(f"DMZ {dmz.name}: bridge {dmz.bridge} does not exist; bring the DMZ up first (dmzctl up)")
    try:
        src4 = ipaddress.ip_address(address or DEFAULT_SOURCE4)
        src6 = ipaddress.ip_address(address6 or DEFAULT_SOURCE6) if dmz.subnet6 is not None else None
    except ValueError as error:
        raise ConfigError([f"--address/--address6: {error}"]) from None
    if src4.version != 4 or (src6 is not None and src6.version != 6):
        raise ConfigError(["--address must be IPv4 and --address6 IPv6"])
    hosts = list(read_host_addresses(list(skip)) if host_addresses is None else host_addresses)
    report = Report(dmz=dmz.name, bridge=dmz.bridge, src4=str(src4), src6=str(src6) if src6 else None)
    before = _table_state(dmz)
    report.problems += _firewall_problems(dmz, before, table_only(dmz))
    report.probes, report.notes = plan_outside(dmz, src4, src6, hosts)
    report.notes.insert(0, "from outside: a temporary namespace routed by the host, not on the DMZ bridge")
    with OutsideNamespace(src4, src6) as ns:
        say(f"{dmz.name}: outside namespace {ns.name} at {src4}" + (f" / {src6}" if src6 else ""))
        specs = [p.spec(str(src4) if p.dst.version == 4 else str(src6), timeout) for p in report.probes]
        results = {r["id"]: r for r in run_agent(ns.name, specs, limit=timeout * 3 + 30, owner=ns)}
    for probe in report.probes:
        result = results.get(probe.id, {})
        probe.observed, probe.detail = result.get("observed", "error"), result.get("detail", "no result")
    if before is not None and _table_state(dmz) != before:
        report.problems.append(f"firewall table inet dmzctl-{dmz.name} changed while verify ran; run it again")
    return report
