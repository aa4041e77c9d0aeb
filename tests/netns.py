"""A throwaway test world in network namespaces, and a packet sink to run inside them.

Everything it creates is named with the prefix `dmzt-` and lives on this machine
only: namespaces, veth pairs to the host, and (through dmzctl) the DMZ bridge.
Nothing is ever sent to the machine's own link (192.0.2.0/24, fd00::/64).

  dmzt-lan  the protected LAN: 10.232.0.{10,25,53}, fdd0:232::{10,25,53};
            the host's LAN address is 10.232.0.1 / fdd0:232::1 (veth dmzt-lan-h)
  dmzt-wan  the host's uplink router: 10.233.0.100 / fdd0:233::100 on the link 10.233.0.0/24 /
            fdd0:233::/64 (host 10.233.0.1 / fdd0:233::1), and behind it, routed by the host
            through it: "the internet" 198.18.33.100 / 2001:db8:33::100 (not private: egress
            reaches it) and a private network 172.16.33.100 / fd99:33::100 (blocked unlisted)
  dmzt-<vm> DMZ "VMs": a veth whose host end is a port of the DMZ bridge

Sinks (`python tests/netns.py sink ...`) listen on TCP and UDP ports and hold raw
sockets for ICMP, ICMPv6, GRE and SCTP; every payload carrying a token
(DMZT-<12 hex>) is written to a JSON-lines log: a probe arrived or it did not.
Probes are sent with dmzctl's own probe agent (`python -m dmzctl.verify`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PREFIX = "dmzt-"
TOKEN_RE = re.compile(rb"DMZT-[0-9a-f]{12}")
IP_FREEBIND = 15
IPV6_FREEBIND = 78
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
FORBIDDEN = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("fd00::/64")]


def new_token() -> str:
    return f"DMZT-{secrets.token_hex(6)}"


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], check=check)


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_list() -> list[str]:
    out = ip("-j", "netns", "list", check=False).stdout.strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def _check_safe(address: str) -> None:
    addr = ipaddress.ip_interface(address).ip
    if any(addr.version == net.version and addr in net for net in FORBIDDEN):
        raise AssertionError(f"{address} is on the machine's own link: tests never use it")


def cleanup_stale() -> None:
    """Remove what an earlier, killed run of these tests left behind (only `dmzt-` names)."""
    for name in netns_list():
        if name.startswith(PREFIX):
            ip("netns", "del", name, check=False)
    for path in Path("/sys/class/net").iterdir():
        if path.name.startswith(PREFIX) and path.name.endswith("-h"):
            ip("link", "del", path.name, check=False)


class Sink:
    """A sink process (in a namespace, or in the host's namespace when netns is None)."""

    def __init__(self, workdir: Path, label: str, netns: Optional[str], binds: list[str], tcp: list[int],
                 udp: list[int], raw: list[int]):
        self.log = workdir / f"sink-{label}.jsonl"
        ready = workdir / f"sink-{label}.ready"
        argv = [sys.executable, str(Path(__file__).resolve()), "sink", "--log", str(self.log),
                "--ready", str(ready), "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)),
                "--raw", ",".join(map(str, raw))]
        for address in binds:
            _check_safe(address)
            argv += ["--bind", address]
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.stderr = open(workdir / f"sink-{label}.err", "w")
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sink {label} did not start: {(workdir / f'sink-{label}.err').read_text()}")
            time.sleep(0.05)

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


class Node:
    """A namespace with one interface (eth0) joined to the host by a veth pair."""

    def __init__(self, name: str, addresses: list[str], gateways: list[str], host_end: str):
        self.name = name
        self.netns = PREFIX + name
        self.host_end = host_end
        self.addresses = addresses  # "addr/prefix"
        self.gateways = gateways
        self.sink: Optional[Sink] = None

    @property
    def ip4(self) -> str:
        return next(a.split("/")[0] for a in self.addresses if ":" not in a)

    @property
    def ip6(self) -> str:
        return next(a.split("/")[0] for a in self.addresses if ":" in a)

    def address(self, family: int) -> str:
        return self.ip4 if family == 4 else self.ip6

    def exec(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.netns, *argv], check=check)

    def create(self, host_addresses: list[str] = (), bridge: Optional[str] = None) -> None:
        for address in list(self.addresses) + list(host_addresses):
            _check_safe(address)
        ip("netns", "add", self.netns)
        ip("link", "add", self.host_end, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        if bridge:
            ip("link", "set", self.host_end, "master", bridge)
        for address in host_addresses:
            ip("addr", "add", address, "dev", self.host_end, *(["nodad"] if ":" in address else []))
        ip("link", "set", self.host_end, "up")
        for key in ("net.ipv6.conf.all.accept_ra", "net.ipv6.conf.eth0.accept_ra", "net.ipv6.conf.eth0.autoconf",
                    "net.ipv6.conf.all.accept_redirects", "net.ipv4.conf.all.accept_redirects",
                    "net.ipv4.conf.eth0.accept_redirects", "net.ipv6.conf.eth0.accept_redirects"):
            self.exec(["sysctl", "-q", "-w", f"{key}=0"], check=False)
        ns = ("-n", self.netns)
        ip(*ns, "link", "set", "lo", "up")
        for address in self.addresses:
            ip(*ns, "addr", "add", address, "dev", "eth0", *(["nodad"] if ":" in address else []))
        ip(*ns, "link", "set", "eth0", "up")
        for gateway in self.gateways:
            ip(*ns, "-6" if ":" in gateway else "-4", "route", "add", "default", "via", gateway)

    def add_address(self, address: str) -> None:
        _check_safe(address)
        ip("-n", self.netns, "addr", "add", address, "dev", "eth0", *(["nodad"] if ":" in address else []))

    def add_route(self, prefix: str, via: str) -> None:
        ip("-n", self.netns, "-6" if ":" in prefix else "-4", "route", "add", prefix, "via", via)

    def destroy(self) -> None:
        if self.sink is not None:
            self.sink.stop()
            self.sink = None
        ip("netns", "del", self.netns, check=False)
        if link_exists(self.host_end):
            ip("link", "del", self.host_end, check=False)

    def port_state(self) -> Optional[str]:
        try:
            return Path(f"/sys/class/net/{self.host_end}/brport/state").read_text().strip()
        except OSError:
            return None

    def set_isolated(self, on: bool) -> None:
        """What libvirt does for <port isolated='yes'/> on a guest's tap device."""
        run(["bridge", "link", "set", "dev", self.host_end, "isolated", "on" if on else "off"])


def probe(node: Node, specs: list[dict], limit: float = 60) -> list[dict]:
    from dmzctl.verify import run_agent

    return run_agent(node.netns, specs, limit)


def wait_until(predicate, limit: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# --- the world the isolation tests share --------------------------------------

LAN_HOST = ["10.232.0.1/24", "fdd0:232::1/64"]   # the host's own LAN address
WAN_HOST = ["10.233.0.1/24", "fdd0:233::1/64"]   # the host's own "wan" address
# Beyond the wan router (routes on the host): the internet, and a private network out there.
INTERNET = ("198.18.33.100", "2001:db8:33::100")
PRIVATE_BEYOND = ("172.16.33.100", "fd99:33::100")
BEYOND_ROUTES = [("198.18.33.0/24", "10.233.0.100"), ("2001:db8:33::/64", "fdd0:233::100"),
                 ("172.16.33.0/24", "10.233.0.100"), ("fd99:33::/64", "fdd0:233::100")]
HOST_ADDRESSES = ["10.232.0.1", "fdd0:232::1", "10.233.0.1", "fdd0:233::1"]  # besides the DMZ gateways
DMZ_GATEWAYS = ["10.231.0.1", "fdd0:231::1"]
SINK_RAW = [1, 4, 41, 47, 58, 132]  # ICMP, IP-in-IP, IPv6-in-IPv4, GRE, ICMPv6, SCTP
LAN_TCP = [22, 25, 26, 53, 54, 80, 123, 586, 587, 588, 589]
LAN_UDP = [25, 53, 54, 123, 124, 5000]
HOST_TCP = [7022, 7080]
HOST_UDP = [7000, 7023]
VM_TCP = [80]
VM_UDP = [5000]


class World:
    """The LAN and "wan" namespaces with their sinks, and a sink on the host's own test addresses."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.nodes: dict[str, Node] = {}
        self.host_sink: Optional[Sink] = None
        self.routes: list[tuple[str, str]] = []  # host routes through the wan router

    def __enter__(self) -> "World":
        cleanup_stale()
        try:
            lan = self._node("lan", ["10.232.0.10/24", "10.232.0.25/24", "10.232.0.53/24",
                                     "fdd0:232::10/64", "fdd0:232::25/64", "fdd0:232::53/64"],
                             ["10.232.0.1", "fdd0:232::1"], host_addresses=LAN_HOST)
            lan.sink = Sink(self.workdir, "lan", lan.netns, [a.split("/")[0] for a in lan.addresses],
                            LAN_TCP, LAN_UDP, SINK_RAW)
            wan = self._node("wan", ["10.233.0.100/24", "fdd0:233::100/64"], ["10.233.0.1", "fdd0:233::1"],
                             host_addresses=WAN_HOST)
            beyond = list(INTERNET + PRIVATE_BEYOND)
            for address in beyond:
                wan.add_address(f"{address}/{128 if ':' in address else 32}")
            for prefix, via in BEYOND_ROUTES:
                ip("-6" if ":" in prefix else "-4", "route", "replace", prefix, "via", via)
            self.routes = list(BEYOND_ROUTES)
            wan.sink = Sink(self.workdir, "wan", wan.netns, [wan.ip4, wan.ip6] + beyond, VM_TCP, VM_UDP, SINK_RAW)
            # Bound with IP_FREEBIND: the gateways come and go with the DMZ, the sockets stay.
            self.host_sink = Sink(self.workdir, "host", None, DMZ_GATEWAYS + HOST_ADDRESSES, HOST_TCP, HOST_UDP,
                                  SINK_RAW)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _node(self, name: str, addresses: list[str], gateways: list[str], host_addresses=(),
              bridge: Optional[str] = None) -> Node:
        node = Node(name, addresses, gateways, f"{PREFIX}{name}-h")
        self.nodes[name] = node  # registered first: a half-made node is removed too
        node.create(host_addresses=list(host_addresses), bridge=bridge)
        return node

    def add_vm(self, name: str, ip4: str, ip6: str, bridge: str) -> Node:
        node = self._node(name, [f"{ip4}/24", f"{ip6}/64"], DMZ_GATEWAYS, bridge=bridge)
        node.sink = Sink(self.workdir, name, node.netns, [ip4, ip6], VM_TCP, VM_UDP, SINK_RAW)
        return node

    def remove(self, name: str) -> None:
        node = self.nodes.pop(name, None)
        if node is not None:
            node.destroy()

    def sinks(self) -> list[Sink]:
        return [n.sink for n in self.nodes.values() if n.sink] + ([self.host_sink] if self.host_sink else [])

    def tokens_seen(self) -> dict[str, dict]:
        seen = {}
        for sink in self.sinks():
            for record in sink.records():
                seen[record["token"]] = record
        return seen

    def close(self) -> None:
        for prefix, _via in self.routes:
            ip("-6" if ":" in prefix else "-4", "route", "del", prefix, check=False)
        self.routes = []
        for name in list(self.nodes):
            self.remove(name)
        if self.host_sink is not None:
            self.host_sink.stop()
            self.host_sink = None


def leftovers() -> list[str]:
    """Anything of ours still on the host."""
    found = [f"netns {n}" for n in netns_list() if n.startswith(PREFIX)]
    found += [f"link {p.name}" for p in Path("/sys/class/net").iterdir() if p.name.startswith(PREFIX)]
    return found


# --- a DMZ whose VMs are never started ------------------------------------------

def dmz_up_without_vms(dmz, say=lambda _m: None) -> None:
    """`dmzctl up` minus the VMs: network, nwfilters and the nft table, undone if a step fails.

    ops.lifecycle.up always starts the config's VMs; the VMs here are namespaces, so the
    steps before the VMs are called one by one, in up's order.
    """
    from dmzctl.host.virt import Virt
    from dmzctl.ops import common as lifecycle_common, lifecycle
    from dmzctl.settings import Settings

    from dmzctl.state import snapshot

    settings = Settings.from_environment()
    with Virt(settings.uri) as virt:
        snap = snapshot(virt, lifecycle_common.desired_state(virt, dmz, settings), settings.hooks_dir)
        lifecycle_common.preflight(virt, snap, [])  # no VM of these is ever started: their files are not checked
        outcome = lifecycle.Outcome(dmz.name, say)
        undo = lifecycle.Undo(say)
        try:
            lifecycle._up_network(virt, snap.desired, snap.observed, outcome, undo)
            lifecycle._up_nwfilters(virt, snap.desired, snap.observed, outcome, undo)
            lifecycle.apply_firewall(snap.desired, snap.observed.table, outcome, undo, settings)
        except BaseException:
            undo.run()
            raise


def dmz_down(dmz) -> None:
    from dmzctl.host.virt import Virt
    from dmzctl.ops import teardown
    from dmzctl.settings import Settings

    settings = Settings.from_environment()
    with Virt(settings.uri) as virt:
        if virt.network_info(dmz.name) is not None or Path(f"/sys/class/net/{dmz.bridge}").exists():
            teardown.destroy(virt, dmz, settings, say=lambda _m: None)
    from dmzctl.host import nft
    from dmzctl.render.nft import delete_batch, table_name

    if nft.firewall_exists(table_name(dmz)):
        nft.apply(delete_batch(table_name(dmz)))


def dmz_exists(dmz) -> bool:
    from dmzctl.host import nft
    from dmzctl.render.nft import table_name

    return Path(f"/sys/class/net/{dmz.bridge}").exists() or nft.firewall_exists(table_name(dmz))


def reapply_table(dmz) -> None:
    """Replace the DMZ's table whole (one transaction): counters and log limits start afresh."""
    from dmzctl.host import nft
    from dmzctl.ops.common import table_only
    from dmzctl.render.nft import apply_batch

    nft.apply(apply_batch(dmz, table_only(dmz).blocks))


def chain_counter(dmz, chain: str) -> int:
    """Packets counted by the counter rules of one chain of the DMZ's table."""
    from dmzctl.host import nft
    from dmzctl.render.nft import table_name

    listing = nft.list_table(table_name(dmz)) or {"nftables": []}
    total = 0
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == chain:
            for expr in rule["expr"]:
                if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                    total += expr["counter"]["packets"]
    return total


def kernel_log(prefix: str) -> list[str]:
    """Kernel log lines carrying prefix (nft `log` writes to the kernel log)."""
    text = run(["dmesg"], check=False).stdout
    return [line for line in text.splitlines() if prefix in line]


# --- the sink (runs inside a namespace) -----------------------------------------

def _bind(sock: socket.socket, address: str, port: int) -> None:
    if ":" in address:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind((address, port, 0, 0))
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((address, port))


def sink_main(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="netns.py sink")
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--tcp", default="")
    parser.add_argument("--udp", default="")
    parser.add_argument("--raw", default="")
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    options = parser.parse_args(args)
    ports = lambda text: [int(p) for p in text.split(",") if p]  # noqa: E731
    log = open(options.log, "a", buffering=1)

    def record(data: bytes, proto: str, src: str, dst: str, port: Optional[int] = None) -> None:
        for token in set(TOKEN_RE.findall(data)):
            log.write(json.dumps({"token": token.decode(), "proto": proto, "src": src, "dst": dst,
                                  "port": port}) + "\n")

    selector = selectors.DefaultSelector()
    for address in options.bind:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in ports(options.tcp):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(sock, address, port)
            sock.listen(64)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, ("listen", address, port))
        for port in ports(options.udp):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            _bind(sock, address, port)
            selector.register(sock, selectors.EVENT_READ, ("udp", address, port))
    for proto in ports(options.raw):
        families = [socket.AF_INET] if proto == 1 else [socket.AF_INET6] if proto == 58 else \
            [socket.AF_INET, socket.AF_INET6]
        for family in families:
            sock = socket.socket(family, socket.SOCK_RAW, proto)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            selector.register(sock, selectors.EVENT_READ, ("raw", family, proto))
    Path(options.ready).write_text(str(os.getpid()))

    names = {1: "icmp", 58: "icmpv6", 47: "gre", 132: "sctp"}
    while True:
        for key, _ in selector.select():
            sock, (kind, a, b) = key.fileobj, key.data
            try:
                if kind == "listen":
                    conn, _peer = sock.accept()
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, ("conn", a, b))
                elif kind == "conn":
                    data = sock.recv(4096)
                    if data:
                        peer = sock.getpeername()[0]
                        record(data, "tcp", peer, a, b)
                        sock.send(b"ok\n")
                    selector.unregister(sock)
                    sock.close()
                elif kind == "udp":
                    data, peer = sock.recvfrom(4096)
                    record(data, "udp", peer[0], a, b)
                    sock.sendto(data, peer)
                elif a == socket.AF_INET:
                    data = sock.recv(65535)
                    header = (data[0] & 0x0F) * 4
                    record(data[header:], names.get(b, str(b)), socket.inet_ntoa(data[12:16]),
                           socket.inet_ntoa(data[16:20]))
                else:
                    data, ancillary, _flags, peer = sock.recvmsg(65535, 256)
                    dst = ""
                    for level, ctype, cdata in ancillary:
                        if level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO:
                            dst = socket.inet_ntop(socket.AF_INET6, cdata[:16])
                    record(data, names.get(b, str(b)), peer[0], dst)
            except OSError:
                try:
                    selector.unregister(sock)
                    sock.close()
                except (KeyError, ValueError, OSError):
                    pass


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sink":
        sink_main(sys.argv[2:])
    else:
        sys.exit("usage: netns.py sink --log FILE --ready FILE [--bind ADDR]... [--tcp P,..] [--udp P,..] "
                 "[--raw PROTO,..]")
