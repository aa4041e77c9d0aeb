"""The DMZ's edges with real packets: publish (DNAT from the wan, hairpin from the LAN, IPv6 to the VM's
own address), inbound = "published" with and without lan_inbound, and the egress allowlist by prefix and
by DNS name (learned through the gateway's dnsmasq), each row also through `explain`, which must agree.

Topology, all on this machine: the DMZ edge-a (10.234.0.0/24, fdd0:234::/64) with one tiny guest,
edge-vm (a second VM, edge-vm2, is declared and never started: a `from` that is not this VM);
a "lan" namespace edge-lan (10.229.0.0/24, fdd0:229::/64, protected); a "wan" namespace edge-wan,
the host's uplink (198.18.100.0/24, 2001:db8:100::/64; the host is 198.18.100.1, its one "public"
address), holding the internet behind it (198.18.104.0/21, 198.18.112.0/21, 2001:db8:109::/64,
routed by the host through it) and a DNS server 198.18.109.53 (dnsmasq: mirror.test, other.test),
which is the DMZ network's forwarder.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from guest import dmzctl, guest_dir, in_guest, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ = "edge-a"
VM, VM2 = "edge-vm", "edge-vm2"
VM_IP, VM_IP6, VM2_IP = "10.234.0.10", "fdd0:234::10", "10.234.0.11"
LAN_NS, WAN_NS = "edge-lan", "edge-wan"
LAN_END, WAN_END = "edge-lan-h", "edge-wan-h"
LAN_HOST, LAN_HOST6 = "10.229.0.10", "fdd0:229::10"
PUBLIC, PUBLIC6 = "198.18.100.1", "2001:db8:100::1"      # the host's uplink address
WAN_ROUTER, WAN_ROUTER6 = "198.18.100.100", "2001:db8:100::100"
RESOLVER = "198.18.109.53"
MIRROR, MIRROR6, OTHER = "198.18.109.10", "2001:db8:109::10", "198.18.110.10"
PREFIX_OK, FROM_VM2, FROM_VM = "198.18.111.10", "198.18.112.10", "198.18.113.10"
BEYOND = [MIRROR, RESOLVER, OTHER, PREFIX_OK, FROM_VM2, FROM_VM]
BEYOND_ROUTES = [("198.18.104.0/21", WAN_ROUTER), ("198.18.112.0/21", WAN_ROUTER), ("2001:db8:109::/64", WAN_ROUTER6)]

CONFIG = """
[dmz]
name = "edge-a"
gateway = "10.234.0.1/24"
gateway6 = "fdd0:234::1/64"
protected = ["10.229.0.0/24", "fdd0:229::/64"]
egress = "allowlist"
dns_forwarders = ["198.18.109.53"]
lan_inbound = LAN_INBOUND

[[dmz.publish]]
to = "edge-vm"
proto = "tcp"
port = 8080
listen = "198.18.100.1"
listen_port = 80

[[dmz.publish]]
to = "edge-vm"
proto = "udp"
port = 8081
listen = "host"

[[dmz.egress_allow]]
to = "mirror.test"
proto = "tcp"
port = [80, 443]

[[dmz.egress_allow]]
to = "198.18.111.0/24"
proto = "tcp"
port = 80

[[dmz.egress_allow]]
to = "198.18.112.0/24"
proto = "tcp"
port = 80
from = "edge-vm2"

[[dmz.egress_allow]]
to = "198.18.113.0/24"
proto = "tcp"
port = 80
from = "edge-vm"

[[dmz.egress_allow]]          # the LAN: protected wins
to = "10.229.0.0/24"
proto = "tcp"
port = 80

[[dmz.egress_allow]]          # the uplink subnet (a host subnet) and the host itself: their blocks win
to = "198.18.100.0/24"
proto = "tcp"
port = "80-81"
"""


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=timeout)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def make_side(ns: str, host_end: str, host_addrs: list[str], ns_addrs: list[str], gateways: list[str]) -> None:
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
    for address in host_addrs:
        sh("ip", "addr", "add", address, "dev", host_end, *(["nodad"] if ":" in address else []))
    sh("ip", "link", "set", host_end, "up")
    in_ns(ns, "ip", "link", "set", "lo", "up")
    in_ns(ns, "ip", "link", "set", "eth0", "up")
    for address in ns_addrs:
        in_ns(ns, "ip", "addr", "add", address, "dev", "eth0", *(["nodad"] if ":" in address else []))
    for gateway in gateways:
        in_ns(ns, "ip", "-6" if ":" in gateway else "-4", "route", "add", "default", "via", gateway)


def remove_side(ns: str, host_end: str) -> None:
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        subprocess.run(["kill", pid], capture_output=True)
    sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", host_end, check=False)


PROBE = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
if proto == "tcp":
    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(3)
    try:
        s.connect((host, port)); print("connected")
    except ConnectionRefusedError:
        print("refused")
    except OSError:
        print("timeout")
else:
    s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(b"edge-probe", (host, port))
    try:
        s.recv(100); print("reply")
    except OSError:
        print("timeout")
"""


def from_ns(ns: str, proto: str, host: str, port: int) -> bool:
    """Whether a new flow from a namespace reaches its target (an answer of any kind)."""
    out = in_ns(ns, "python3", "-c", PROBE, proto, host, str(port)).stdout.strip()
    return out in ("connected", "refused", "reply")


def from_guest(host: str, port: int) -> bool:
    """Whether a TCP connection from the guest reaches its target (connected, or refused by it)."""
    rc, out = in_guest(VM_IP, f"echo x | timeout 3 nc {host} {port} 2>&1; echo rc=$?")
    return "rc=0" in out or "refused" in out


def lookup(name: str, server: str) -> str:
    _rc, out = in_guest(VM_IP, f"timeout 10 nslookup {name} {server} 2>&1")
    return out


def config_text(guest: Path, lan_inbound: bool) -> str:
    return (CONFIG.replace("LAN_INBOUND", "true" if lan_inbound else "false")
            + kernel_vm_toml(VM, VM_IP, "10.234.0.1/24", guest, ip6=VM_IP6, gateway6="fdd0:234::1/64",
                             extra_cmdline="dmz.udp=1 dmz.dns=10.234.0.1")
            + kernel_vm_toml(VM2, VM2_IP, "10.234.0.1/24", guest))


def cleanup() -> None:
    wipe(DMZ, [VM, VM2])
    for prefix, _via in BEYOND_ROUTES:
        sh("ip", "-6" if ":" in prefix else "-4", "route", "del", prefix, check=False)
    remove_side(LAN_NS, LAN_END)
    remove_side(WAN_NS, WAN_END)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edges")
    guest = guest_dir()
    config = tmp / "edge-a.toml"
    config.write_text(config_text(guest, True))
    cleanup()
    listeners = []
    try:
        make_side(LAN_NS, LAN_END, ["10.229.0.1/24", "fdd0:229::1/64"], [f"{LAN_HOST}/24", f"{LAN_HOST6}/64"],
                  ["10.229.0.1", "fdd0:229::1"])
        make_side(WAN_NS, WAN_END, [f"{PUBLIC}/24", f"{PUBLIC6}/64"],
                  [f"{WAN_ROUTER}/24", f"{WAN_ROUTER6}/64", f"{MIRROR6}/128"] + [f"{a}/32" for a in BEYOND],
                  [PUBLIC, PUBLIC6])
        for prefix, via in BEYOND_ROUTES:
            sh("ip", "-6" if ":" in prefix else "-4", "route", "replace", prefix, "via", via)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        listeners.append(subprocess.Popen(
            ["ip", "netns", "exec", WAN_NS, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
             "--no-hosts", "--bind-interfaces", f"--listen-address={RESOLVER}", "--user=root", "--group=root",
             f"--pid-file={tmp / 'dnsmasq.pid'}", f"--address=/mirror.test/{MIRROR}",
             f"--address=/mirror.test/{MIRROR6}", f"--address=/other.test/{OTHER}",
             "--address=/other.test/2001:db8:110::10"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "dnsmasq.err", "w")))
        for ns, port in ((WAN_NS, "80"), (WAN_NS, "25"), (LAN_NS, "80")):
            listeners.append(subprocess.Popen(["ip", "netns", "exec", ns, "busybox", "nc", "-ll", "-p", port,
                                               "-e", "/bin/echo", "ok"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        dmzctl("up", str(config), "--vm", VM, check=True)
        wait_for_serial(VM, "DMZGUEST READY")
        for _ in range(40):  # warm the paths up: a fresh bridge port forwards after ~2-4 s
            if from_ns(LAN_NS, "tcp", VM_IP, 8080) and from_ns(LAN_NS, "tcp", VM_IP6, 8080):
                break
            time.sleep(0.5)
        yield {"config": config, "guest": guest}
    finally:
        for process in listeners:
            process.terminate()
            process.wait(timeout=5)
        dmzctl("destroy", str(config), "--timeout", "0")
        cleanup()


def dmz_of(config: Path):
    from dmzctl.config import load_dmz

    return load_dmz(config)


def explained(config: Path, source: str, target: str, proto: str = "tcp", outside: bool = False,
              resolved: tuple[str, ...] = ()) -> bool:
    from dmzctl.explain import explain, make_flow
    from dmzctl.host.facts import host_view
    from dmzctl.implicit import blocks_for

    dmz = dmz_of(config)
    flow = make_flow(dmz, source, target, proto, outside=outside, resolved=resolved)
    return explain(dmz, flow, [PUBLIC, PUBLIC6, "10.229.0.1", "fdd0:229::1"], True,
                   blocks_for(dmz, host_view())).allowed


INBOUND = [
    # (label, from namespace, proto, target, port, expected)
    ("published tcp through DNAT from the wan", WAN_NS, "tcp", PUBLIC, 80, True),
    ("published udp through DNAT ('host') from the wan", WAN_NS, "udp", PUBLIC, 8081, True),
    ("published tcp on the VM's own routed address", WAN_NS, "tcp", VM_IP, 8080, True),
    ("IPv6 publish opens the VM's own address", WAN_NS, "tcp", VM_IP6, 8080, True),
    ("unpublished port from the wan", WAN_NS, "tcp", VM_IP, 7777, False),
    ("unpublished port from the wan, IPv6", WAN_NS, "tcp", VM_IP6, 7777, False),
    ("unpublished udp from the wan", WAN_NS, "udp", VM_IP, 8081 + 1, False),
    ("hairpin: the LAN through the public address", LAN_NS, "tcp", PUBLIC, 80, True),
    ("the LAN reaches an unpublished port (lan_inbound)", LAN_NS, "tcp", VM_IP, 7777, True),
    ("the LAN reaches an unpublished port, IPv6 (lan_inbound)", LAN_NS, "tcp", VM_IP6, 7777, True),
]


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("label, ns, proto, host, port, expected", INBOUND, ids=[r[0] for r in INBOUND])
def test_inbound(world, label, ns, proto, host, port, expected):
    source = {WAN_NS: WAN_ROUTER6 if ":" in host else WAN_ROUTER,
              LAN_NS: LAN_HOST6 if ":" in host else LAN_HOST}[ns]
    assert explained(world["config"], source, _target(host, port), proto, outside=True) == expected, "explain"
    assert from_ns(ns, proto, host, port) == expected, label


def test_lan_inbound_false_closes_the_lan_but_not_what_is_published(world):
    config = world["config"]
    config.write_text(config_text(world["guest"], False))
    try:
        dmzctl("firewall", "up", str(config), check=True)
        assert not explained(config, LAN_HOST, f"{VM_IP}:7777", outside=True)
        assert not from_ns(LAN_NS, "tcp", VM_IP, 7777)
        assert explained(config, LAN_HOST, f"{PUBLIC}:80", outside=True)
        assert from_ns(LAN_NS, "tcp", PUBLIC, 80)
    finally:
        config.write_text(config_text(world["guest"], True))
        dmzctl("firewall", "up", str(config), check=True)


def test_egress_by_name_follows_the_gateways_answers(world):
    config = world["config"]
    # Before any lookup the mirror's address is not allowed.
    assert not explained(config, VM, f"{MIRROR}:80")
    assert not from_guest(MIRROR, 80)
    # DNS to an outside resolver is dropped (names are allowlisted: DNS goes to the gateway only).
    assert not explained(config, VM, f"{RESOLVER}:53", "udp")
    assert MIRROR not in lookup("mirror.test", RESOLVER)
    # Through the gateway: answered, and the answer opens the address (IPv4 and IPv6).
    assert explained(config, VM, "10.234.0.1:53", "udp")
    answer = lookup("mirror.test", "10.234.0.1")
    assert MIRROR in answer, answer
    assert explained(config, VM, f"{MIRROR}:80", resolved=("mirror.test",))
    assert from_guest(MIRROR, 80)
    assert explained(config, VM, f"[{MIRROR6}]:80", resolved=("mirror.test",))
    assert MIRROR6 in answer, answer  # busybox's nslookup asks for A and AAAA
    assert from_guest(MIRROR6, 80)
    # Only on the allowlisted ports.
    assert not explained(config, VM, f"{MIRROR}:25", resolved=("mirror.test",))
    assert not from_guest(MIRROR, 25)
    # Another name, resolved through the gateway too, opens nothing.
    assert OTHER in lookup("other.test", "10.234.0.1")
    assert not explained(config, VM, f"{OTHER}:80", resolved=("other.test",))
    assert not from_guest(OTHER, 80)


def test_drops_are_counted_by_reason(world):
    """Each drop chain counts its packets (the metrics read them); the rows above have hit these."""
    from netns import chain_counter

    dmz = dmz_of(world["config"])
    assert not from_ns(WAN_NS, "tcp", VM_IP, 7777)
    assert chain_counter(dmz, "inbound") > 0
    assert not from_guest(OTHER, 80)
    assert chain_counter(dmz, "egress") > 0
    lookup("mirror.test", RESOLVER)
    assert chain_counter(dmz, "dns") > 0


def test_name_sets_are_emptied_with_the_table_and_refilled_by_the_next_lookup(world):
    from netns import reapply_table

    config = world["config"]
    assert MIRROR in lookup("mirror.test", "10.234.0.1")
    assert from_guest(MIRROR, 80)
    reapply_table(dmz_of(config))
    assert not from_guest(MIRROR, 80)
    assert MIRROR in lookup("mirror.test", "10.234.0.1")  # from dnsmasq's upstream again: no cache
    assert from_guest(MIRROR, 80)


EGRESS = [
    ("allowlisted prefix", PREFIX_OK, 80, True),
    ("allowlisted prefix, another port", PREFIX_OK, 25, False),
    ("allowlisted for another VM only (from)", FROM_VM2, 80, False),
    ("allowlisted for this VM (from)", FROM_VM, 80, True),
    ("allowlisted but protected: protected wins", LAN_HOST, 80, False),
    ("allowlisted but a host subnet: the implicit block wins", WAN_ROUTER, 80, False),
    ("allowlisted but the host itself: the host block wins", PUBLIC, 81, False),
]


@pytest.mark.parametrize("label, host, port, expected", EGRESS, ids=[r[0] for r in EGRESS])
def test_egress_allowlist_by_prefix_and_its_order(world, label, host, port, expected):
    assert explained(world["config"], VM, _target(host, port)) == expected, "explain"
    assert from_guest(host, port) == expected, label


def test_verify_from_outside_shows_what_is_published_and_nothing_else(world):
    import json

    from netns import reapply_table

    reapply_table(dmz_of(world["config"]))  # other tests' DMZs come and go: their subnets are in our table
    result = dmzctl("verify", str(world["config"]), "--from-outside", "--json", "--skip", "192.0.2.0/24",
                    "--skip", "fd00::/64", "--timeout", "3")
    report = json.loads(result.stdout)[0] if result.stdout.startswith("[") else json.loads(result.stdout)
    # The guest's UDP echo listens on IPv4 only: its IPv6 row is allowed, and answered by an ICMPv6 error
    # or (rate-limited) unconfirmed.
    unconfirmed = [(p["dst"], p["proto"], p["port"]) for p in report["probes"] if p["status"] == "unconfirmed"]
    assert unconfirmed in ([], [(VM_IP6, "udp", 8081)]), result.stdout
    # Other tests' DMZs come and go on this shared host: the other-DMZ set may be stale meanwhile.
    problems = [p for p in report["problems"] if "differs from the config" not in p]
    assert report["counts"]["MISMATCH"] == 0 and report["counts"]["error"] == 0 and not problems, \
        result.stdout + result.stderr
    rows = {(p["dst"], p["proto"], p["port"]): p for p in report["probes"]}
    for key in ((VM_IP, "tcp", 8080), (VM_IP6, "tcp", 8080), (PUBLIC, "tcp", 80), (VM_IP, "udp", 8081)):
        assert rows[key]["expected"] == "allowed" and rows[key]["status"] == "ok", rows[key]
    for key in ((VM_IP, "tcp", 8081), (VM_IP, "tcp", 22), (VM_IP6, "tcp", 22), (VM2_IP, "tcp", 22)):
        assert rows[key]["expected"] == "blocked" and rows[key]["status"] == "ok", rows[key]


def test_plan_sees_nothing_to_do_with_filled_name_sets(world):
    """The network with its dnsmasq options and forwarder reads back as rendered, and the elements dnsmasq
    added to the name sets are state, not drift."""
    assert MIRROR in lookup("mirror.test", "10.234.0.1")
    result = dmzctl("plan", str(world["config"]), "--vm", VM)
    # (The nwfilters and the other-DMZ sets may differ: other tests' DMZs and namespaces come and go.)
    steps = [line for line in result.stdout.splitlines() if line.startswith("  ") and not line.startswith("    ")]
    assert not [s for s in steps if " network " in s], result.stdout
    assert MIRROR not in result.stdout and "names" not in result.stdout, result.stdout



def test_hairpin_from_another_vm_of_the_dmz_through_the_public_address(world):
    """A second "VM" (a namespace on the DMZ bridge) reaches the guest's published service through the
    public address: DNAT, routed back into the DMZ, masqueraded so that the reply returns the same way."""
    from dmzctl.host.netns import ProbeNamespace

    assert explained(world["config"], "10.234.0.50", f"{PUBLIC}:80")
    with ProbeNamespace(f"dz-{DMZ}", "10.234.0.50", 24, "10.234.0.1", name="edge-peer") as peer:
        peer.wait_forwarding()
        reached = False
        for _ in range(10):  # the fresh bridge port's first packets may be lost
            reached = peer.run(["python3", "-c", PROBE, "tcp", PUBLIC, "80"]).stdout.strip() == "connected"
            if reached:
                break
            time.sleep(0.5)
        assert reached
        # ... and the guest reaching its own published address does not work: the bridge never sends a
        # frame back out of the port it came in on (br_netfilter bridges the translated packet); explain says so.
    assert not explained(world["config"], VM, f"{PUBLIC}:80")
    assert not from_guest(PUBLIC, 80)


def test_verify_looks_each_name_up_through_the_gateway_and_probes_the_answer(world):
    import json

    from netns import reapply_table

    reapply_table(dmz_of(world["config"]))
    result = dmzctl("verify", str(world["config"]), "--json", "--skip", "192.0.2.0/24", "--skip", "fd00::/64",
                    "--timeout", "3")
    report = json.loads(result.stdout)[0]
    rows = {(p["dst"], p["port"]): p for p in report["probes"] if p["kind"] == "name"}
    assert set(rows) == {(MIRROR, 80), (MIRROR6, 80)}, result.stdout + result.stderr
    for row in rows.values():
        assert row["expected"] == "allowed" and row["status"] == "ok", row
    assert [p for p in report["probes"] if p["status"] == "MISMATCH"] == [], result.stdout


def test_masquerade_lets_a_one_address_host_s_dmz_out(world):
    """Last (it re-applies the table). The upstream does not route the DMZ's subnet (a host with one
    public IPv4): a VM's egress gets no answer, until masquerade = true gives it the host's address."""
    config = world["config"]
    assert from_guest(PREFIX_OK, 80)  # the wan routes the DMZ subnet back to the host: it works
    in_ns(WAN_NS, "ip", "route", "add", "unreachable", "10.234.0.0/24")
    try:
        assert not from_guest(PREFIX_OK, 80), "answers found their way without a route back"
        config.write_text(config.read_text().replace('egress = "allowlist"', 'egress = "allowlist"\nmasquerade = true'))
        dmzctl("firewall", "up", str(config), check=True)
        assert any(from_guest(PREFIX_OK, 80) for _ in range(3)), "masqueraded egress got no answer"
        assert from_guest(LAN_HOST, 80) is False  # the LAN stays blocked, masquerade or not
        assert not from_guest(OTHER, 80)  # and the allowlist still decides
    finally:
        in_ns(WAN_NS, "ip", "route", "del", "unreachable", "10.234.0.0/24", check=False)
        config.write_text(config.read_text().replace("\nmasquerade = true", ""))
        dmzctl("firewall", "up", str(config))
