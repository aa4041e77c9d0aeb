"""Which probes `dmzctl verify` sends, and what the policy says of each: pure.

From the probe's DMZ addresses it plans
  - a sample of each protected prefix (an address that is not the host's own),
  - the host's own addresses (the gateways always; the others it is given),
  - each hole's destination, on its port and just outside it (nothing broader),
  - a sample of each implicitly blocked prefix (another DMZ, a host subnet, a private range),
  - the explicit targets (the only way to probe egress), each with rows of its own,
and asks dmzctl.explain what the policy decides for each. Nothing here reads the host:
the host's addresses, the implicit blocks and the routes come in as arguments.

dmzctl.explain (and through it lxml) is imported inside the functions that need it:
the probe agent (`python -m dmzctl.verify.agent`) imports this package first and
must start fast.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from ..errors import HostError

ANSWERED = ("connected", "refused", "reply", "unreachable")  # the agent's observations that are answers
SAMPLE_PROBES = (("tcp", 22), ("udp", 53), ("icmp", None))
IMPLICIT_KINDS = ("other-dmz", "host-net", "private")

# The sample that matters most in a range: the cloud metadata service an attacker asks first.
PREFERRED_SAMPLES = {ipaddress.ip_network("169.254.0.0/16"): ipaddress.ip_address("169.254.169.254")}


@dataclass
class Probe:
    id: str
    kind: str   # protected | host | dns-gateway | hole | hole-edge | target | other-dmz | host-net | private
    dst: object
    proto: str
    port: Optional[int] = None
    icmp_type: Optional[int] = None
    note: str = ""
    expected: object = None  # an explain.Decision
    observed: Optional[str] = None
    detail: str = ""

    @property
    def answered(self) -> Optional[bool]:
        return None if self.observed is None else self.observed in ANSWERED

    @property
    def status(self) -> str:
        """ok | MISMATCH | unconfirmed | error"""
        if self.observed is None or self.observed == "error":
            return "error"
        if self.expected.allowed:
            return "ok" if self.answered else "unconfirmed"
        return "MISMATCH" if self.answered else "ok"

    def label(self) -> str:
        target = f"[{self.dst}]" if self.dst.version == 6 and self.port else str(self.dst)
        if self.port:
            target += f":{self.port}"
        proto = self.proto if self.icmp_type is None else f"{self.proto} type {self.icmp_type}"
        return f"{proto} {target}"

    def spec(self, src: str, timeout: float) -> dict:
        """What the agent needs to send this probe from `src`."""
        proto = self.proto
        if proto in ("tcp", "udp", "icmp", "icmpv6", "sctp"):
            spec = {"proto": proto}
        else:
            from ..explain import PROTO_NUMBERS

            spec = {"proto": "raw", "ipproto": PROTO_NUMBERS.get(proto, int(proto) if proto.isdigit() else 0)}
        spec.update(id=self.id, dst=str(self.dst), src=src, port=self.port, icmp_type=self.icmp_type,
                    timeout=timeout)
        if proto == "udp" and self.port == 53:
            spec["payload"] = "dns"
        return spec

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "dst": str(self.dst), "proto": self.proto, "port": self.port,
                "icmp_type": self.icmp_type, "note": self.note,
                "expected": self.expected.verdict, "rule": self.expected.rule, "decided_by": self.expected.decided_by,
                "observed": self.observed, "detail": self.detail, "status": self.status}


def sample_address(net, hosts: Iterable = (), first: int = 1):
    """The address a prefix is probed by, for protected and implicitly blocked prefixes alike: its
    preferred sample, else the first usable one from offset `first` on (the address itself for a host
    prefix) that is not one of `hosts`. A host address is judged by the to-host rules, and its row would
    not test the prefix. None when the prefix holds nothing else (a /32 that is the host's)."""
    hosts = set(hosts)
    preferred = PREFERRED_SAMPLES.get(net)
    if preferred is not None and preferred not in hosts:
        return preferred
    if net.num_addresses <= 2:
        candidates = iter(net)
    else:
        candidates = (net.network_address + offset for offset in range(first, min(net.num_addresses - 1, first + 16)))
    return next((address for address in candidates if address not in hosts), None)


def _edge_port(ports: tuple[int, int]) -> int:
    return ports[1] + 1 if ports[1] < 65535 else ports[0] - 1


class _Plan:
    """The probes planned so far, each with the policy's decision, and the notes on what is not probed."""

    def __init__(self, dmz, src4, src6, hosts: frozenset, bridge_netfilter, blocks, skip: Iterable):
        self.dmz, self.src4, self.src6, self.hosts = dmz, src4, src6, hosts
        self.bridge_netfilter, self.blocks = bridge_netfilter, blocks
        self.skip = [ipaddress.ip_network(s, strict=False) for s in skip]
        self.probes: list[Probe] = []
        self.notes: list[str] = []
        self._seen: set = set()

    def add(self, kind, dst, proto, port=None, icmp_type=None, note="", learned=()) -> None:
        """One probe, unless the same one is planned already: a target never merges with another kind's
        probe (each target has rows of its own), the other kinds merge among themselves."""
        from ..explain import Flow, explain

        dst = ipaddress.ip_address(dst)
        if proto == "icmp" and dst.version == 6:
            proto = "icmpv6"
        src = self.src4 if dst.version == 4 else self.src6
        if src is None or any(dst.version == net.version and dst in net for net in self.skip):
            return
        key = (kind == "target", dst, proto, port, icmp_type)
        if key in self._seen:
            return
        self._seen.add(key)
        flow = Flow(dst=dst, proto=proto, src=src, port=port, icmp_type=icmp_type, learned=tuple(learned))
        decision = explain(self.dmz, flow, self.hosts, self.bridge_netfilter, self.blocks)
        self.probes.append(Probe(id=f"p{len(self.probes) + 1}", kind=kind, dst=dst, proto=proto, port=port,
                                 icmp_type=icmp_type, note=note, expected=decision))

    def samples(self, kind: str, net, note: str, first: int = 1) -> bool:
        """The sample probes of a prefix at an address that is not the host's; False when there is none."""
        sample = sample_address(net, self.hosts, first)
        if sample is None:
            return False
        for proto, port in SAMPLE_PROBES:
            self.add(kind, sample, proto, port, note=note)
        return True


def _protected(planned: _Plan) -> None:
    for net in planned.dmz.protected:
        if not planned.samples("protected", net, f"sample of protected {net}"):
            planned.notes.append(f"protected {net} not probed as such: it holds only the host's own addresses "
                                 f"(the host's rows probe them)")


def _holes(planned: _Plan) -> None:
    for hole in planned.dmz.holes:
        dst = sample_address(hole.to)
        port = hole.ports[0] if hole.ports else (22 if hole.proto in ("tcp", "sctp") else
                                                  53 if hole.proto == "udp" else None)
        whom = f" (from {hole.source_vm or hole.source_net})" if hole.source_vm or hole.source_net else ""
        planned.add("hole", dst, hole.proto, port, note=f"tests hole {hole.origin}{whom}")
        if hole.ports:
            planned.add("hole-edge", dst, hole.proto, _edge_port(hole.ports), note=f"just outside hole {hole.origin}")


def _host(planned: _Plan) -> None:
    dmz = planned.dmz
    gateways = [dmz.gateway.ip] + ([dmz.gateway6.ip] if dmz.gateway6 else [])
    others = sorted((a for a in planned.hosts if a not in gateways), key=lambda a: (a.version, a))
    for address in gateways + others:
        for proto, port in SAMPLE_PROBES:
            planned.add("host", address, proto, port, note="the host's DMZ gateway" if address in gateways
                        else "the host's own address")
        if address in gateways:
            planned.add("dns-gateway", address, "tcp", 53, note="DNS to the gateway")


def _implicit(planned: _Plan) -> None:
    for block in planned.blocks:
        if block.net.version == 6 and block.net.is_link_local:
            continue  # never routed: from the DMZ an IPv6 link-local address can only be the host's
        if not planned.samples(block.kind, block.net, f"sample of {block.reason} ({block.net})", first=2):
            planned.notes.append(f"{block.reason} ({block.net}) not probed: it holds only the host's own addresses")


def _targets(planned: _Plan, targets: Iterable) -> None:
    for address, port in targets:
        planned.add("target", address, "tcp", port or 443, note="explicit target")
        planned.add("target", address, "icmp", note="explicit target")
    if not any(p.kind == "target" and p.expected.hook == "forward"
               and p.expected.decided_by in ("egress", "egress-any") for p in planned.probes):
        planned.notes.append(f"egress (\"{planned.dmz.egress}\") not probed: give --target ADDR outside the "
                             f"protected subnets (verify sends nothing anywhere else)")


def plan(dmz, src4, src6, host_addresses: Iterable = (), targets: Iterable = (),
         bridge_netfilter: Optional[bool] = None, blocks=None,
         skip: Iterable = (), plans: Optional[list] = None) -> tuple[list[Probe], list[str]]:
    """The probes for one DMZ from (src4, src6), each with the policy's expected decision.

    targets: (address, port or None) pairs. blocks: the implicit blocks the table holds
    (None: those known without the host). skip: prefixes never probed.
    Returns (probes, notes about what is not probed).
    """
    from ..explain import host_address_set
    from ..implicit import HostView, blocks_for

    if blocks is None:
        blocks = blocks_for(dmz, HostView())
    planned = _Plan(dmz, src4, src6, host_address_set(dmz, host_addresses), bridge_netfilter, blocks, skip)
    if plans is not None:
        plans.append(planned)  # verify adds the rows of names once the gateway has answered
    if src6 is None and (dmz.protected6 or any(h.family == 6 for h in dmz.holes)):
        planned.notes.append("IPv6 not probed: the DMZ has no IPv6 (dmz.gateway6), so every IPv6 packet from "
                             "it is dropped as spoofed")
    _protected(planned)
    _holes(planned)
    _host(planned)
    _implicit(planned)
    _targets(planned, targets)
    return planned.probes, planned.notes


# --- what stays on this host ----------------------------------------------------

def implicit_destinations(probes: Iterable[Probe]) -> list:
    """The samples of implicit blocks, whose routes stay_on_this_host judges."""
    return list(dict.fromkeys(p.dst for p in probes if p.kind in IMPLICIT_KINDS))


def stay_on_this_host(probes: list[Probe], routes: Mapping) -> tuple[list[Probe], list[str]]:
    """Drop the samples of implicit blocks that the host routes through a gateway (or not at all):
    nobody listed them, so verify sends them nothing that could leave this machine if the table
    failed. Samples on the host's own links (another DMZ, a libvirt network, a directly attached
    subnet) stay. routes: how the host routes each such sample (`ip -j route get`; None: no route)."""
    kept, notes, judged = [], [], set()
    for probe in probes:
        if probe.kind in IMPLICIT_KINDS:
            route = routes.get(probe.dst)
            if route is None or "gateway" in route or route.get("type") == "unreachable":
                if probe.dst not in judged:
                    via = f"via {route['gateway']} on {route.get('dev')}" if route and "gateway" in route else "nowhere"
                    notes.append(f"{probe.note.removeprefix('sample of ')}: not probed: the host routes "
                                 f"{probe.dst} {via}, beyond this machine")
                judged.add(probe.dst)
                continue
        kept.append(probe)
    return kept, notes


# --- the probe's own addresses --------------------------------------------------

def choose_addresses(dmz, in_use: set) -> tuple:
    """A free IPv4 address at the top of the half of the subnet DHCP does not hand out, and a free IPv6
    address at the top of the IPv6 subnet."""
    from ..render.network import dhcp_range

    taken = set(in_use) | {dmz.gateway.ip} | {vm.ip for vm in dmz.vms if vm.ip}
    net = dmz.subnet
    low, high = net.network_address + 1, net.broadcast_address - 1
    if dmz.dhcp:
        start, end = dhcp_range(dmz.gateway)
        low, high = (end + 1, high) if start == low else (low, start - 1)
    src4 = next((a for a in _descending(low, high) if a not in taken), None)
    src6 = None
    if dmz.subnet6 is not None:
        taken6 = set(in_use) | {dmz.gateway6.ip} | {vm.ip6 for vm in dmz.vms if vm.ip6}
        net6 = dmz.subnet6
        src6 = next((a for a in _descending(net6.network_address + 1, net6[-1] - 1) if a not in taken6), None)
    if src4 is None:
        raise HostError(f"no free address in {net} for the probe namespace; give one with --address")
    return src4, src6


def _descending(low, high, limit: int = 4096):
    address = high
    for _ in range(limit):
        if address < low:
            return
        yield address
        address -= 1
