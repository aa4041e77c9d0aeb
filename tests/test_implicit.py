"""Secure by default, with real packets: what nobody listed is blocked all the same.

Two DMZs and the host's other networks, all on this machine, with subnets chosen
outside the private ranges (198.18.0.0/15) so that each implicit class is tested
on its own, not hidden behind "private":

  dmzt-ia   the DMZ under test: 10.238.0.0/24, fdd0:238::/64; one "VM" (a namespace)
            at 10.238.0.10; a hole to the other DMZ's web server (tcp 80)
  dmzt-ib   another DMZ: 198.18.88.0/24, 2001:db8:88::/64; its "VM" at 198.18.88.10
  hn        a host subnet (a veth, as a second LAN or a container bridge would be):
            198.18.77.0/24, 2001:db8:77::/64, a host at .10
  dmzt-lv   a libvirt network that is not dmzctl's (route mode, so that libvirt's own rules
            forward to it): 198.18.99.0/24, a host at .10
  wan       the uplink router (netns.World): the internet 198.18.33.100 beyond it,
            and a private network 172.16.33.100 / fd99:33::100

Every blocked row is shown to pass once its class's set is flushed, the RA rule is
shown to matter by deleting it, and the freshness rows change the host under the
tables: check reports them stale, check --fix and guard re-apply, up and down of
one DMZ refresh the other's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns
from dmzctl.config import load_dmz
from dmzctl.explain import Flow, explain
from dmzctl.host import nft
from dmzctl.host.facts import host_view
from dmzctl.implicit import blocks_for
from netns import INTERNET, PRIVATE_BEYOND, Node, Sink, ip, new_token

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1.5

A_CONFIG = """
[dmz]
name = "dmzt-ia"
bridge = "dmzt-ia0"
gateway = "10.238.0.1/24"
gateway6 = "fdd0:238::1/64"
protected = ["10.239.0.0/24", "fdd0:239::/64"]
log_rate = "100/second"
log_burst = 100

[[dmz.allow]]                # a hole into the other DMZ: its web server, nothing else of it
to = "198.18.88.10"
proto = "tcp"
port = 80
"""

B_CONFIG = """
[dmz]
name = "dmzt-ib"
bridge = "dmzt-ib0"
gateway = "198.18.88.1/24"
gateway6 = "2001:db8:88::1/64"
protected = ["10.239.0.0/24"]
"""

LIBVIRT_NET = """<network>
  <name>dmzt-lv</name>
  <forward mode='route'/>
  <bridge name='dmzt-lv0' stp='off'/>
  <ip address='198.18.99.1' prefix='24'/>
</network>"""

VM_A = ("10.238.0.10", "fdd0:238::10")
VM_B = ("198.18.88.10", "2001:db8:88::10")
HOST_NET = ("198.18.77.10", "2001:db8:77::10")
LIBVIRT_HOST = "198.18.99.10"
METADATA = "169.254.169.254"  # routed to the wan router here, so that nothing ever leaves this machine

# (label, destination, proto, port, expected, the class that blocks it, or None)
ROWS = [
    ("hole into the other DMZ", VM_B[0], "tcp", 80, "pass", None),
    ("the other DMZ beside the hole", VM_B[0], "tcp", 81, "block", "other-dmz"),
    ("the other DMZ, ping", VM_B[0], "icmp", None, "block", "other-dmz"),
    ("the other DMZ, IPv6", VM_B[1], "tcp", 80, "block", "other-dmz"),
    ("a host subnet", HOST_NET[0], "tcp", 80, "block", "host-net"),
    ("a host subnet, udp", HOST_NET[0], "udp", 5000, "block", "host-net"),
    ("a host subnet, IPv6", HOST_NET[1], "tcp", 80, "block", "host-net"),
    ("a libvirt network", LIBVIRT_HOST, "tcp", 80, "block", "host-net"),
    ("a private network beyond the uplink", PRIVATE_BEYOND[0], "tcp", 80, "block", "private"),
    ("the cloud metadata address", METADATA, "tcp", 80, "block", "private"),
    ("a private network beyond the uplink, IPv6", PRIVATE_BEYOND[1], "udp", 5000, "block", "private"),
    ("the internet", INTERNET[0], "tcp", 80, "pass", None),
    ("the internet, IPv6", INTERNET[1], "tcp", 80, "pass", None),
    # Tunnels: what counts is the outer destination, whatever the protocol carries.
    ("IP-in-IP to a host subnet", HOST_NET[0], "ipip", None, "block", "host-net"),
    ("IPv6-in-IPv4 to a host subnet", HOST_NET[0], "6in4", None, "block", "host-net"),
    ("GRE to the other DMZ", VM_B[0], "gre", None, "block", "other-dmz"),
    ("GRE over IPv6 to a private network", PRIVATE_BEYOND[1], "gre", None, "block", "private"),
    ("IP-in-IP to the internet", INTERNET[0], "ipip", None, "pass", None),
    ("IPv6-in-IPv4 to the internet", INTERNET[0], "6in4", None, "pass", None),
]
RAW = {"ipip": 4, "6in4": 41, "gre": 47}


def dmzctl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dmzctl.cli", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"dmzctl {' '.join(args)}: {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def set_elements(table: str, name: str) -> list[str]:
    listing = nft.list_table(table) or {"nftables": []}
    for item in listing["nftables"]:
        found = item.get("set")
        if found and found["name"] == name:
            return [json.dumps(e, sort_keys=True) for e in found.get("elem", [])]
    return []


def prefix_in_set(table: str, name: str, prefix: str) -> bool:
    net = ipaddress.ip_network(prefix)
    wanted = {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    return json.dumps(wanted, sort_keys=True) in set_elements(table, name)


class Site:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.world = netns.World(workdir)
        self.nodes: list[Node] = []
        self.a = workdir / "a.toml"
        self.b = workdir / "b.toml"
        self.a.write_text(A_CONFIG)
        self.b.write_text(B_CONFIG)

    def node(self, name, addresses, gateways, host_addresses=(), bridge=None) -> Node:
        node = self.world._node(name, addresses, gateways, host_addresses, bridge)
        node.sink = Sink(self.workdir, name, node.netns, [a.split("/")[0] for a in addresses], [80, 81], [5000],
                         netns.SINK_RAW)
        return node

    def __enter__(self):
        self.world.__enter__()
        try:
            wan = self.world.nodes["wan"]
            wan.add_address(f"{METADATA}/32")
            wan.sink.stop()
            wan.sink = Sink(self.workdir, "wan2", wan.netns, [a.split("/")[0] for a in wan.addresses]
                            + list(INTERNET + PRIVATE_BEYOND) + [METADATA], [80, 81], [5000], netns.SINK_RAW)
            ip("route", "replace", f"{METADATA}/32", "via", "10.233.0.100")
            self.world.routes.append((f"{METADATA}/32", "10.233.0.100"))
            self.host_net = self.node("hn", [f"{HOST_NET[0]}/24", f"{HOST_NET[1]}/64"],
                                      ["198.18.77.1", "2001:db8:77::1"],
                                      host_addresses=["198.18.77.1/24", "2001:db8:77::1/64"])
            xml = self.workdir / "lv.xml"
            xml.write_text(LIBVIRT_NET)
            netns.run(["virsh", "-q", "-c", "qemu:///system", "net-create", str(xml)])
            self.libvirt_host = self.node("lvh", [f"{LIBVIRT_HOST}/24"], ["198.18.99.1"], bridge="dmzt-lv0")
            dmzctl("up", str(self.b))
            self.vm_b = self.node("vmb", [f"{VM_B[0]}/24", f"{VM_B[1]}/64"], ["198.18.88.1", "2001:db8:88::1"],
                                  bridge="dmzt-ib0")
            self.up_a = dmzctl("up", str(self.a))
            self.vm_a = self.node("vma", [f"{VM_A[0]}/24", f"{VM_A[1]}/64"], ["10.238.0.1", "fdd0:238::1"],
                                  bridge="dmzt-ia0")
            for node in (self.vm_a, self.vm_b, self.libvirt_host):
                assert netns.wait_until(lambda: node.port_state() in ("3", None), 20)
            self.warm_up()
        except BaseException:
            self.close()
            raise
        return self

    def warm_up(self) -> None:
        for target in (INTERNET[0], INTERNET[1]):
            spec = {"id": "warm", "proto": "tcp", "dst": target, "port": 80, "timeout": 1.0}
            assert netns.wait_until(lambda: netns.probe(self.vm_a, [spec])[0]["observed"] == "connected", 20, 0.2), \
                f"the DMZ never reached {target}"
        spec = {"id": "warm", "proto": "icmp", "dst": VM_A[0], "timeout": 1.0}
        assert netns.wait_until(lambda: netns.probe(self.vm_b, [spec])[0]["observed"] in ("reply", "timeout"), 5)
        spec = {"id": "warm", "proto": "icmp", "dst": LIBVIRT_HOST, "timeout": 1.0}
        assert netns.wait_until(lambda: netns.probe(self.world.nodes["lan"], [spec])[0]["observed"] == "reply",
                                20, 0.2), "the libvirt network's host never answered the host's LAN side"

    def run_rows(self) -> dict:
        specs = []
        for label, dst, proto, port, _expected, _kind in ROWS:
            spec = {"id": new_token(), "dst": dst, "proto": proto, "port": port, "timeout": TIMEOUT,
                    "src": VM_A[1] if ":" in dst else VM_A[0]}
            if proto in RAW:
                spec.update(proto="raw", ipproto=RAW[proto])
            if proto == "icmp":
                spec["icmp_type"] = 128 if ":" in dst else 8
            spec["token"] = spec["id"]
            specs.append(spec)
        answers = netns.probe(self.vm_a, specs, limit=60)
        time.sleep(0.2)
        seen = self.world.tokens_seen()
        judged = {}
        for row, spec, answer in zip(ROWS, specs, answers):
            reached = spec["token"] in seen or answer["observed"] in ("connected", "refused", "reply")
            judged[row[0]] = "pass" if reached else "block"
        return judged

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        for config in (self.a, self.b):
            dmzctl("destroy", str(config), "--timeout", "0", check=False)
        netns.run(["virsh", "-q", "-c", "qemu:///system", "net-destroy", "dmzt-lv"], check=False)
        ip("link", "del", "dmzt-dum0", check=False)
        self.world.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    netns.cleanup_stale()
    for name in ("dmzt-ia", "dmzt-ib"):
        for table in (f"dmzctl-{name}", f"dmzctl-{name}.backstop"):
            netns.run(["nft", "delete", "table", "inet", table], check=False)
    with Site(tmp_path_factory.mktemp("implicit")) as site:
        yield site
    assert not netns.leftovers(), netns.leftovers()


def test_what_nobody_listed_is_blocked_and_holes_open_it(site):
    judged = site.run_rows()
    wrong = [f"{label}: expected {expected}, observed {judged[label]}"
             for label, _dst, _proto, _port, expected, _kind in ROWS if judged[label] != expected]
    assert not wrong, "\n".join(wrong)


def test_explain_names_the_class_and_the_reason_of_each_row(site):
    dmz = load_dmz(site.a)
    blocks = blocks_for(dmz, host_view())
    reasons = {"other-dmz": "another DMZ (dmzt-ib)", "host-net": None, "private": "private range"}
    for label, dst, proto, port, expected, kind in ROWS:
        address = ipaddress.ip_address(dst)
        proto = {"ipip": "4", "6in4": "41"}.get(proto, proto)
        flow = Flow(dst=address, proto="icmpv6" if proto == "icmp" and address.version == 6 else proto,
                    src=ipaddress.ip_address(VM_A[address.version == 6]), port=port)
        decision = explain(dmz, flow, blocks=blocks)
        assert decision.allowed == (expected == "pass"), f"{label}: {decision.reason}"
        if kind is not None:
            assert decision.decided_by == kind, f"{label}: {decision.decided_by}: {decision.reason}"
            assert decision.log_prefix == f"dmzctl dmzt-ia to-{kind}: ", decision.log_prefix
            if reasons[kind]:
                assert reasons[kind] in decision.reason, decision.reason
    host = explain(dmz, Flow(dst=ipaddress.ip_address(HOST_NET[0]), proto="tcp", port=80,
                             src=ipaddress.ip_address(VM_A[0])), blocks=blocks)
    assert "host subnet on dmzt-hn-h" in host.reason, host.reason
    libvirt = explain(dmz, Flow(dst=ipaddress.ip_address(LIBVIRT_HOST), proto="tcp", port=80,
                                src=ipaddress.ip_address(VM_A[0])), blocks=blocks)
    assert "libvirt network dmzt-lv" in libvirt.reason, libvirt.reason


def test_each_class_alone_does_the_blocking(site):
    """Flush one class's sets in the live table: exactly the rows of that class get through."""
    table = "dmzctl-dmzt-ia"
    try:
        for kind, sets in (("other-dmz", ("other_dmz4", "other_dmz6")), ("host-net", ("host_nets4", "host_nets6")),
                           ("private", ("private4", "private6"))):
            for name in sets:
                netns.run(["nft", "flush", "set", "inet", table, name])
            judged = site.run_rows()
            for label, _dst, _proto, _port, expected, row_kind in ROWS:
                want = "pass" if row_kind == kind else expected
                assert judged[label] == want, f"{kind} flushed: {label}: expected {want}, got {judged[label]}"
            dmzctl("firewall", "up", str(site.a))
    finally:
        dmzctl("firewall", "up", str(site.a))


def _ping(node: Node, address: str, size: int) -> bool:
    """A ping of `size` bytes: above the links' 1500-byte MTU it leaves in fragments, both ways."""
    argv = ["ping", "-c", "1", "-W", "2", "-s", str(size)] + (["-6"] if ":" in address else []) + [address]
    return node.exec(argv, check=False).returncode == 0


def test_fragmented_packets_meet_the_same_blocks(site):
    """Conntrack reassembles fragments before the forward hook: a flow in fragments is judged as one."""
    for address in INTERNET:
        assert _ping(site.vm_a, address, 4000), f"positive control: fragmented ping to {address}"
    for address in HOST_NET:
        assert not _ping(site.vm_a, address, 4000), f"fragments reached the host subnet at {address}"
    try:
        for name in ("host_nets4", "host_nets6", "private4", "private6"):
            netns.run(["nft", "flush", "set", "inet", "dmzctl-dmzt-ia", name])
        for address in HOST_NET:
            assert _ping(site.vm_a, address, 4000), f"teeth: with the sets flushed {address} should answer"
    finally:
        dmzctl("firewall", "up", str(site.a))


def test_the_host_s_link_local_address_is_the_host_too(site):
    """From the DMZ, the bridge's link-local address is the host: judged by the to-host chain."""
    bridge_ll = next(i["local"] for link in json.loads(ip("-j", "addr", "show", "dev", "dmzt-ia0").stdout)
                     for i in link["addr_info"] if i["local"].startswith("fe80"))
    target = f"{bridge_ll}%eth0"
    before = netns.chain_counter(load_dmz(site.a), "host")
    assert site.vm_a.exec(["ping", "-6", "-c", "1", "-W", "2", target], check=False).returncode != 0
    tcp = site.vm_a.exec(["python3", "-c", "import socket,sys; s=socket.socket(socket.AF_INET6); s.settimeout(2); "
                          f"sys.exit(s.connect_ex(('{bridge_ll}', 7080, 0, socket.if_nametoindex('eth0'))))"],
                         check=False)
    assert tcp.returncode != 111, "a TCP reset came back from the host's link-local address"  # ECONNREFUSED
    assert netns.chain_counter(load_dmz(site.a), "host") >= before + 2
    # Teeth: without the table the backstop still drops it (it needs no address of the host's);
    # without both the host answers at once.
    netns.run(["nft", "delete", "table", "inet", "dmzctl-dmzt-ia"])
    try:
        assert site.vm_a.exec(["ping", "-6", "-c", "1", "-W", "2", target], check=False).returncode != 0
        netns.run(["nft", "delete", "table", "inet", "dmzctl-dmzt-ia.backstop"])
        assert site.vm_a.exec(["ping", "-6", "-c", "1", "-W", "2", target], check=False).returncode == 0
    finally:
        dmzctl("firewall", "up", str(site.a))


def test_the_other_dmz_blocks_this_one_too_after_its_up(site):
    """dmzt-ib was up first; dmzt-ia's up refreshed dmzt-ib's table with dmzt-ia's subnets."""
    assert "firewall table inet dmzctl-dmzt-ib of DMZ dmzt-ib refreshed" in site.up_a.stdout, site.up_a.stdout
    assert prefix_in_set("dmzctl-dmzt-ib", "other_dmz4", "10.238.0.0/24")
    assert prefix_in_set("dmzctl-dmzt-ib", "other_dmz6", "fdd0:238::/64")
    spec = {"id": new_token(), "proto": "tcp", "dst": VM_A[0], "port": 80, "timeout": TIMEOUT, "src": VM_B[0]}
    assert netns.probe(site.vm_b, [spec])[0]["observed"] == "timeout"
    assert spec["id"] not in site.world.tokens_seen()
    dmz_b = load_dmz(site.b)
    decision = explain(dmz_b, Flow(dst=ipaddress.ip_address(VM_A[0]), proto="tcp", port=80,
                                   src=ipaddress.ip_address(VM_B[0])), blocks=blocks_for(dmz_b, host_view()))
    assert decision.decided_by == "other-dmz" and "another DMZ (dmzt-ia)" in decision.reason


def test_a_new_host_subnet_makes_the_tables_stale_and_check_fix_refreshes_them(site):
    dmzctl("check", str(site.a), "--fix")  # in sync with the host as it is now
    assert json.loads(dmzctl("check", str(site.a), "--json").stdout)["in_sync"]
    ip("link", "add", "dmzt-dum0", "type", "veth", "peer", "name", "dmzt-dum1")
    try:
        ip("addr", "add", "198.18.66.1/24", "dev", "dmzt-dum0")
        ip("link", "set", "dmzt-dum0", "up")
        stale = dmzctl("check", str(site.a), "--json", check=False)
        assert stale.returncode == 1, stale.stdout + stale.stderr
        problems = [d["problem"] for d in json.loads(stale.stdout)["dmzs"][0]["differences"]]
        assert any(p.startswith("set host_nets4 is stale") for p in problems), problems
        # The per-VM nwfilter's host addresses are part of the same view: no VM here, none to compare.
        fixed = dmzctl("check", str(site.a), "--fix", "--json", check=False)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert prefix_in_set("dmzctl-dmzt-ia", "host_nets4", "198.18.66.0/24")
    finally:
        ip("link", "del", "dmzt-dum0", check=False)
    dmzctl("check", str(site.a), "--fix")
    assert not prefix_in_set("dmzctl-dmzt-ia", "host_nets4", "198.18.66.0/24")


def test_guard_follows_the_host_s_addresses(site):
    log = site.workdir / "guard.out"
    with open(log, "w") as out:
        guard = subprocess.Popen([sys.executable, "-m", "dmzctl.cli", "guard", str(site.a), str(site.b),
                                  "--interval", "3600"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert netns.wait_until(lambda: "guard: watching" in log.read_text(), 20), log.read_text()
        ip("link", "add", "dmzt-dum0", "type", "veth", "peer", "name", "dmzt-dum1")
        ip("addr", "add", "198.18.66.1/24", "dev", "dmzt-dum0")
        ip("link", "set", "dmzt-dum0", "up")
        assert netns.wait_until(lambda: prefix_in_set("dmzctl-dmzt-ia", "host_nets4", "198.18.66.0/24")
                                and prefix_in_set("dmzctl-dmzt-ib", "host_nets4", "198.18.66.0/24"), 10), \
            log.read_text()
        ip("link", "del", "dmzt-dum0")
        assert netns.wait_until(lambda: not prefix_in_set("dmzctl-dmzt-ia", "host_nets4", "198.18.66.0/24"), 10), \
            log.read_text()
        assert "host networks changed" in log.read_text()
    finally:
        guard.send_signal(signal.SIGTERM)
        guard.wait(timeout=15)
        ip("link", "del", "dmzt-dum0", check=False)


def test_verify_probes_a_sample_of_each_class_and_names_it(site):
    data = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True).stdout)
    ours = [ipaddress.ip_network(n) for n in ("10.238.0.0/24", "fdd0:238::/64", "198.18.88.0/24",
                                              "2001:db8:88::/64", "198.18.77.0/24", "2001:db8:77::/64",
                                              "198.18.99.0/24", "10.232.0.0/24", "fdd0:232::/64",
                                              "10.233.0.0/24", "fdd0:233::/64")]
    skip = ["192.0.2.0/24", "fd00::/64"]  # the machine's own link: never a target
    for link in data:  # and whatever else this host holds that is not this test's
        for info in link.get("addr_info", []):
            subnet = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
            if not subnet.is_link_local and not subnet.is_loopback \
                    and not any(subnet.version == n.version and subnet.subnet_of(n) for n in ours):
                skip.append(str(subnet))
    dmzctl("firewall", "up", str(site.a))  # rendered with the host as it is now
    argv = ["verify", str(site.a), "--json", "--timeout", "1.5", "--target", f"{INTERNET[0]}:80",
            "--skip", "10.239.0.0/24", "--skip", "fdd0:239::/64"]  # its protected LAN exists nowhere here
    for prefix in skip:
        argv += ["--skip", prefix]
    result = dmzctl(*argv, check=False, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    report, = json.loads(result.stdout)
    kinds = {p["kind"]: p for p in report["probes"]}
    assert {"other-dmz", "host-net"} <= set(kinds), sorted(kinds)
    other = [p for p in report["probes"] if p["kind"] == "other-dmz"]
    assert all(p["decided_by"] == "other-dmz" and p["status"] == "ok" for p in other), other
    assert any("another DMZ (dmzt-ib)" in p["note"] for p in other)
    assert any("host subnet on dmzt-hn-h" in p["note"] for p in report["probes"] if p["kind"] == "host-net")
    # Private ranges that only the default route reaches are named, not probed: nothing leaves this machine.
    assert any(n.startswith("private range 10.0.0.0/8") and "beyond this machine" in n for n in report["notes"]), \
        report["notes"]
    beyond = [ipaddress.ip_network(n) for n in ("198.18.33.0/24", f"{METADATA}/32")]  # via the wan router
    strays = sorted({p["dst"] for p in report["probes"]
                     if not any(ipaddress.ip_address(p["dst"]) in n for n in ours + beyond)})
    assert not strays, strays


def _kernel_lines(marker: str) -> list[str]:
    return [line for line in netns.kernel_log("dmzctl dmzt-ia to-host: ") if marker in line]


# A router advertisement from the host to all nodes on the bridge, as libvirt's dnsmasq sends them
# (dnsmasq's own schedule is minutes apart, and its answers to solicitations may be unicast): it
# leaves on the bridge from the bridge's link-local address, and multicast loopback brings it back in.
ADVERTISE = ("import socket, sys; s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); "
             "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255); "
             "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1); "
             "s.sendto(bytes([134, 0, 0, 0, 64, 0, 0, 0]) + bytes(8), "
             "('ff02::1', 0, 0, socket.if_nametoindex(sys.argv[1])))")
OBSERVER = """table inet dmzt-ra-watch {
  chain input {
    type filter hook input priority -20; policy accept;
    iifname "dmzt-ia0" icmpv6 type nd-router-advert counter
  }
}
"""


def _looped_back_ras() -> int:
    listing = nft.list_table("dmzt-ra-watch") or {"nftables": []}
    return sum(e["counter"]["packets"] for item in listing["nftables"] if "rule" in item
               for e in item["rule"]["expr"] if isinstance(e, dict) and isinstance(e.get("counter"), dict))


def _advertise_and_wait() -> None:
    before = _looped_back_ras()
    netns.run([sys.executable, "-c", ADVERTISE, "dmzt-ia0"])
    assert netns.wait_until(lambda: _looped_back_ras() > before, 5), \
        "positive control: the router advertisement did not come back to the host's input"


def test_the_host_s_own_router_advertisements_are_neither_logged_nor_counted(site):
    """libvirt's RAs leave through the bridge and come back to the host by multicast loopback, from
    the bridge's own link-local address: the table's input chain must not count them as the DMZ's."""
    bridge_ll = next(i["local"] for link in json.loads(ip("-j", "addr", "show", "dev", "dmzt-ia0").stdout)
                     for i in link["addr_info"] if i["local"].startswith("fe80"))
    marker = f"SRC={ipaddress.ip_address(bridge_ll).exploded} "  # how the kernel log writes it
    subprocess.run(["nft", "-f", "-"], input=OBSERVER, text=True, check=True)
    try:
        before_lines = len(_kernel_lines(marker))
        before_drops = netns.chain_counter(load_dmz(site.a), "host")
        _advertise_and_wait()
        time.sleep(0.5)
        assert len(_kernel_lines(marker)) == before_lines, "the host's own RA was logged as a to-host drop"
        assert netns.chain_counter(load_dmz(site.a), "host") == before_drops, "the host's own RA was counted"

        # Teeth: without the rule, the same RA is logged and counted as a drop from the host's own address.
        listing = nft.list_table("dmzctl-dmzt-ia")
        handle = next(item["rule"]["handle"] for item in listing["nftables"]
                      if item.get("rule", {}).get("comment") == "the host's own multicast, looped back")
        netns.run(["nft", "delete", "rule", "inet", "dmzctl-dmzt-ia", "input", "handle", str(handle)])
        _advertise_and_wait()
        assert netns.wait_until(lambda: len(_kernel_lines(marker)) > before_lines, 5), \
            "without the rule the host's RA should have been logged (the test has no teeth)"
        assert netns.chain_counter(load_dmz(site.a), "host") > before_drops
    finally:
        netns.run(["nft", "delete", "table", "inet", "dmzt-ra-watch"], check=False)
        dmzctl("firewall", "up", str(site.a))


def test_down_of_one_dmz_refreshes_the_other(site):
    """Last: takes dmzt-ia down; dmzt-ib's table forgets its subnets."""
    result = dmzctl("destroy", str(site.a), "--timeout", "0")
    assert "firewall table inet dmzctl-dmzt-ib of DMZ dmzt-ib refreshed" in result.stdout, result.stdout
    assert not prefix_in_set("dmzctl-dmzt-ib", "other_dmz4", "10.238.0.0/24")
