"""`dmzctl verify`: prove a live DMZ's isolation with real packets, from inside the DMZ.

A temporary network namespace is attached to the DMZ bridge by a veth pair and
given a free DMZ address: it stands where a VM stands. From there it probes what
verify.probes plans (samples of the protected and implicitly blocked prefixes, the
host's own addresses, each hole and just outside it, the explicit --target
addresses) and compares what it observes with what `dmzctl explain` says the
policy does. It sends nothing to any other address: it never scans.

Observation: a probe that gets any answer (a reply, a TCP RST, an ICMP error)
was not dropped by the firewall; a probe that gets nothing within the timeout
was. An allowed-by-policy probe without an answer is "unconfirmed" (nothing may
listen there, or the target drops it itself): reported, and not a match.

Modules: verify.probes (the plan, pure), verify.agent (what runs in the namespace,
`python -m dmzctl.verify.agent`), dmzctl.host.netns (the namespace itself). This
package imports nothing heavy at import time: the agent's interpreter imports it.
"""

from __future__ import annotations

import ipaddress
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from ..errors import ConfigError, HostError
from ..host.netns import (ProbeNamespace, addresses_in_use, bridge_exists, host_addresses_from_ip_json,
                          read_bridge_netfilter, read_host_addresses, route_of, run_json)
from .probes import (Probe, choose_addresses, implicit_destinations, plan, sample_address,
                     stay_on_this_host)

__all__ = ["Interrupted", "Probe", "ProbeNamespace", "Report", "choose_addresses", "format_report",
           "host_addresses_from_ip_json", "plan", "read_bridge_netfilter", "read_host_addresses", "run_agent",
           "sample_address", "verify"]

AGENT = "dmzctl.verify.agent"


def run_agent(netns: str, specs: list[dict], limit: float, owner: Optional[ProbeNamespace] = None) -> list[dict]:
    """Run the probes in a namespace through `python -m dmzctl.verify.agent`; results in the specs' order."""
    answer = run_json(netns, [sys.executable, "-m", AGENT], {"probes": specs}, limit, "the probe agent", owner)
    return answer["results"]


@dataclass
class Report:
    dmz: str
    bridge: str
    src4: Optional[str] = None
    src6: Optional[str] = None
    probes: list[Probe] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(p.status == "ok" for p in self.probes)

    def counts(self) -> dict:
        counts = {"probes": len(self.probes), "ok": 0, "MISMATCH": 0, "unconfirmed": 0, "error": 0}
        for probe in self.probes:
            counts[probe.status] += 1
        counts["blocked_as_expected"] = sum(1 for p in self.probes if p.status == "ok" and not p.expected.allowed)
        counts["allowed_as_expected"] = sum(1 for p in self.probes if p.status == "ok" and p.expected.allowed)
        return counts

    def to_dict(self) -> dict:
        return {"dmz": self.dmz, "bridge": self.bridge, "probe_address": self.src4, "probe_address6": self.src6,
                "ok": self.ok, "counts": self.counts(), "problems": self.problems, "notes": self.notes,
                "probes": [p.to_dict() for p in self.probes]}


OBSERVED_WORDS = {"connected": "answered", "refused": "answered", "reply": "answered", "unreachable": "answered",
                  "timeout": "no answer"}


def format_report(report: Report) -> str:
    lines = [f"{report.dmz}: probing from {report.src4}" + (f" and {report.src6}" if report.src6 else "")
             + f" (a temporary namespace on bridge {report.bridge})"]
    width = max([len(p.label()) for p in report.probes] + [10])
    lines.append(f"  {'STATUS':<11} {'EXPECTED':<8} {'OBSERVED':<12} {'PROBE':<{width}}  RULE / WHAT")
    for probe in report.probes:
        observed = OBSERVED_WORDS.get(probe.observed or "", probe.observed or "-")
        lines.append(f"  {probe.status:<11} {probe.expected.verdict:<8} {observed:<12} {probe.label():<{width}}  "
                     f"{probe.expected.rule}; {probe.note}"
                     + (f" [{probe.detail}]" if probe.status != "ok" and probe.detail else ""))
    lines += [f"  note: {note}" for note in report.notes]
    lines += [f"  PROBLEM: {problem}" for problem in report.problems]
    counts = report.counts()
    summary = (f"{counts['probes']} probes: {counts['blocked_as_expected']} blocked and "
               f"{counts['allowed_as_expected']} allowed as expected")
    bad = [f"{counts[k]} {k}" for k in ("MISMATCH", "unconfirmed", "error") if counts[k]]
    lines.append(f"{report.dmz}: {'OK' if report.ok else 'FAILED'}: {summary}" + (f"; {', '.join(bad)}" if bad else ""))
    return "\n".join(lines) + "\n"


class Interrupted(KeyboardInterrupt):
    """A signal arrived (TERM, HUP, INT): unwind through every `finally`, then leave like Ctrl+C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def _handle_signals(handler: Callable) -> dict:
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread
            pass
    return previous


# --- verify ------------------------------------------------------------------------

def _table_state(dmz):
    from ..host import nft
    from ..render.nft import table_name

    return nft.canonical(nft.list_firewall(table_name(dmz)))


def _check_skip(skip: Iterable) -> list:
    skip = list(skip)
    for prefix in skip:
        try:
            ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            raise ConfigError([f"--skip: {prefix!r} is not an address or ADDR/PREFIX"]) from None
    return skip


def _firewall_problems(dmz, before, table_now) -> list[str]:
    from ..state import observe_table

    if before is None:
        return [f"firewall table inet dmzctl-{dmz.name} is absent: only its backstop (if there) "
                f"protects the LAN and the host"]
    if not observe_table(table_now).in_sync:
        return [f"firewall table inet dmzctl-{dmz.name} differs from the config "
                f"(dmzctl status; dmzctl firewall up)"]
    return []


def _probe_addresses(dmz, address, address6) -> tuple:
    """The probe's own DMZ addresses: those given, else free ones; HostError when they do not fit."""
    if address is None or (address6 is None and dmz.subnet6 is not None):
        auto4, auto6 = choose_addresses(dmz, addresses_in_use(dmz.bridge))
        address = address or auto4
        address6 = address6 or auto6
    try:
        address = ipaddress.ip_address(address)
        address6 = ipaddress.ip_address(address6) if address6 is not None else None
    except ValueError as error:
        raise ConfigError([f"--address/--address6: {error}"]) from None
    if address.version != 4 or address not in dmz.subnet or address == dmz.gateway.ip:
        raise HostError(f"--address {address} must be a free address inside {dmz.subnet}, not the gateway")
    if address6 is not None:
        if dmz.subnet6 is None or address6.version != 6 or address6 not in dmz.subnet6 \
                or address6 == dmz.gateway6.ip:
            raise HostError(f"--address6 {address6} must be a free address inside the DMZ's IPv6 subnet")
    return address, address6


def _resolve_names(dmz, ns, report: Report, address6, timeout: float, planned) -> None:
    """With an egress allowlist by name: look each name up through the gateway, then plan its rows."""
    from .names import name_probes, resolve_specs

    if dmz.egress != "allowlist" or not dmz.egress_names:
        return
    specs = resolve_specs(dmz, address6 is not None, timeout)
    answers = run_agent(ns.name, specs, limit=timeout * 2 + 30, owner=ns)
    before = len(planned.probes)
    report.notes += name_probes(dmz, answers, specs, lambda kind, dst, proto, port, learned, note: planned.add(
        kind, dst, proto, port, note=note, learned=learned))
    report.probes += planned.probes[before:]


def _observe(dmz, report: Report, address, address6, timeout: float, say: Callable[[str], None],
             planned) -> None:
    """Send the probes from a namespace standing where a VM stands; the namespace is gone on return."""
    previous = _handle_signals(_raise_interrupted)
    try:
        with ProbeNamespace(dmz.bridge, address, dmz.subnet.prefixlen, dmz.gateway.ip,
                            address6, dmz.subnet6.prefixlen if dmz.subnet6 else 64,
                            dmz.gateway6.ip if dmz.gateway6 else None, isolated=dmz.isolate_vms) as ns:
            say(f"{dmz.name}: probe namespace {ns.name} at {address}"
                + (f" / {address6}" if address6 else "") + f"; waiting for bridge port {ns.veth} to forward")
            ns.wait_forwarding()
            if address6 is not None and dmz.gateway6 is not None:
                ns.wait_gateway6(dmz.gateway6.ip)
            _resolve_names(dmz, ns, report, address6, timeout, planned)
            probes = report.probes
            specs = [p.spec(str(address) if p.dst.version == 4 else str(address6), timeout) for p in probes]
            say(f"{dmz.name}: sending {len(specs)} probes (timeout {timeout:g} s each, in parallel)")
            results = {r["id"]: r for r in run_agent(ns.name, specs, limit=timeout * 3 + 30, owner=ns)}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for probe in probes:
        result = results.get(probe.id, {})
        probe.observed = result.get("observed", "error")
        probe.detail = result.get("detail", "no result")


def verify(dmz, targets: Iterable = (), skip: Iterable = (), host_addresses: Optional[Iterable] = None,
           address=None, address6=None, timeout: float = 4.0, bridge_netfilter: Optional[bool] = None,
           say: Callable[[str], None] = lambda _m: None) -> Report:
    """Probe the live DMZ from a temporary namespace; the namespace is gone when this returns or raises."""
    from ..explain import parse_target
    from ..ops.common import require_root, table_only as build_table_only

    require_root()
    report = Report(dmz=dmz.name, bridge=dmz.bridge)
    skip = _check_skip(skip)
    if host_addresses is None:
        host_addresses = read_host_addresses(skip)
    if bridge_netfilter is None:
        bridge_netfilter = read_bridge_netfilter()
    if not bridge_exists(dmz.bridge):
        raise HostError(f"DMZ {dmz.name}: bridge {dmz.bridge} does not exist; bring the DMZ up first (dmzctl up)")
    before = _table_state(dmz)
    table_now = build_table_only(dmz)
    report.problems += _firewall_problems(dmz, before, table_now)
    address, address6 = _probe_addresses(dmz, address, address6)
    report.src4, report.src6 = str(address), (str(address6) if address6 else None)

    parsed_targets = [parse_target(str(target)) for target in targets]
    plans: list = []
    probes, notes = plan(dmz, address, address6, host_addresses, parsed_targets, bridge_netfilter,
                         table_now.blocks, skip, plans)
    routes = {dst: route_of(dst) for dst in implicit_destinations(probes)}
    probes, beyond = stay_on_this_host(probes, routes)
    report.probes, report.notes = probes, notes + beyond
    _observe(dmz, report, address, address6, timeout, say, plans[0])
    after = _table_state(dmz)
    if before is not None and after != before:
        report.problems.append(f"firewall table inet dmzctl-{dmz.name} "
                               f"{'vanished' if after is None else 'changed'} while verify ran: its results "
                               f"do not describe one policy; run verify again")
    return report
