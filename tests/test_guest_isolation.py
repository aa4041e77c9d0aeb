"""Isolation proven from inside a real guest under libvirt: what only a real
libvirt NIC can show (its nwfilters), spoofing of every kind, and defence in
depth with the nft table deleted under the running guest.

Topology, all on this machine: the DMZ `gi` (10.243.0.0/24, fdd0:243::/64)
with the guest gi-web; a "lan" namespace with the protected subnets
(10.244.0.0/24, fdd0:244::/64); a "wan" namespace, the host's uplink router on
10.247.0.0/24 and fdd0:247::/64, holding "the internet" behind it (198.18.47.10,
2001:db8:47::10, routed by the host through it: beyond the host and not private,
so egress reaches it; the uplink subnet itself is blocked as a host subnet). Arrivals are counted by nft
counters inside those namespaces (a blocked probe must never arrive), and
frames reaching the host's side of the bridge by a packet socket.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from guest import dmzctl, guest_dir, in_guest, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ = "gi"
BRIDGE = "dmzgi0"
VM = "gi-web"
VM_IP, VM_IP6 = "10.243.0.10", "fdd0:243::10"
LAN_NS, WAN_NS = "dmzgi-lan", "dmzgi-wan"
LAN_HOST, LAN_HOST6 = "10.244.0.10", "fdd0:244::10"
LAN_DNS = "10.244.0.53"
WAN_ROUTER, WAN_ROUTER6 = "10.247.0.10", "fdd0:247::10"
WAN_HOST, WAN_HOST6 = "198.18.47.10", "2001:db8:47::10"
BEYOND_ROUTES = [("198.18.47.0/24", WAN_ROUTER), ("2001:db8:47::/64", WAN_ROUTER6)]

CONFIG = """
[dmz]
name = "gi"
bridge = "dmzgi0"
gateway = "10.243.0.1/24"
gateway6 = "fdd0:243::1/64"
protected = ["10.244.0.0/24", "fdd0:244::/64"]
dns = "10.244.0.53"
"""

# Counters in the lan/wan namespaces: one named counter per kind of arrival.
COUNTERS = """
table inet count {
  counter tcp80 {}
  counter tcp53 {}
  counter udp53 {}
  counter udp9 {}
  counter ping4 {}
  counter ping6 {}
  counter from_vm {}
  counter from_forged {}
  counter from_forged_out {}
  counter from_forged6 {}
  chain input {
    type filter hook input priority -100; policy accept;
    tcp dport 80 tcp flags syn counter name tcp80
    tcp dport 53 tcp flags syn counter name tcp53
    udp dport 53 counter name udp53
    udp dport 9 counter name udp9
    icmp type echo-request counter name ping4
    icmpv6 type echo-request counter name ping6
    ip saddr 10.243.0.10 icmp type echo-request counter name from_vm
    ip saddr 10.243.0.99 counter name from_forged
    ip saddr 10.250.0.5 counter name from_forged_out
    ip6 saddr fdd0:243::99 counter name from_forged6
  }
}
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def counters(ns: str) -> dict[str, int]:
    import json

    listing = json.loads(in_ns(ns, "nft", "-j", "list", "counters", "table", "inet", "count").stdout)
    return {item["counter"]["name"]: item["counter"]["packets"]
            for item in listing["nftables"] if "counter" in item}


def reset_counters(ns: str) -> None:
    in_ns(ns, "nft", "reset", "counters", "table", "inet", "count")


def make_side(ns: str, host_end: str, host_addrs: list[str], ns_addrs: list[str], gateways: list[str]):
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
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=COUNTERS, text=True, check=True)


def remove_side(ns: str, host_end: str) -> None:
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        subprocess.run(["kill", pid], capture_output=True)
    sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", host_end, check=False)


class BridgeSniffer:
    """Frames that reach the host's side of the DMZ bridge (after the nwfilters)."""

    def __init__(self, bridge: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((bridge, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                self.frames.append(self.sock.recv(65535))
            except socket.timeout:
                continue
            except OSError:
                return

    def clear(self):
        self.frames.clear()

    def seen(self, predicate, wait: float = 3.0) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if any(predicate(frame) for frame in list(self.frames)):
                return True
            time.sleep(0.1)
        return False

    def close(self):
        self.running = False
        self.thread.join(timeout=2)
        self.sock.close()


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ethertype(frame: bytes) -> int:
    return int.from_bytes(frame[12:14], "big")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gi")
    guest = guest_dir()
    config = tmp / "gi.toml"
    config.write_text(CONFIG + kernel_vm_toml(VM, VM_IP, "10.243.0.1/24", guest, ip6=VM_IP6,
                                              gateway6="fdd0:243::1/64", extra_cmdline="dmz.udp=1"))
    wipe(DMZ, [VM])
    remove_side(LAN_NS, "dmzgi-lan0")
    remove_side(WAN_NS, "dmzgi-wan0")
    listeners = []
    try:
        make_side(LAN_NS, "dmzgi-lan0", ["10.244.0.1/24", "fdd0:244::1/64"],
                  [f"{LAN_HOST}/24", f"{LAN_DNS}/24", f"{LAN_HOST6}/64"], ["10.244.0.1", "fdd0:244::1"])
        make_side(WAN_NS, "dmzgi-wan0", ["10.247.0.1/24", "fdd0:247::1/64"],
                  [f"{WAN_ROUTER}/24", f"{WAN_ROUTER6}/64", f"{WAN_HOST}/32", f"{WAN_HOST6}/128"],
                  ["10.247.0.1", "fdd0:247::1"])
        for prefix, via in BEYOND_ROUTES:
            sh("ip", "-6" if ":" in prefix else "-4", "route", "replace", prefix, "via", via)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # A "DNS server" on the LAN: the one hole. Nothing listens on LAN port 80.
        listeners.append(subprocess.Popen(["ip", "netns", "exec", LAN_NS, "busybox", "nc", "-ll", "-p", "53",
                                           "-e", "/bin/echo", "dns-answer"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        dmzctl("up", str(config), check=True)
        wait_for_serial(VM, "DMZGUEST READY")
        mac = subprocess.run(["virsh", "-q", "domiflist", VM], capture_output=True, text=True).stdout.split()[-1]
        sniffer = BridgeSniffer(BRIDGE)
        # Warm the paths up: the first probe through a fresh port can be lost.
        for _ in range(20):
            if in_ns(LAN_NS, "ping", "-c", "1", "-W", "1", VM_IP, check=False).returncode == 0:
                break
        yield {"config": config, "mac": mac, "sniffer": sniffer}
        sniffer.close()
    finally:
        for process in listeners:
            process.terminate()
            process.wait(timeout=5)
        dmzctl("destroy", str(config), "--timeout", "0")
        wipe(DMZ, [VM])
        for prefix, _via in BEYOND_ROUTES:
            sh("ip", "-6" if ":" in prefix else "-4", "route", "del", prefix, check=False)
        remove_side(LAN_NS, "dmzgi-lan0")
        remove_side(WAN_NS, "dmzgi-wan0")


def guest_ok(command: str) -> bool:
    rc, out = in_guest(VM_IP, command)
    if rc != 0:
        print(f"in the guest: {command!r} -> {rc}: {out}")
    return rc == 0


def perl_udp(sport: int, dst: str, dport: int, payload: str) -> str:
    """A perl one-liner for the guest: a UDP datagram from a chosen source port (broadcast allowed)."""
    return ("perl -e 'socket(S,2,2,17) or die $!; setsockopt(S,1,2,pack(\"i\",1)); "
            "setsockopt(S,1,6,pack(\"i\",1)); "
            f"bind(S,pack(\"S n C4 x8\",2,{sport},0,0,0,0)) or die \"bind $!\"; "
            f"send(S,\"{payload}\",0,pack(\"S n C4 x8\",2,{dport},{dst.replace('.', ',')})) or die \"send $!\"'")


def perl_icmp6_all_nodes(icmp_type: int, payload: str) -> str:
    """A perl one-liner for the guest: an ICMPv6 message of a type to ff02::1 on eth0 (hop limit 255)."""
    return ("perl -e 'open(F,\"/sys/class/net/eth0/ifindex\"); $i=<F>; chomp $i; "
            "socket(S,10,3,58) or die $!; setsockopt(S,41,18,pack(\"i\",255)); "
            "$a=pack(\"n8\",0xff02,0,0,0,0,0,0,1); "
            f"send(S,pack(\"C C n\",{icmp_type},0,0).\"{payload}\",0,pack(\"S n N a16 L\",10,0,0,$a,$i)) "
            "or die \"send $!\"'")


def test_lan_reaches_the_guest_and_its_replies_pass(world):
    assert in_ns(LAN_NS, "busybox", "wget", "-q", "-O", "-", f"http://{VM_IP}:8080/").stdout.startswith("name=gi-web")
    assert in_ns(LAN_NS, "ping", "-c", "2", "-W", "2", VM_IP, check=False).returncode == 0
    assert in_ns(LAN_NS, "ping", "-6", "-c", "2", "-W", "2", VM_IP6, check=False).returncode == 0


@pytest.mark.parametrize("command, counter", [
    (f"nc -w 2 {LAN_HOST} 80 </dev/null", "tcp80"),
    (f"ping -c 2 -W 1 {LAN_HOST}", "ping4"),
    (f"ping6 -c 2 -W 1 {LAN_HOST6}", "ping6"),
    (perl_udp(40000, LAN_HOST, 9, "probe"), "udp9"),
    (f"nc -w 2 {LAN_DNS} 80 </dev/null", "tcp80"),  # the DNS server, but not its DNS port
])
def test_guest_cannot_reach_the_lan(world, command, counter):
    reset_counters(LAN_NS)
    in_guest(VM_IP, command)
    time.sleep(0.5)
    assert counters(LAN_NS)[counter] == 0, f"{command!r} arrived on the LAN"


def test_the_dns_hole_passes_and_nothing_broader(world):
    reset_counters(LAN_NS)
    rc, out = in_guest(VM_IP, f"nc -w 3 {LAN_DNS} 53 </dev/null")
    assert "dns-answer" in out, out
    in_guest(VM_IP, f"nc -w 2 {LAN_HOST} 53 </dev/null")  # another LAN host, same port
    time.sleep(0.3)
    assert counters(LAN_NS)["tcp53"] == 1


def test_the_guest_reaches_the_wan_over_ipv6_with_its_own_sources(world):
    """With egress "any": the static address and the SLAAC one (from libvirt's RAs) both pass."""
    deadline = time.monotonic() + 20
    slaac = []
    while not slaac and time.monotonic() < deadline:  # the RA comes a few seconds after boot
        _rc, addresses = in_guest(VM_IP, "ip -6 addr show dev eth0 scope global")
        slaac = [line.split()[1].split("/")[0] for line in addresses.splitlines()
                 if "inet6" in line and VM_IP6 not in line]
        time.sleep(0.5)
    assert slaac, f"no SLAAC address from libvirt's router advertisements: {addresses}"
    assert guest_ok(f"ping6 -c 1 -W 2 {WAN_HOST6}"), addresses
    assert guest_ok(f"ping6 -c 1 -W 2 -I {VM_IP6} {WAN_HOST6}")
    for address in slaac:
        assert guest_ok(f"ping6 -c 1 -W 2 -I {address} {WAN_HOST6}"), f"SLAAC source {address} dropped"


def test_forged_source_addresses_never_leave_the_dmz(world):
    reset_counters(WAN_NS)
    assert guest_ok(f"ping -c 1 -W 2 {WAN_HOST}"), "egress any: the genuine address must reach the wan"
    in_guest(VM_IP, "ip addr add 10.243.0.99/24 dev eth0; ip addr add 10.250.0.5/32 dev eth0; "
                    "ip -6 addr add fdd0:243::99/64 dev eth0 nodad")
    try:
        in_guest(VM_IP, f"ping -c 2 -W 1 -I 10.243.0.99 {WAN_HOST}")
        in_guest(VM_IP, f"ping -c 2 -W 1 -I 10.250.0.5 {WAN_HOST}")
        in_guest(VM_IP, f"ping6 -c 2 -W 1 -I fdd0:243::99 {WAN_HOST6}")
        time.sleep(0.5)
        seen = counters(WAN_NS)
        assert seen["from_vm"] >= 1
        assert seen["from_forged"] == 0, "a forged source inside the DMZ subnet passed"
        assert seen["from_forged_out"] == 0, "a forged source outside the DMZ subnet passed"
        assert seen["from_forged6"] == 0, "a forged IPv6 source passed"
    finally:
        in_guest(VM_IP, "ip addr del 10.243.0.99/24 dev eth0; ip addr del 10.250.0.5/32 dev eth0; "
                        "ip -6 addr del fdd0:243::99/64 dev eth0")


def test_arp_reply_claiming_the_gateway_is_dropped(world):
    sniffer, mac = world["sniffer"], mac_bytes(world["mac"])

    def arp_from_guest(sender_ip: str):
        target = socket.inet_aton(sender_ip)
        return lambda f: ethertype(f) == 0x0806 and f[6:12] == mac and f[28:32] == target

    sniffer.clear()
    in_guest(VM_IP, f"arping -U -c 2 -I eth0 -s {VM_IP} {VM_IP}")
    assert sniffer.seen(arp_from_guest(VM_IP)), "positive control: the guest's own gratuitous ARP"
    sniffer.clear()
    in_guest(VM_IP, "arping -U -c 2 -I eth0 -s 10.243.0.1 10.243.0.1")
    in_guest(VM_IP, "arping -A -c 2 -I eth0 -s 10.243.0.1 10.243.0.1")
    assert not sniffer.seen(arp_from_guest("10.243.0.1")), "an ARP claiming the gateway left the VM"


def test_dhcp_server_answers_and_router_advertisements_are_dropped(world):
    sniffer, mac = world["sniffer"], mac_bytes(world["mac"])

    def udp_from_guest(sport: int):
        return lambda f: (ethertype(f) == 0x0800 and f[6:12] == mac and f[23] == 17
                          and int.from_bytes(f[34:36], "big") == sport)

    def icmp6_from_guest(kind: int):
        return lambda f: ethertype(f) == 0x86DD and f[6:12] == mac and f[20] == 58 and f[54] == kind

    sniffer.clear()
    assert guest_ok(perl_udp(6700, "255.255.255.255", 68, "control"))
    assert sniffer.seen(udp_from_guest(6700)), "positive control: a broadcast from another port"
    sniffer.clear()
    assert guest_ok(perl_udp(67, "255.255.255.255", 68, "rogue-offer"))
    assert not sniffer.seen(udp_from_guest(67)), "a DHCP server answer left the VM"

    sniffer.clear()
    assert guest_ok(perl_icmp6_all_nodes(128, "control"))
    assert sniffer.seen(icmp6_from_guest(128)), "positive control: an ICMPv6 echo to all nodes"
    sniffer.clear()
    assert guest_ok(perl_icmp6_all_nodes(134, "\\0" * 12))
    assert not sniffer.seen(icmp6_from_guest(134)), "a router advertisement left the VM"


def perl_dhcp_discover(chaddr: str) -> str:
    """A perl one-liner for the guest: a DHCPDISCOVER from its own MAC asking for a lease for another
    client address (chaddr), as a pool-exhaustion attack sends by the thousand."""
    hexmac = chaddr.replace(":", "")
    return ("perl -e 'socket(S,2,2,17) or die $!; setsockopt(S,1,6,pack(\"i\",1)); "
            "bind(S,pack(\"S n C4 x8\",2,68,0,0,0,0)) or die \"bind $!\"; "
            "$p=pack(\"C4 N n n a4 a4 a4 a4 a16 a64 a128 C4 C3 C\",1,1,6,0,0x1234abcd,0,0x8000,"
            f"\"\",\"\",\"\",\"\",pack(\"H12\",\"{hexmac}\"),\"\",\"\",99,130,83,99,53,1,1,255); "
            "send(S,$p,0,pack(\"S n C4 x8\",2,67,255,255,255,255)) or die \"send $!\"'")


def dhcp_offer_for(chaddr: str):
    wanted = bytes.fromhex(chaddr.replace(":", ""))

    def match(frame: bytes) -> bool:
        if ethertype(frame) != 0x0800 or frame[23] != 17:
            return False
        ihl = (frame[14] & 0x0F) * 4
        udp = 14 + ihl
        sport = int.from_bytes(frame[udp:udp + 2], "big")
        bootp = udp + 8
        return sport == 67 and frame[bootp] == 2 and frame[bootp + 28:bootp + 34] == wanted
    return match


def test_dhcp_pool_cannot_be_exhausted_with_made_up_client_addresses(world):
    """Every VM of the DMZ has a static lease, so the network has no dynamic range: dnsmasq answers the
    VM's own MAC and nothing else. With a dynamic range added (the defence removed), the same DISCOVER
    gets an offer: the silence is the missing range's doing."""
    sniffer = world["sniffer"]
    made_up = "52:54:00:aa:bb:01"
    sniffer.clear()
    assert guest_ok(perl_dhcp_discover(world["mac"]))
    assert sniffer.seen(dhcp_offer_for(world["mac"]), wait=8), "positive control: an offer for the VM's own MAC"
    sniffer.clear()
    assert guest_ok(perl_dhcp_discover(made_up))
    assert not sniffer.seen(dhcp_offer_for(made_up), wait=8), "dnsmasq offered a lease to a made-up client"
    leases = subprocess.run(["virsh", "-q", "net-dhcp-leases", DMZ], capture_output=True, text=True).stdout
    assert made_up not in leases
    added = ["virsh", "-q", "net-update", DMZ, "add", "ip-dhcp-range",
             "<range start='10.243.0.200' end='10.243.0.210'/>", "--live"]
    subprocess.run(added, check=True, capture_output=True)
    try:
        sniffer.clear()
        assert guest_ok(perl_dhcp_discover(made_up))
        assert sniffer.seen(dhcp_offer_for(made_up), wait=10), "with a range, the made-up client got no offer"
    finally:
        subprocess.run(["virsh", "-q", "net-update", DMZ, "delete", "ip-dhcp-range",
                        "<range start='10.243.0.200' end='10.243.0.210'/>", "--live"], capture_output=True)


def test_the_uplink_subnet_is_blocked_without_being_listed(world):
    """The host's uplink (the wan link here) is nobody's protected subnet, yet the guest cannot reach the
    router on it, while the internet behind that router answers."""
    reset_counters(WAN_NS)
    in_guest(VM_IP, f"ping -c 2 -W 1 {WAN_ROUTER}")
    in_guest(VM_IP, f"ping6 -c 2 -W 1 {WAN_ROUTER6}")
    time.sleep(0.3)
    seen = counters(WAN_NS)
    assert (seen["ping4"], seen["ping6"]) == (0, 0), seen
    assert guest_ok(f"ping -c 1 -W 2 {WAN_HOST}"), "positive control: the internet beyond the router"


# The host's own services, seen from the guest with the table deleted: what reaches the host's stack
# answers (a TCP reset, ICMP port unreachable, an echo reply); what the backstop drops stays silent.
HOST_PROBES = [
    ("tcp to the gateway", "nc -w 2 10.243.0.1 7080 </dev/null; echo rc=$?"),
    ("tcp to the host's LAN address", "nc -w 2 10.244.0.1 7080 </dev/null; echo rc=$?"),
    ("ping the gateway", "ping -c 1 -W 2 10.243.0.1"),
    ("ping the IPv6 gateway", "ping6 -c 1 -W 2 fdd0:243::1"),
    ("ping the host's LAN address", "ping -c 1 -W 2 10.244.0.1"),
]


def test_the_backstop_alone_blocks_the_lan_and_the_host_when_the_table_is_deleted(world):
    """The second, independent layer: the backstop table (render/nft_backstop.py), with the main
    table deleted under the running VM."""
    subprocess.run(["nft", "delete", "table", "inet", "dmzctl-gi"], check=True)
    try:
        for what, command in HOST_PROBES:
            began = time.monotonic()
            rc, out = in_guest(VM_IP, command)
            # A reset or an echo reply comes back at once; a dropped probe waits its full timeout.
            assert "reset" not in out.lower() and "refused" not in out.lower(), f"{what}: the host answered: {out}"
            if command.startswith("ping"):
                assert rc != 0, f"{what}: the host answered: {out}"
            assert time.monotonic() - began >= 1.5, f"{what}: an answer came back at once: {out}"
        # DNS to the gateway stays open at this layer too.
        _rc, out = in_guest(VM_IP, "nslookup dmzctl.invalid 10.243.0.1")
        assert "NXDOMAIN" in out, out
        reset_counters(LAN_NS)
        in_guest(VM_IP, f"nc -w 2 {LAN_HOST} 80 </dev/null")
        in_guest(VM_IP, f"ping -c 2 -W 1 {LAN_HOST}")
        in_guest(VM_IP, f"ping6 -c 2 -W 1 {LAN_HOST6}")
        in_guest(VM_IP, perl_udp(40000, LAN_HOST, 9, "probe"))
        time.sleep(0.5)
        seen = counters(LAN_NS)
        assert (seen["tcp80"], seen["ping4"], seen["ping6"], seen["udp9"]) == (0, 0, 0, 0), seen
        # ... while what the LAN starts, and the hole, still work.
        assert in_ns(LAN_NS, "ping", "-c", "1", "-W", "2", VM_IP, check=False).returncode == 0
        _rc, out = in_guest(VM_IP, f"nc -w 3 {LAN_DNS} 53 </dev/null")
        assert "dns-answer" in out
    finally:
        dmzctl("firewall", "up", str(world["config"]), check=True)


def test_host_probes_have_teeth_without_either_table(world):
    """The same probes with the table and its backstop both deleted: the host answers each of them at
    once. So the silence above is the backstop's doing (the VM's nwfilter is layer 2 only)."""
    subprocess.run(["nft", "delete", "table", "inet", "dmzctl-gi"], check=True)
    subprocess.run(["nft", "delete", "table", "inet", "dmzctl-gi.backstop"], check=True)
    try:
        answered = []
        for what, command in HOST_PROBES:
            for _ in range(3):
                began = time.monotonic()
                rc, out = in_guest(VM_IP, command)
                fast = time.monotonic() - began < 1.5
                if fast and (rc == 0 or "refused" in out.lower() or "reset" in out.lower() or "rc=1" in out):
                    answered.append(what)
                    break
                time.sleep(0.5)
        assert answered == [what for what, _ in HOST_PROBES], answered
    finally:
        dmzctl("firewall", "up", str(world["config"]), check=True)


def test_a_guest_flooding_its_serial_console_cannot_fill_the_host_s_disk(world):
    """The serial console is logged by virtlogd, which rotates the file at max_size and keeps max_backups
    (/etc/libvirt/virtlogd.conf; 2 MiB and 3 by default): 16 MiB written by the guest leave at most
    (max_backups + 1) x max_size on the host."""
    log = Path(f"/var/log/libvirt/qemu/{VM}-serial.log")
    rc, out = in_guest(VM_IP, "head -c 16777216 /dev/zero | tr '\\0' x > /dev/ttyS0; echo done", timeout=300)
    assert "done" in out, out
    files = sorted(log.parent.glob(f"{log.name}*"))
    sizes = {path.name: path.stat().st_size for path in files}
    assert sum(sizes.values()) <= 4 * 2 * 1024 * 1024 + 65536, sizes
    assert len(files) >= 2, f"no rotation happened: {sizes}"


def test_forged_mac_is_dropped(world):
    """Last: the guest's NIC is unusable afterwards."""
    sniffer, real = world["sniffer"], mac_bytes(world["mac"])
    forged = mac_bytes("52:54:00:de:ad:01")
    sniffer.clear()
    assert guest_ok(f"arping -U -c 1 -I eth0 -s {VM_IP} {VM_IP}")
    assert sniffer.seen(lambda f: f[6:12] == real), "positive control"
    # The command server answers over the NIC being changed: run it detached.
    in_guest(VM_IP, "(sleep 0.5; ip link set eth0 down; ip link set eth0 address 52:54:00:de:ad:01; "
                    f"ip link set eth0 up; sleep 1; arping -U -c 3 -I eth0 -s {VM_IP} {VM_IP}; "
                    f"ping -c 3 -W 1 10.243.0.1) >/dev/null 2>&1 &")
    assert not sniffer.seen(lambda f: f[6:12] == forged, wait=6), "a frame with a forged MAC left the VM"
