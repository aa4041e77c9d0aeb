"""`dmzctl verify`: prove a live DMZ's isolation with real packets, from inside the DMZ.

A temporary network namespace is attached to the DMZ bridge by a veth pair and
given a free DMZ address: it stands where a VM stands. From there it probes
  - a sample address (the first usable one) of each protected prefix,
  - the host's own addresses (the gateways always; others from `ip -j addr`),
  - each hole's destination, on its port and just outside it (nothing broader),
  - the explicit --target addresses (the only way to probe egress),
and compares what it observes with what `dmzctl explain` says the policy does.
It sends nothing to any other address: it never scans.

Observation: a probe that gets any answer (a reply, a TCP RST, an ICMP error)
was not dropped by the firewall; a probe that gets nothing within the timeout
was. An allowed-by-policy probe without an answer is "unconfirmed" (nothing may
listen there, or the target drops it itself): reported, and not a match.

The probes run in the namespace as `python -m dmzctl.verify` (the agent below,
JSON on stdin and stdout); the tests use the same agent.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

# The agent runs in a fresh interpreter inside the namespace: keep the imports it
# needs above (standard library only); dmzctl's own modules are imported lazily.

ANSWERED = ("connected", "refused", "reply", "unreachable")
ICMP4_ERRORS = {3: "destination unreachable", 11: "time exceeded", 12: "parameter problem"}
ICMP6_ERRORS = {1: "destination unreachable", 2: "packet too big", 3: "time exceeded", 4: "parameter problem"}
ICMP_REPLY_TYPE = {8: 0, 13: 14, 128: 129}


# --- the agent: probes run inside a namespace ---------------------------------

def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _sockaddr(address: str, port: int = 0):
    return (address, port, 0, 0) if ":" in address else (address, port)


def dns_query(qid: int) -> bytes:
    """A CHAOS TXT query for version.bind: a DNS server answers it itself, it is never forwarded."""
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x07version\x04bind\x00" + struct.pack("!HH", 16, 3)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def sctp_init(sport: int, dport: int, extra: bytes = b"") -> bytes:
    """An SCTP packet holding one INIT chunk (and, for the tests, a token after it)."""
    init = struct.pack("!BBHIIHHI", 1, 0, 20, random.randrange(1, 2**32), 65535, 1, 1, random.randrange(2**32))
    if extra:
        extra += b"\0" * (-len(extra) % 4)
        extra = struct.pack("!BBH", 0xFE, 0, 4 + len(extra)) + extra
    packet = struct.pack("!HHII", sport, dport, 0, 0) + init + extra
    crc = _crc32c(packet)
    return packet[:8] + struct.pack("<I", crc) + packet[12:]


def _result(spec: dict, observed: str, detail: str, began: float) -> dict:
    return {"id": spec["id"], "observed": observed, "detail": detail,
            "elapsed": round(time.monotonic() - began, 3)}


def _os_error(spec: dict, error: OSError, began: float) -> dict:
    if error.errno == errno.ECONNREFUSED:
        return _result(spec, "refused", "connection refused (RST or ICMP port unreachable)", began)
    if error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPROTO, errno.ECONNRESET):
        return _result(spec, "unreachable", os.strerror(error.errno), began)
    if error.errno in (errno.EACCES, errno.EPERM):
        return _result(spec, "error", f"sending refused locally: {os.strerror(error.errno)}", began)
    return _result(spec, "error", str(error), began)


def probe_tcp(spec: dict) -> dict:
    began = time.monotonic()
    with socket.socket(_family(spec["dst"]), socket.SOCK_STREAM) as sock:
        sock.settimeout(spec["timeout"])
        if spec.get("src"):
            sock.bind(_sockaddr(spec["src"]))
        try:
            sock.connect(_sockaddr(spec["dst"], spec["port"]))
        except socket.timeout:
            return _result(spec, "timeout", "no answer", began)
        except OSError as error:
            return _os_error(spec, error, began)
        detail = "connected"
        if spec.get("token"):
            try:
                sock.sendall(spec["token"].encode() + b"\n")
                sock.settimeout(min(spec["timeout"], 1.0))
                answer = sock.recv(256)
                detail = f"connected, answered {answer[:40]!r}"
            except OSError:
                pass
        return _result(spec, "connected", detail, began)


def probe_udp(spec: dict) -> dict:
    began = time.monotonic()
    with socket.socket(_family(spec["dst"]), socket.SOCK_DGRAM) as sock:
        if spec.get("src"):
            sock.bind(_sockaddr(spec["src"]))
        payload = dns_query(random.randrange(65536)) if spec.get("payload") == "dns" else \
            (spec.get("token") or "dmzctl verify probe").encode()
        try:
            sock.connect(_sockaddr(spec["dst"], spec["port"]))
            sock.send(payload)
        except OSError as error:
            return _os_error(spec, error, began)
        remaining = began + spec["timeout"] - time.monotonic()
        if remaining <= 0:
            return _result(spec, "timeout", "no answer", began)
        sock.settimeout(remaining)
        try:
            answer = sock.recv(2048)
        except socket.timeout:
            return _result(spec, "timeout", "no answer", began)
        except OSError as error:
            return _os_error(spec, error, began)
        return _result(spec, "reply", f"{len(answer)} bytes back", began)


def _icmp_socket(dst: str, proto: Optional[int] = None):
    if ":" in dst:
        return socket.socket(socket.AF_INET6, socket.SOCK_RAW, proto or socket.IPPROTO_ICMPV6)
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, proto or socket.IPPROTO_ICMP)


def _icmp_message(data: bytes, v6: bool) -> tuple[str, bytes]:
    """(source, ICMP message) from what a raw ICMP socket received."""
    if v6:
        return "", data  # IPv6 raw sockets deliver no IP header; the source comes from recvfrom
    header_length = (data[0] & 0x0F) * 4
    return socket.inet_ntoa(data[12:16]), data[header_length:]


def _embedded(message: bytes, v6: bool) -> Optional[tuple[str, int, bytes]]:
    """(destination, protocol, payload) of the packet an ICMP error quotes."""
    inner = message[8:]
    if v6:
        if len(inner) < 40:
            return None
        return socket.inet_ntop(socket.AF_INET6, inner[24:40]), inner[6], inner[40:]
    if len(inner) < 20:
        return None
    length = (inner[0] & 0x0F) * 4
    return socket.inet_ntoa(inner[16:20]), inner[9], inner[length:]


def _packets(sockets: list, deadline: float):
    """(socket, data, peer) for each packet that arrives on `sockets` before the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select(sockets, [], [], remaining)
        if not ready:
            return
        for handle in ready:
            data, peer = handle.recvfrom(4096)
            yield handle, data, peer


def probe_icmp(spec: dict) -> dict:
    """An ICMP/ICMPv6 message with an identifier; waits for the matching reply or an error quoting it."""
    began = time.monotonic()
    dst = spec["dst"]
    v6 = ":" in dst
    kind = spec.get("icmp_type") if spec.get("icmp_type") is not None else (128 if v6 else 8)
    ident = spec["ident"] & 0xFFFF
    body = struct.pack("!HH", ident, 1)
    if kind == 13 and not v6:
        now = int(time.time() % 86400 * 1000)
        body += struct.pack("!III", now, 0, 0)
    body += (spec.get("token") or "dmzctl verify").encode()
    message = struct.pack("!BBH", kind, 0, 0) + body
    if not v6:
        message = struct.pack("!BBH", kind, 0, _checksum(message)) + body
    with _icmp_socket(dst) as sock:
        if spec.get("src"):
            sock.bind(_sockaddr(spec["src"]))
        try:
            sock.sendto(message, _sockaddr(dst))
        except OSError as error:
            return _os_error(spec, error, began)
        errors = ICMP6_ERRORS if v6 else ICMP4_ERRORS
        for _handle, data, peer in _packets([sock], began + spec["timeout"]):
            source, reply = _icmp_message(data, v6)
            source = source or peer[0]
            if len(reply) < 8:
                continue
            rtype, code = reply[0], reply[1]
            if rtype in errors:
                quoted = _embedded(reply, v6)
                if quoted and ipaddress.ip_address(quoted[0]) == ipaddress.ip_address(dst) \
                        and quoted[1] == (58 if v6 else 1) and quoted[2][4:6] == struct.pack("!H", ident):
                    return _result(spec, "unreachable", f"{errors[rtype]} (code {code}) from {source}", began)
                continue
            if ipaddress.ip_address(source) != ipaddress.ip_address(dst):
                continue
            if rtype == kind:
                continue  # our own request, looped back on the loopback or seen by the raw socket
            if reply[4:6] == struct.pack("!H", ident):
                return _result(spec, "reply", f"ICMP type {rtype} back", began)
        return _result(spec, "timeout", "no answer", began)


def probe_raw(spec: dict) -> dict:
    """Another IP protocol (GRE, SCTP without the kernel's SCTP, ...): any packet back or an ICMP error."""
    began = time.monotonic()
    dst = spec["dst"]
    v6 = ":" in dst
    proto = spec["ipproto"]
    token = (spec.get("token") or "").encode()
    if proto == 132:
        payload = sctp_init(random.randrange(1024, 65536), spec.get("port") or 9, token)
    elif proto == 47:
        payload = struct.pack("!HH", 0, 0x88B5) + token  # GRE, local experimental ethertype
    else:
        payload = token or b"dmzctl verify"
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto) as sock, \
            _icmp_socket(dst) as icmp:
        if spec.get("src"):
            sock.bind(_sockaddr(spec["src"]))
            icmp.bind(_sockaddr(spec["src"]))
        try:
            sock.sendto(payload, _sockaddr(dst))
        except OSError as error:
            return _os_error(spec, error, began)
        errors = ICMP6_ERRORS if v6 else ICMP4_ERRORS
        for handle, data, peer in _packets([sock, icmp], began + spec["timeout"]):
            if handle is sock:
                source = peer[0] if v6 else socket.inet_ntoa(data[12:16])
                if ipaddress.ip_address(source) == ipaddress.ip_address(dst):
                    return _result(spec, "reply", f"protocol {proto} packet back", began)
                continue
            source, message = _icmp_message(data, v6)
            source = source or peer[0]
            if len(message) < 8 or message[0] not in errors:
                continue
            quoted = _embedded(message, v6)
            if quoted and quoted[1] == proto and ipaddress.ip_address(quoted[0]) == ipaddress.ip_address(dst) \
                    and (not token or token in quoted[2] or len(quoted[2]) < len(payload)):
                return _result(spec, "unreachable", f"{errors[message[0]]} (code {message[1]}) from {source}",
                               began)
        return _result(spec, "timeout", "no answer", began)


def probe_sctp(spec: dict) -> dict:
    """The kernel's SCTP when it has it (a real association attempt), else a crafted INIT."""
    began = time.monotonic()
    if not spec.get("token"):
        try:
            sock = socket.socket(_family(spec["dst"]), socket.SOCK_STREAM, 132)
        except OSError:
            sock = None
        if sock is not None:
            with sock:
                sock.settimeout(spec["timeout"])
                if spec.get("src"):
                    sock.bind(_sockaddr(spec["src"]))
                try:
                    sock.connect(_sockaddr(spec["dst"], spec["port"]))
                except socket.timeout:
                    return _result(spec, "timeout", "no answer", began)
                except OSError as error:
                    return _os_error(spec, error, began)
                return _result(spec, "connected", "SCTP association established", began)
    return probe_raw(dict(spec, ipproto=132))


PROBES = {"tcp": probe_tcp, "udp": probe_udp, "icmp": probe_icmp, "icmpv6": probe_icmp,
          "sctp": probe_sctp, "raw": probe_raw}


def run_probe(spec: dict) -> dict:
    try:
        if spec.get("delay"):
            time.sleep(spec["delay"])
        return PROBES[spec["proto"]](spec)
    except Exception as error:  # one broken probe must not hide the others' results
        return {"id": spec["id"], "observed": "error", "detail": f"{type(error).__name__}: {error}", "elapsed": 0}


def run_probes(specs: Sequence[dict], workers: int = 64) -> list[dict]:
    """All probes at once (each waits at most its timeout), results in the same order."""
    base = random.randrange(65536)
    specs = [dict(spec, ident=(base + index) & 0xFFFF) for index, spec in enumerate(specs)]
    if not specs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(specs))) as pool:
        return list(pool.map(run_probe, specs))


def agent_main() -> None:
    """`python -m dmzctl.verify`: {"probes": [...]} on stdin, {"results": [...]} on stdout."""
    request = json.load(sys.stdin)
    json.dump({"results": run_probes(request["probes"])}, sys.stdout)
    sys.stdout.write("\n")


# --- the plan: which probes, and what the policy says of each (pure) ----------

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
        proto = self.proto
        if proto in ("tcp", "udp", "icmp", "icmpv6", "sctp"):
            spec = {"proto": proto}
        else:
            from .explain import PROTO_NUMBERS

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


SAMPLE_PROBES = (("tcp", 22), ("udp", 53), ("icmp", None))


def sample_address(net):
    """The first usable address of a prefix (the address itself for a host prefix)."""
    if net.num_addresses <= 2:
        return net.network_address
    return net.network_address + 1


# The sample that matters most in a range: the cloud metadata service an attacker asks first.
PREFERRED_SAMPLES = {ipaddress.ip_network("169.254.0.0/16"): ipaddress.ip_address("169.254.169.254")}


def implicit_sample(net, hosts) -> Optional[object]:
    """An address of an implicitly blocked prefix that is not one of the host's own (a host address
    is judged by the to-host rules, and the row would not test the class): None when there is none."""
    if PREFERRED_SAMPLES.get(net) is not None and PREFERRED_SAMPLES[net] not in hosts:
        return PREFERRED_SAMPLES[net]
    if net.num_addresses <= 2:
        return None if net.network_address in hosts else net.network_address
    for offset in range(2, min(net.num_addresses - 1, 18)):
        candidate = net.network_address + offset
        if candidate not in hosts:
            return candidate
    return None


def _edge_port(ports: tuple[int, int]) -> int:
    return ports[1] + 1 if ports[1] < 65535 else ports[0] - 1


def plan(dmz, src4, src6, host_addresses: Iterable = (), targets: Iterable = (),
         bridge_netfilter: Optional[bool] = None, blocks=None,
         skip: Iterable = ()) -> tuple[list[Probe], list[str]]:
    """The probes for one DMZ from (src4, src6), each with the policy's expected decision.

    targets: (address, port or None) pairs. blocks: the implicit blocks the table holds
    (None: those known without the host). skip: prefixes never probed.
    Returns (probes, notes about what is not probed).
    """
    from .explain import Flow, explain, host_address_set
    from .implicit import HostView, blocks_for

    if blocks is None:
        blocks = blocks_for(dmz, HostView())
    hosts = host_address_set(dmz, host_addresses)
    skip_nets = [ipaddress.ip_network(s, strict=False) for s in skip]
    probes: list[Probe] = []
    seen: set = set()
    notes: list[str] = []

    def add(kind, dst, proto, port=None, icmp_type=None, note=""):
        dst = ipaddress.ip_address(dst)
        if proto == "icmp" and dst.version == 6:
            proto = "icmpv6"
        src = src4 if dst.version == 4 else src6
        if src is None or any(dst.version == net.version and dst in net for net in skip_nets):
            return
        key = (dst, proto, port, icmp_type)
        if key in seen:
            return
        seen.add(key)
        flow = Flow(dst=dst, proto=proto, src=src, port=port, icmp_type=icmp_type)
        decision = explain(dmz, flow, hosts, bridge_netfilter, blocks)
        probes.append(Probe(id=f"p{len(probes) + 1}", kind=kind, dst=dst, proto=proto, port=port,
                            icmp_type=icmp_type, note=note, expected=decision))

    if src6 is None and (dmz.protected6 or any(h.family == 6 for h in dmz.holes)):
        notes.append("IPv6 not probed: the DMZ has no IPv6 (dmz.gateway6), so every IPv6 packet from it is "
                     "dropped as spoofed")
    for net in dmz.protected:
        for proto, port in SAMPLE_PROBES:
            add("protected", sample_address(net), proto, port, note=f"sample of protected {net}")
    for hole in dmz.holes:
        dst = sample_address(hole.to)
        port = hole.ports[0] if hole.ports else (22 if hole.proto in ("tcp", "sctp") else
                                                  53 if hole.proto == "udp" else None)
        whom = f" (from {hole.source_vm or hole.source_net})" if hole.source_vm or hole.source_net else ""
        add("hole", dst, hole.proto, port, note=f"tests hole {hole.origin}{whom}")
        if hole.ports:
            add("hole-edge", dst, hole.proto, _edge_port(hole.ports), note=f"just outside hole {hole.origin}")
    gateways = [dmz.gateway.ip] + ([dmz.gateway6.ip] if dmz.gateway6 else [])
    for address in gateways + sorted((a for a in hosts if a not in gateways), key=lambda a: (a.version, a)):
        for proto, port in SAMPLE_PROBES:
            add("host", address, proto, port, note="the host's DMZ gateway" if address in gateways
                else "the host's own address")
        if address in gateways:
            add("dns-gateway", address, "tcp", 53, note="DNS to the gateway")
    for block in blocks:
        if block.net.version == 6 and block.net.is_link_local:
            continue  # never routed: from the DMZ an IPv6 link-local address can only be the host's
        sample = implicit_sample(block.net, hosts)
        if sample is None:
            notes.append(f"{block.reason} ({block.net}) not probed: it holds only the host's own addresses")
            continue
        for proto, port in SAMPLE_PROBES:
            add(block.kind, sample, proto, port, note=f"sample of {block.reason} ({block.net})")
    for address, port in targets:
        add("target", address, "tcp", port or 443, note="explicit target")
        add("target", address, "icmp", note="explicit target")
    if not any(p.kind == "target" and p.expected.hook == "forward" and p.expected.decided_by in ("egress", "egress-any")
               for p in probes):
        notes.append(f"egress (\"{dmz.egress}\") not probed: give --target ADDR outside the protected subnets "
                     f"(verify sends nothing anywhere else)")
    return probes, notes


# --- the host: addresses, routes, br_netfilter ----------------------------------

IMPLICIT_KINDS = ("other-dmz", "host-net", "private")


def route_of(address) -> Optional[dict]:
    """How the host routes an address (`ip -j route get`); None when it has no route."""
    result = subprocess.run(["ip", "-j", "route", "get", str(address)], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        return None
    routes = json.loads(result.stdout or "[]")
    return routes[0] if routes else None


def stay_on_this_host(probes: list[Probe]) -> tuple[list[Probe], list[str]]:
    """Drop the samples of implicit blocks that the host routes through a gateway: nobody listed
    them, so verify sends them nothing that could leave this machine if the table failed. Samples
    on the host's own links (another DMZ, a libvirt network, a directly attached subnet) stay."""
    kept, notes, judged = [], [], {}
    for probe in probes:
        if probe.kind in IMPLICIT_KINDS:
            if probe.dst not in judged:
                route = route_of(probe.dst)
                judged[probe.dst] = route is not None and "gateway" not in route and route.get("type") != "unreachable"
                if not judged[probe.dst]:
                    via = f"via {route['gateway']} on {route.get('dev')}" if route and "gateway" in route else "nowhere"
                    notes.append(f"{probe.note.removeprefix('sample of ')}: not probed: the host routes "
                                 f"{probe.dst} {via}, beyond this machine")
            if not judged[probe.dst]:
                continue
        kept.append(probe)
    return kept, notes


def host_addresses_from_ip_json(data: list, skip: Iterable = ()) -> list:
    """Global addresses from `ip -j addr`, minus loopback, link-local and the --skip prefixes."""
    skip_nets = [ipaddress.ip_network(s, strict=False) for s in skip]
    found = []
    for link in data:
        for info in link.get("addr_info", []):
            try:
                address = ipaddress.ip_address(info.get("local", ""))
            except ValueError:
                continue
            if address.is_loopback or address.is_link_local or info.get("scope") == "host":
                continue
            if any(address.version == n.version and address in n for n in skip_nets):
                continue
            if address not in found:
                found.append(address)
    return found


def read_host_addresses(skip: Iterable = ()) -> list:
    try:
        result = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        from .errors import HostError

        raise HostError(f"cannot read the host's addresses with `ip -j addr`: {error}") from None
    if result.returncode != 0:
        from .errors import HostError

        raise HostError(f"`ip -j addr` failed: {result.stderr.strip()}")
    return host_addresses_from_ip_json(json.loads(result.stdout or "[]"), skip)


def read_bridge_netfilter() -> Optional[bool]:
    """Whether br_netfilter hands bridged IPv4 frames to the IP hooks (None: cannot tell)."""
    path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if not path.exists():
        return False if Path("/proc/sys/net").exists() else None
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return None


# --- the probe namespace ------------------------------------------------------

def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        from .errors import HostError

        raise HostError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def addresses_in_use(bridge: str) -> set:
    """Addresses seen on the bridge: the host's neighbour table and libvirt's DHCP leases."""
    used: set = set()
    result = _ip("-j", "neigh", "show", "dev", bridge, check=False)
    if result.returncode == 0 and result.stdout.strip():
        for entry in json.loads(result.stdout):
            if "FAILED" in entry.get("state", []):
                continue
            try:
                used.add(ipaddress.ip_address(entry["dst"]))
            except (KeyError, ValueError):
                pass
    status = Path(f"/var/lib/libvirt/dnsmasq/{bridge}.status")
    try:
        for lease in json.loads(status.read_text() or "[]"):
            try:
                used.add(ipaddress.ip_address(lease.get("ip-address", "")))
            except ValueError:
                pass
    except (OSError, ValueError):
        pass
    return used


def choose_addresses(dmz, in_use: set) -> tuple:
    """A free IPv4 address at the top of the half of the subnet DHCP does not hand out, and a free IPv6
    address at the top of the IPv6 subnet."""
    from .render.network import dhcp_range

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
        from .errors import HostError

        raise HostError(f"no free address in {net} for the probe namespace; give one with --address")
    return src4, src6


def _descending(low, high, limit: int = 4096):
    address = high
    for _ in range(limit):
        if address < low:
            return
        yield address
        address -= 1


class Interrupted(KeyboardInterrupt):
    """A signal arrived (TERM, HUP, INT): unwind through every `finally`, then leave like Ctrl+C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")


class ProbeNamespace:
    """A namespace on the DMZ bridge standing where a VM stands; removed on exit, whatever happens."""

    def __init__(self, bridge: str, src4, prefix4: int, gateway4, src6=None, prefix6: int = 64, gateway6=None,
                 isolated: bool = False, name: Optional[str] = None):
        tag = f"{os.getpid()}"[-7:]
        self.name = name or f"dmzv-{tag}"
        self.veth = f"dmzv{tag}h"
        self.bridge = bridge
        self.src4, self.prefix4, self.gateway4 = src4, prefix4, gateway4
        self.src6, self.prefix6, self.gateway6 = src6, prefix6, gateway6
        self.isolated = isolated
        self.agent: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ProbeNamespace":
        try:
            self._create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()

    def _create(self) -> None:
        from .errors import HostError

        if not Path(f"/sys/class/net/{self.bridge}/bridge").exists():
            raise HostError(f"bridge {self.bridge} does not exist: is the DMZ up (dmzctl up)?")
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        _ip("link", "set", self.veth, "master", self.bridge)
        if self.isolated:
            subprocess.run(["bridge", "link", "set", "dev", self.veth, "isolated", "on"],
                           capture_output=True, timeout=10)
        _ip("link", "set", self.veth, "up")
        ns = ("-n", self.name)
        # A VM-like interface that takes no addresses or routes from router advertisements or redirects.
        for key, value in (("net.ipv6.conf.eth0.accept_ra", "0"), ("net.ipv6.conf.eth0.autoconf", "0"),
                           ("net.ipv6.conf.eth0.accept_redirects", "0"),
                           ("net.ipv4.conf.eth0.accept_redirects", "0")):
            self.run(["sysctl", "-q", "-w", f"{key}={value}"], check=False)
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "addr", "add", f"{self.src4}/{self.prefix4}", "dev", "eth0")
        if self.src6 is not None:
            _ip(*ns, "addr", "add", f"{self.src6}/{self.prefix6}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "route", "add", "default", "via", str(self.gateway4))
        if self.src6 is not None and self.gateway6 is not None:
            self._wait_dad()
            _ip(*ns, "-6", "route", "add", "default", "via", str(self.gateway6))

    def _wait_dad(self, limit: float = 10.0) -> None:
        from .errors import HostError

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            result = _ip("-n", self.name, "-j", "-6", "addr", "show", "dev", "eth0", check=False)
            infos = [i for link in json.loads(result.stdout or "[]") for i in link.get("addr_info", [])
                     if i.get("local") == str(self.src6)]
            if infos and infos[0].get("dadfailed"):
                raise HostError(f"{self.src6} is already in use in the DMZ; give another with --address6")
            if infos and not infos[0].get("tentative"):
                return
            time.sleep(0.1)
        raise HostError(f"duplicate address detection for {self.src6} did not finish")

    def wait_forwarding(self, limit: Optional[float] = None) -> None:
        """The first packets through a fresh bridge port are lost while STP walks it to forwarding."""
        from .errors import HostError

        if limit is None:
            try:
                delay = int(Path(f"/sys/class/net/{self.bridge}/bridge/forward_delay").read_text()) / 100
            except (OSError, ValueError):
                delay = 15.0
            limit = 2 * max(delay, 2.0) + 5
        state_file = Path(f"/sys/class/net/{self.veth}/brport/state")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                if state_file.read_text().strip() == "3":  # BR_STATE_FORWARDING
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise HostError(f"bridge port {self.veth} did not reach the forwarding state within {limit:.0f} s")

    def wait_gateway6(self, gateway6, limit: float = 10.0) -> None:
        """A bridge that had no port has no carrier: its IPv6 gateway address only now runs duplicate
        address detection, and answers no neighbour solicitation until that is done (~2 s)."""
        from .errors import HostError

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            result = _ip("-j", "-6", "addr", "show", "dev", self.bridge, check=False)
            infos = [i for link in json.loads(result.stdout or "[]") for i in link.get("addr_info", [])
                     if i.get("local") == str(gateway6)]
            if infos and infos[0].get("dadfailed"):
                raise HostError(f"the DMZ gateway {gateway6} failed duplicate address detection on {self.bridge}")
            if infos and not infos[0].get("tentative"):
                return
            time.sleep(0.1)
        raise HostError(f"the DMZ gateway {gateway6} is still tentative on {self.bridge} after {limit:.0f} s")

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                                **kwargs)
        if check and result.returncode != 0:
            from .errors import HostError

            raise HostError(f"in namespace {self.name}: {' '.join(argv)} failed: {result.stderr.strip()}")
        return result

    def probe(self, specs: list[dict], limit: float) -> list[dict]:
        return run_agent(self.name, specs, limit, self)

    def remove(self) -> None:
        # A second signal must not cut the clean-up short: hold them until it is done.
        signals = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            if self.agent is not None and self.agent.poll() is None:
                self.agent.kill()
                self.agent.wait()
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=15)
            if Path(f"/sys/class/net/{self.veth}").exists():
                subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=15)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_agent(netns: str, specs: list[dict], limit: float, owner=None) -> list[dict]:
    """Run the probes in a namespace through `python -m dmzctl.verify`; results in the specs' order."""
    from .errors import HostError

    process = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "dmzctl.verify"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if owner is not None:
        owner.agent = process
    try:
        out, err = process.communicate(json.dumps({"probes": specs}), timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise HostError(f"the probes in namespace {netns} did not finish within {limit:.0f} s") from None
    except BaseException:  # interrupted: the agent must not outlive us (nor keep its namespace alive)
        process.kill()
        process.wait()
        raise
    finally:
        if owner is not None:
            owner.agent = None
    if process.returncode != 0:
        raise HostError(f"the probe agent in namespace {netns} failed: {err.strip()[-500:]}")
    return json.loads(out)["results"]


# --- verify ------------------------------------------------------------------

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


def format_report(report: Report) -> str:
    lines = [f"{report.dmz}: probing from {report.src4}" + (f" and {report.src6}" if report.src6 else "")
             + f" (a temporary namespace on bridge {report.bridge})"]
    width = max([len(p.label()) for p in report.probes] + [10])
    lines.append(f"  {'STATUS':<11} {'EXPECTED':<8} {'OBSERVED':<12} {'PROBE':<{width}}  RULE / WHAT")
    for probe in report.probes:
        observed = {"connected": "answered", "refused": "answered", "reply": "answered",
                    "unreachable": "answered", "timeout": "no answer"}.get(probe.observed or "", probe.observed or "-")
        lines.append(f"  {probe.status:<11} {probe.expected.verdict:<8} {observed:<12} {probe.label():<{width}}  "
                     f"{probe.expected.rule}; {probe.note}"
                     + (f" [{probe.detail}]" if probe.status != "ok" and probe.detail else ""))
    for note in report.notes:
        lines.append(f"  note: {note}")
    for problem in report.problems:
        lines.append(f"  PROBLEM: {problem}")
    counts = report.counts()
    summary = (f"{counts['probes']} probes: {counts['blocked_as_expected']} blocked and "
               f"{counts['allowed_as_expected']} allowed as expected")
    bad = [f"{counts[k]} {k}" for k in ("MISMATCH", "unconfirmed", "error") if counts[k]]
    lines.append(f"{report.dmz}: {'OK' if report.ok else 'FAILED'}: {summary}" + (f"; {', '.join(bad)}" if bad else ""))
    return "\n".join(lines) + "\n"


def _table_state(dmz):
    from .host import nft
    from .render.nft import table_name

    return nft.canonical(nft.list_table(table_name(dmz)))


def _handle_signals(handler: Callable) -> dict:
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def verify(dmz, targets: Iterable = (), skip: Iterable = (), host_addresses: Optional[Iterable] = None,
           address=None, address6=None, timeout: float = 4.0, bridge_netfilter: Optional[bool] = None,
           say: Callable[[str], None] = lambda _m: None) -> Report:
    """Probe the live DMZ from a temporary namespace; the namespace is gone when this returns or raises."""
    from .errors import HostError
    from .ops.common import require_root, table_only as build_table_only
    from .state import observe_table

    require_root()
    report = Report(dmz=dmz.name, bridge=dmz.bridge)
    skip = list(skip)
    for prefix in skip:
        try:
            ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            from .errors import ConfigError

            raise ConfigError([f"--skip: {prefix!r} is not an address or ADDR/PREFIX"]) from None
    if host_addresses is None:
        host_addresses = read_host_addresses(skip)
    if bridge_netfilter is None:
        bridge_netfilter = read_bridge_netfilter()
    if not Path(f"/sys/class/net/{dmz.bridge}/bridge").exists():
        raise HostError(f"DMZ {dmz.name}: bridge {dmz.bridge} does not exist; bring the DMZ up first (dmzctl up)")
    before = _table_state(dmz)
    table_now = build_table_only(dmz)
    if before is None:
        report.problems.append(f"firewall table inet dmzctl-{dmz.name} is absent: nothing but the per-VM "
                               f"nwfilters protects the LAN and the host")
    elif not observe_table(table_now).in_sync:
        report.problems.append(f"firewall table inet dmzctl-{dmz.name} differs from the config "
                               f"(dmzctl status; dmzctl firewall up)")

    in_use = addresses_in_use(dmz.bridge)
    if address is None or (address6 is None and dmz.subnet6 is not None):
        auto4, auto6 = choose_addresses(dmz, in_use)
        address = address or auto4
        address6 = address6 or auto6
    try:
        address = ipaddress.ip_address(address)
        address6 = ipaddress.ip_address(address6) if address6 is not None else None
    except ValueError as error:
        from .errors import ConfigError

        raise ConfigError([f"--address/--address6: {error}"]) from None
    if address.version != 4 or address not in dmz.subnet or address == dmz.gateway.ip:
        raise HostError(f"--address {address} must be a free address inside {dmz.subnet}, not the gateway")
    if address6 is not None:
        if dmz.subnet6 is None or address6.version != 6 or address6 not in dmz.subnet6 \
                or address6 == dmz.gateway6.ip:
            raise HostError(f"--address6 {address6} must be a free address inside the DMZ's IPv6 subnet")
    report.src4, report.src6 = str(address), (str(address6) if address6 else None)

    parsed_targets = []
    for target in targets:
        from .explain import parse_target

        parsed_targets.append(parse_target(str(target)))
    probes, notes = plan(dmz, address, address6, host_addresses, parsed_targets, bridge_netfilter,
                         table_now.blocks, skip)
    probes, beyond = stay_on_this_host(probes)
    report.probes, report.notes = probes, notes + beyond

    def on_signal(signum, _frame):
        raise Interrupted(signum)

    previous = _handle_signals(on_signal)
    try:
        with ProbeNamespace(dmz.bridge, address, dmz.subnet.prefixlen, dmz.gateway.ip,
                            address6, dmz.subnet6.prefixlen if dmz.subnet6 else 64,
                            dmz.gateway6.ip if dmz.gateway6 else None, isolated=dmz.isolate_vms) as ns:
            say(f"{dmz.name}: probe namespace {ns.name} at {address}"
                + (f" / {address6}" if address6 else "") + f"; waiting for bridge port {ns.veth} to forward")
            ns.wait_forwarding()
            if address6 is not None and dmz.gateway6 is not None:
                ns.wait_gateway6(dmz.gateway6.ip)
            specs = [p.spec(str(address) if p.dst.version == 4 else str(address6), timeout) for p in probes]
            say(f"{dmz.name}: sending {len(specs)} probes (timeout {timeout:g} s each, in parallel)")
            results = {r["id"]: r for r in ns.probe(specs, limit=timeout * 3 + 30)}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for probe in probes:
        result = results.get(probe.id, {})
        probe.observed = result.get("observed", "error")
        probe.detail = result.get("detail", "no result")
    after = _table_state(dmz)
    if before is not None and after != before:
        report.problems.append(f"firewall table inet dmzctl-{dmz.name} "
                               f"{'vanished' if after is None else 'changed'} while verify ran: its results "
                               f"do not describe one policy; run verify again")
    return report


if __name__ == "__main__":
    agent_main()
