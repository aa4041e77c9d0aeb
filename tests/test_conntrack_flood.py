"""Conntrack exhaustion: a DMZ "VM" that opens new flows as fast as it can meets its caps, and
the LAN, the other VMs and its own established flows carry on.

A DMZ from tests/configs/conntrack/flood.toml (max_flows 300, max_new_flows 200/second with
a burst of 400; ctk-victim has caps of its own, 1000/second and 600) is brought up by dmzctl without its
VMs: network namespaces on its bridge stand in for them, each with its VM's MAC (the caps'
key). Around it, a "LAN" namespace (protected) and a "wan" namespace reached through the host.
Everything is named ctkt-/ctk- and lives on this machine only; every flood is bounded in
packets and seconds and goes to the wan namespace.

Conntrack entries are read with `conntrack -L` (the host's table: the DMZ's flows are tracked
there, where they are routed) and counted by their original source address.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from dmzctl.config import FlowCaps, load_dmz

import netns

CONFIG = Path(__file__).parent / "configs" / "conntrack" / "flood.toml"
FLOOD = Path(__file__).resolve().parent / "flood.py"
PREFIX = "ctkt-"

FLOODER = ("10.244.0.10", "fdd0:244::10")
VICTIM = ("10.244.0.20", "fdd0:244::20")
LAN = ("10.244.128.10", "fdd0:244:128::10")
# The wan: a router on the host's uplink link (198.18.44.0/24, itself blocked as a host subnet) with
# "the internet" behind it, routed by the host through it: the flood's destination, beyond the host.
WAN_ROUTER = ("198.18.44.100", "2001:db8:44::100")
WAN = ("198.18.45.100", "2001:db8:45::100")
BEYOND_ROUTES = [("198.18.45.0/24", WAN_ROUTER[0]), ("2001:db8:45::/64", WAN_ROUTER[1])]
GATEWAYS = ["10.244.0.1", "fdd0:244::1"]
# On the wan: UDP and TCP 20000-29999 closed (ICMP unreachable, RST); TCP 30000-39999 silently
# dropped (a SYN there stays SYN_SENT for 120 s); TCP 80 a sink that accepts.
CLOSED, SILENT = "20000-29999", "30000-39999"
# Forged sources the flooder sends from: inside the DMZ subnet (count against its MAC's budget)
# and outside it (anti-spoofing drops them: no entry is ever confirmed).
FORGED_INSIDE = [f"10.244.0.{n}" for n in range(100, 150)]
FORGED_OUTSIDE = ["10.244.128.77", "198.18.44.77"]


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return netns.run(argv, check=check, timeout=timeout)


def original_sources(family: int) -> Counter:
    """Conntrack entries of the host, by original source address (conntrack -L; the first src=)."""
    out = run(["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6"], check=False).stdout
    return Counter(m.group(1) for m in re.finditer(r"^\S+\s+\d+\s+\d+\s+.*?src=(\S+)", out, re.M))


def entries(*sources: str) -> int:
    """Entries whose original source is one of `sources` (conntrack -L -s, per address)."""
    total = 0
    for source in sources:
        argv = ["conntrack", "-L", "-s", source] + (["-f", "ipv6"] if ":" in source else [])
        total += len([line for line in run(argv, check=False).stdout.splitlines() if line.strip()])
    return total


def forget(*sources: str) -> None:
    """Delete the conntrack entries of these (test) sources."""
    for source in sources:
        run(["conntrack", "-D", "-s", source] + (["-f", "ipv6"] if ":" in source else []), check=False)


def rule_counters(dmz, chain: str) -> dict[str, int]:
    from dmzctl.host import nft
    from dmzctl.render.nft import table_name

    counts = {}
    for item in (nft.list_table(table_name(dmz)) or {"nftables": []})["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == chain:
            counts[rule.get("comment", "")] = sum(e["counter"]["packets"] for e in rule["expr"]
                                                  if isinstance(e, dict) and isinstance(e.get("counter"), dict))
    return counts


def _require_host():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("ip", "nft", "dmesg", "virsh", "conntrack"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/setup.sh installs it)")


def _cleanup_stale(dmz) -> None:
    if netns.dmz_exists(dmz):
        netns.dmz_down(dmz)
    for name in netns.netns_list():
        if name.startswith(PREFIX):
            netns.ip("netns", "del", name, check=False)
    for path in Path("/sys/class/net").iterdir():
        if path.name.startswith(PREFIX):
            netns.ip("link", "del", path.name, check=False)


class Live:
    """The DMZ up, its two "VMs", the LAN and the wan, warm."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.dmz = load_dmz(CONFIG)
        self.nodes: dict[str, netns.Node] = {}

    def node(self, name: str, addresses, gateways, host_addresses=(), bridge=None, mac=None) -> netns.Node:
        node = netns.Node(name, list(addresses), list(gateways), f"{PREFIX}{name}-h")
        node.netns = PREFIX + name
        self.nodes[name] = node  # registered first: a half-made node is removed too
        node.create(host_addresses=list(host_addresses), bridge=bridge)
        if mac:
            netns.ip("-n", node.netns, "link", "set", "eth0", "address", mac)
        return node

    def start(self) -> None:
        dmz = self.dmz
        lan = self.node("lan", [f"{LAN[0]}/24", f"{LAN[1]}/64"], ["10.244.128.1", "fdd0:244:128::1"],
                        host_addresses=["10.244.128.1/24", "fdd0:244:128::1/64"])
        wan = self.node("wan", [f"{WAN_ROUTER[0]}/24", f"{WAN_ROUTER[1]}/64", f"{WAN[0]}/32", f"{WAN[1]}/128"],
                        ["198.18.44.1", "2001:db8:44::1"], host_addresses=["198.18.44.1/24", "2001:db8:44::1/64"])
        for prefix, via in BEYOND_ROUTES:
            run(["ip", "-6" if ":" in prefix else "-4", "route", "replace", prefix, "via", via])
        # The wan answers closed ports (RST / ICMP unreachable) and drops SILENT ones: its own table.
        wan.exec(["nft", "add table inet ctkt-wan; add chain inet ctkt-wan input { type filter hook input "
                         f"priority 0; policy accept; }}; add rule inet ctkt-wan input tcp dport {SILENT} drop"])
        netns.dmz_up_without_vms(dmz)
        for name, (ip4, ip6) in (("flooder", FLOODER), ("victim", VICTIM)):
            self.node(name, [f"{ip4}/24", f"{ip6}/64"], GATEWAYS, bridge=dmz.bridge, mac=dmz.vm(f"ctk-{name}").mac)
        for name, binds in (("lan", LAN), ("wan", WAN), ("flooder", FLOODER), ("victim", VICTIM)):
            self.nodes[name].sink = netns.Sink(self.workdir, name, self.nodes[name].netns, list(binds), [80], [], [])
        self.warm_up()

    def warm_up(self) -> None:
        """Bridge ports forward after ~4 s (STP), the IPv6 gateway after DAD: retry known-good flows."""
        for name in ("flooder", "victim"):
            node = self.nodes[name]
            assert netns.wait_until(lambda: node.port_state() == "3", 20), f"port of {name} never forwarded"
        for src, dst in (("lan", VICTIM), ("lan", FLOODER), ("flooder", WAN), ("victim", WAN)):
            for address in dst:
                spec = {"id": "warm", "proto": "tcp", "dst": address, "port": 80, "timeout": 1.0}
                assert netns.wait_until(
                    lambda: netns.probe(self.nodes[src], [spec])[0]["observed"] == "connected", 20, 0.2), \
                    f"{src} never reached {address}"

    def reset(self, dmz=None) -> None:
        """A fresh table (empty meters, zero counters, a full log bucket) and no entries of ours."""
        netns.reapply_table(dmz or self.dmz)
        forget(*FLOODER, *VICTIM, *FORGED_INSIDE, *FORGED_OUTSIDE)

    def stop(self) -> None:
        for prefix, _via in BEYOND_ROUTES:
            run(["ip", "-6" if ":" in prefix else "-4", "route", "del", prefix], check=False)
        for node in self.nodes.values():
            node.destroy()
        self.nodes.clear()
        forget(*FLOODER, *VICTIM, *LAN, *GATEWAYS, *FORGED_INSIDE, *FORGED_OUTSIDE)
        netns.dmz_down(self.dmz)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.nodes[name].netns, sys.executable, str(FLOOD), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def flood(self, name: str, *args: str) -> dict:
        return result(self.spawn(name, "flood", *args))


def result(process: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    _require_host()
    world = Live(tmp_path_factory.mktemp("conntrack"))
    _cleanup_stale(world.dmz)
    try:
        world.start()
        yield world
    finally:
        world.stop()
        left = [n for n in netns.netns_list() if n.startswith(PREFIX)]
        left += [p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith(PREFIX)]
        assert not left and not netns.dmz_exists(world.dmz), f"left behind: {left}"


class Sampler:
    """The flooder's entries, read every 0.2 s while a flood runs: the most seen at any time."""

    def __init__(self, sources):
        self.sources, self.most, self.samples = sources, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop)

    def loop(self):
        while not self.done.is_set():
            self.most = max(self.most, entries(*self.sources))
            self.samples += 1
            self.done.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_exc):
        self.done.set()
        self.thread.join()
        self.most = max(self.most, entries(*self.sources))


def _flood_log_lines(dmz, after: float = -1.0) -> list[str]:
    """The flood chain's kernel log lines stamped after `after` (the kernel's seconds since boot):
    by time, not by position, since the ring buffer drops old lines while other tests log."""
    return [line for line in netns.kernel_log(f"dmzctl {dmz.name} flood: ") if _stamp(line) > after]


def _stamp(line: str) -> float:
    return float(line.split("]", 1)[0].strip("[ "))


def _kernel_now() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


@pytest.mark.host
def test_udp_flood_is_capped_and_the_rest_carries_on(live):
    """~3 s of UDP to new ports: the flooder holds at most max_flows entries at any time; every drop is
    counted, a few are logged; meanwhile the LAN reaches the other VM and the flooder itself (flows the LAN
    opens are not capped), an open connection to the flooder goes on, the other VM opens new flows, and the
    flooder's own new flows are dropped (it is over its caps: that is the point)."""
    dmz = live.dmz
    cap = dmz.flow_caps.flows
    live.reset()
    logged_after = _kernel_now()
    token = netns.new_token()
    hold = live.spawn("lan", "hold", "--dst", FLOODER[0], "--port", "80", "--wait", "1.0", "--token", token)
    time.sleep(0.5)  # connected before the flood begins
    with Sampler([FLOODER[0]]) as sampler:
        flood = live.spawn("flooder", "flood", "--kind", "udp", "--dst", WAN[0], "--ports", CLOSED,
                           "--count", "100000", "--seconds", "3")
        time.sleep(0.2)  # the flooder is over max_flows within milliseconds
        watch = {name: live.spawn(src, "connect", "--dst", dst, "--port", "80", "--every", "0.1", "--seconds", "1.5")
                 for name, src, dst in (("lan->victim", "lan", VICTIM[0]), ("lan->flooder", "lan", FLOODER[0]),
                                        ("victim->wan", "victim", WAN[0]), ("flooder->wan", "flooder", WAN[0]))}
        flooded = result(flood)
        seen = {name: result(process) for name, process in watch.items()}
    held = result(hold)
    during = {name: [r for r, at in zip(got["results"], got["at"]) if flooded["began"] <= at <= flooded["ended"]]
              for name, got in seen.items()}
    print(f"\nUDP flood: {flooded['sent']} new flows in {flooded['seconds']} s "
          f"({flooded['sent'] / flooded['seconds']:.0f}/s); most entries seen {sampler.most} "
          f"in {sampler.samples} samples (cap {cap}); attempts during the flood "
          f"{ {name: len(r) for name, r in during.items()} }")
    assert flooded["sent"] > 10 * cap, flooded  # a flood indeed
    # ct count admits the flow that makes max_flows and drops the next, under the list's lock: no slack.
    assert sampler.most <= cap, f"{sampler.most} entries from the flooder; max_flows = {cap}"
    assert sampler.most >= cap * 0.9, "the flood should have reached the cap"
    for name in ("lan->victim", "lan->flooder", "victim->wan"):
        assert set(seen[name]["results"]) == {"connected"}, (name, seen[name])
    # The flooder's own new flows: dropped while it holds max_flows (its UDP entries last 30 s).
    assert set(seen["flooder->wan"]["results"]) == {"timeout"}, seen["flooder->wan"]
    # What the LAN and the other VM did happened while the flood ran (a fast machine ends it sooner):
    assert all(len(during[name]) >= 3 for name in ("lan->victim", "lan->flooder", "victim->wan")), during
    assert held["connected"] and held["reply"] == "ok\n", held
    assert flooded["began"] <= held["at"] <= flooded["ended"], "the held connection spoke during the flood"
    # Counted: every flood packet beyond the admitted ones, by the cap that stopped it.
    caps = rule_counters(dmz, "caps")
    dropped = netns.chain_counter(dmz, "flood")
    assert dropped >= flooded["sent"] - cap
    assert dropped == caps["new flows over max_new_flows"] + caps["flows over max_flows"]
    assert caps["new flows over max_new_flows"] > 0 and caps["flows over max_flows"] > 0, caps
    # Logged under log_rate: a fresh table's bucket holds log_burst lines, 6/hour adds none meanwhile.
    lines = _flood_log_lines(dmz, logged_after)
    assert len(lines) == dmz.log_burst, lines
    assert all(f"SRC={FLOODER[0]} " in line for line in lines), lines


@pytest.mark.host
@pytest.mark.parametrize("kind, ports", [("tcp", SILENT), ("icmp", CLOSED)])
def test_tcp_syn_and_icmp_floods_over_both_families_share_one_budget(live, kind, ports):
    """SYNs to silent ports (each entry waits 120 s in SYN_SENT) and echo requests with new identifiers,
    to IPv4 and IPv6 at once: the VM's entries of both families together stay within max_flows."""
    cap = live.dmz.flow_caps.flows
    live.reset()
    with Sampler(FLOODER) as sampler:
        flooded = live.flood("flooder", "--kind", kind, "--dst", WAN[0], "--dst", WAN[1], "--ports", ports,
                             "--count", "20000", "--seconds", "2")
    v4, v6 = entries(FLOODER[0]), entries(FLOODER[1])
    print(f"\n{kind} flood: {flooded['sent']} in {flooded['seconds']} s; entries IPv4 {v4} + IPv6 {v6}, "
          f"most seen {sampler.most} (cap {cap})")
    assert flooded["sent"] > 10 * cap, flooded
    assert sampler.most <= cap and v4 + v6 <= cap
    assert v4 > 0 and v6 > 0 and v4 + v6 >= cap * 0.9, (v4, v6)


def tcp_resets_sent(node: netns.Node) -> int:
    """RSTs the node's kernel sent (Tcp: OutRsts): one per SYN that reached a closed port."""
    lines = [line.split() for line in node.exec(["cat", "/proc/net/snmp"]).stdout.splitlines() if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutRsts")])


@pytest.mark.host
def test_new_flow_rate_is_capped_when_flows_end_at_once(live):
    """SYNs to closed ports: the wan answers RST and conntrack forgets the flow at once, so max_flows never
    holds them back; max_new_flows does: what reaches the wan (one RST each) is at most the burst plus the
    rate over the flood's duration."""
    caps = live.dmz.flow_caps
    rate, per = caps.rate
    assert per == "second"
    live.reset()
    wan = live.nodes["wan"]
    resets = tcp_resets_sent(wan)
    flooded = live.flood("flooder", "--kind", "tcp", "--dst", WAN[0], "--ports", CLOSED,
                         "--count", "40000", "--seconds", "2")
    time.sleep(0.2)  # the last RSTs
    arrived = tcp_resets_sent(wan) - resets
    counted = rule_counters(live.dmz, "caps")
    most = caps.new_burst + rate * flooded["seconds"]
    print(f"\nTCP to closed ports: {flooded['sent']} in {flooded['seconds']} s; {arrived} reached the wan "
          f"(burst {caps.new_burst} + {rate}/s: at most {most:.0f}); caps counters {counted}; "
          f"entries left {entries(FLOODER[0])}")
    assert flooded["sent"] > 10 * caps.new_burst, flooded
    # + 1 s of tokens: the seconds are the sender's; the bucket is judged by the host's clock, which
    # starts with the first packet and ends a little after the sender's last.
    assert caps.new_burst <= arrived <= most + rate, arrived
    assert counted["new flows over max_new_flows"] >= flooded["sent"] - arrived
    assert counted["flows over max_flows"] == 0


@pytest.mark.host
def test_a_flood_of_the_hosts_own_dns_is_capped_too(live):
    """The input hook has the same caps: DNS queries to the gateway's dnsmasq (a hole the DMZ always has
    with dhcp), each from a new source port, would each take an entry of the host's table."""
    cap = live.dmz.flow_caps.flows
    live.reset()
    flooded = live.flood("flooder", "--kind", "udp", "--dst", GATEWAYS[0], "--ports", "53-53", "--new-socket",
                         "--count", "10000", "--seconds", "2")
    admitted = entries(FLOODER[0])
    counted = rule_counters(live.dmz, "caps")
    print(f"\nDNS to the gateway: {flooded['sent']} in {flooded['seconds']} s, {admitted} entries (cap {cap})")
    assert flooded["sent"] > 10 * cap, flooded
    assert cap * 0.9 <= admitted <= cap
    # Each query from a new socket; a source port the kernel hands out twice meets its earlier, answered
    # flow (established: no new entry, not capped), hence the few queries of slack.
    assert counted["flows over max_flows"] + counted["new flows over max_new_flows"] >= flooded["sent"] - cap - 20


@pytest.mark.host
def test_forged_sources_count_against_the_vm_that_sends_them(live):
    """Forged sources inside the DMZ subnet share the sender's budget (the key is its MAC, not the
    address); forged sources outside it are dropped by anti-spoofing and never become an entry."""
    dmz = live.dmz
    cap = dmz.flow_caps.flows
    live.reset()
    outside = live.flood("flooder", "--kind", "udp", "--dst", WAN[0], "--ports", CLOSED,
                         *[f"--src={a}" for a in FORGED_OUTSIDE], "--count", "2000", "--seconds", "2")
    # Under the caps (a fresh table: the first max_new_flows_burst of them) they reach anti-spoofing.
    spoofed = netns.chain_counter(dmz, "spoofed")
    live.reset()
    inside = live.flood("flooder", "--kind", "udp", "--dst", WAN[0], "--ports", CLOSED,
                        *[f"--src={a}" for a in FORGED_INSIDE], "--count", "10000", "--seconds", "2")
    forged = entries(*FORGED_INSIDE)
    by_source = original_sources(4)
    print(f"\nforged inside: {inside['sent']} sent, {forged} entries over {len(FORGED_INSIDE)} addresses; "
          f"outside: {outside['sent']} sent, {sum(by_source[a] for a in FORGED_OUTSIDE)} entries")
    assert inside["sent"] > 10 * cap and outside["sent"] > 100
    assert cap * 0.9 <= forged <= cap
    assert len([a for a in FORGED_INSIDE if by_source[a]]) > 1  # several addresses, one budget
    assert all(by_source[a] == 0 for a in FORGED_OUTSIDE)
    assert spoofed >= dmz.flow_caps.new_burst * 0.9, spoofed


@pytest.mark.host
def test_a_vm_with_caps_of_its_own(live):
    """ctk-victim has caps of its own (max_new_flows 1000/second, max_flows 600; its MAC goes to caps_1):
    the same flood leaves twice the flooder's entries."""
    own = live.dmz.vm("ctk-victim").flow_caps.flows
    assert own == 2 * live.dmz.flow_caps.flows
    live.reset()
    flooded = live.flood("victim", "--kind", "udp", "--dst", WAN[0], "--ports", CLOSED,
                         "--count", "20000", "--seconds", "2")
    admitted = entries(VICTIM[0])
    print(f"\nvictim's own caps: {flooded['sent']} sent, {admitted} entries (its max_flows {own})")
    assert own * 0.9 <= admitted <= own
    assert sum(rule_counters(live.dmz, "caps_1").values()) > 0 and not any(rule_counters(live.dmz, "caps").values())


@pytest.mark.host
def test_the_live_table_with_filled_meters_is_the_configs(live):
    """check, plan and guard compare the live table with the config's: the meters' elements are state, not
    drift (else the guard would "restore" the table, and with it empty meters, under every flood)."""
    from dmzctl.host import nft
    from dmzctl.ops.common import table_only
    from dmzctl.state import observe_table
    from dmzctl.render.nft import table_name

    live.reset()
    live.flood("flooder", "--kind", "udp", "--dst", WAN[0], "--ports", CLOSED, "--count", "2000", "--seconds", "2")
    text = nft.list_table_text(table_name(live.dmz))
    assert "ct count over 300" in text.split("chain")[0], "the meters hold the flooder's MAC"
    assert observe_table(table_only(live.dmz)).in_sync


@pytest.mark.host
def test_without_the_caps_the_same_flood_fills_the_table(live):
    """The caps are what holds the flood back: with caps no flood meets, the same UDP flood (bounded at
    5000 flows) leaves an entry for nearly every packet."""
    cap = live.dmz.flow_caps.flows
    uncapped = dataclasses.replace(live.dmz, flow_caps=FlowCaps("9999999/second", 10_000_000, 10_000_000))
    live.reset(uncapped)
    try:
        flooded = live.flood("flooder", "--kind", "udp", "--dst", WAN[0], "--ports", CLOSED,
                             "--count", "5000", "--seconds", "3")
        admitted = entries(FLOODER[0])
    finally:
        live.reset()
    print(f"\nuncapped: {flooded['sent']} sent in {flooded['seconds']} s, {admitted} entries (cap was {cap})")
    assert admitted > 10 * cap and admitted >= flooded["sent"] * 0.9
