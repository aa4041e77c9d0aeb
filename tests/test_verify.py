"""`dmzctl verify`: its plan (pure) and the real thing against the namespace world of the isolation tests.

The live tests run the CLI as a user would, against tests/configs/isolation/*.toml
brought up without VMs, with the LAN and "wan" namespaces answering. They pass
--skip for every host address that is not one of this test's own (the machine's
link 192.0.2.0/24 and fd00::/64 above all, and other engineers' test networks).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import netns
from netns import INTERNET
from dmzctl.config import load_dmz, parse_dmz
from dmzctl.explain import host_address_set
from dmzctl.verify import (Probe, choose_addresses, host_addresses_from_ip_json, plan, sample_address)
from dmzctl.verify.probes import IMPLICIT_KINDS, implicit_destinations, stay_on_this_host

CONFIGS = Path(__file__).parent / "configs" / "isolation"
OPEN = CONFIGS / "open.toml"
CLOSED = CONFIGS / "closed.toml"
OURS = [ipaddress.ip_network(n) for n in ("10.231.0.0/24", "10.232.0.0/24", "10.233.0.0/24",
                                          "fdd0:231::/64", "fdd0:232::/64", "fdd0:233::/64",
                                          "198.18.33.0/24", "2001:db8:33::/64")]
TARGETS = [f"{INTERNET[0]}:80", f"[{INTERNET[1]}]:80"]
SRC4, SRC6 = ipaddress.ip_address("10.231.0.127"), ipaddress.ip_address("fdd0:231::ffff:ffff:ffff:fffe")


# --- the plan (pure) ---------------------------------------------------------------

def _by(probes: list[Probe], kind: str) -> list[Probe]:
    return [p for p in probes if p.kind == kind]


def test_plan_probes_samples_host_holes_and_targets_with_the_policy_s_expectations():
    dmz = load_dmz(OPEN)
    targets = [(ipaddress.ip_address(INTERNET[0]), 80)]
    probes, notes = plan(dmz, SRC4, SRC6, ["10.232.0.1", "fdd0:232::1", "10.233.0.1"], targets, True)
    destinations = {str(p.dst) for p in probes if p.kind != "private"}
    # Only the protected samples (not the host's own 10.232.0.1 and fdd0:232::1), hole destinations, the host,
    # the explicit target and one sample of each implicit block: never anything else.
    assert destinations == {"10.232.0.2", "fdd0:232::2", "10.232.0.1", "fdd0:232::1", "10.232.0.53",
                            "10.232.0.10", "10.232.0.25", "fdd0:232::25", "fdd0:232::10", "10.231.0.1",
                            "fdd0:231::1", "10.233.0.1", INTERNET[0]}
    private = _by(probes, "private")
    assert {str(p.dst) for p in private} == {"10.0.0.2", "172.16.0.2", "192.168.0.2", "100.64.0.2",
                                            "169.254.169.254", "fc00::2"}
    assert all(p.expected.decided_by == "private" and not p.expected.allowed for p in private)
    assert "private range 10.0.0.0/8" in next(p.note for p in private if str(p.dst) == "10.0.0.2")
    hosts = host_address_set(dmz, ["10.232.0.1", "fdd0:232::1", "10.233.0.1"])
    assert {p.dst for p in _by(probes, "protected")} == {sample_address(n, hosts) for n in dmz.protected}
    assert all(p.expected.decided_by == "protected" and not p.expected.allowed for p in _by(probes, "protected"))
    assert all(not p.expected.allowed for p in _by(probes, "hole-edge")), "nothing broader than a hole"
    holes = {(str(p.dst), p.proto, p.port): p.expected for p in _by(probes, "hole")}
    assert holes[("10.232.0.53", "udp", 53)].allowed and holes[("10.232.0.53", "udp", 53)].origin == "dns"
    assert not holes[("10.232.0.25", "tcp", 25)].allowed, "allow[2] is from dmzt-mail, not the probe"
    assert not holes[("10.232.0.10", "sctp", 9000)].allowed, "allow[5] is from 10.231.0.0/28 only"
    assert holes[("fdd0:232::10", "icmpv6", None)].allowed
    dns = [p for p in probes if str(p.dst) == "10.231.0.1" and p.port == 53]
    assert dns and all(p.expected.allowed for p in dns)
    assert [p.expected.decided_by for p in _by(probes, "target")] == ["egress-any", "egress-any"]
    assert not notes, notes


def test_plan_without_targets_says_egress_was_not_probed_and_closed_blocks_targets():
    dmz = load_dmz(CLOSED)
    probes, notes = plan(dmz, SRC4, SRC6)
    assert any("egress" in n and "--target" in n for n in notes)
    probes, notes = plan(dmz, SRC4, SRC6, (), [(ipaddress.ip_address(INTERNET[1]), None)])
    assert [p.expected.decided_by for p in _by(probes, "target")] == ["egress", "egress"]


def _vpk_dmz(protected: list[str]):
    """A DMZ of this file's own (pure: never brought up)."""
    return parse_dmz({"dmz": {"name": "vpk-plan", "gateway": "10.226.0.1/24", "gateway6": "fdd0:226::1/64",
                              "protected": protected, "egress": "any"}})


def test_protected_samples_are_not_the_host_s_own_addresses():
    dmz = _vpk_dmz(["10.226.1.0/24", "10.226.2.1/32", "fdd0:226:1::/64"])
    hosts = ["10.226.1.1", "10.226.2.1", "fdd0:226:1::1"]
    probes, notes = plan(dmz, ipaddress.ip_address("10.226.0.200"), ipaddress.ip_address("fdd0:226::200"), hosts)
    protected = _by(probes, "protected")
    # The host's own address in a protected subnet is judged by the to-host rules: the sample avoids it.
    assert {str(p.dst) for p in protected} == {"10.226.1.2", "fdd0:226:1::2"}
    assert all(p.expected.decided_by == "protected" for p in protected)
    assert {p.kind for p in probes if str(p.dst) in hosts} == {"host"}
    # A protected /32 that is the host's holds nothing else: not probed as such, and said so.
    assert [n for n in notes if "10.226.2.1/32" in n] == [
        "protected 10.226.2.1/32 not probed as such: it holds only the host's own addresses (the host's rows "
        "probe them)"]
    net = ipaddress.ip_network("10.226.1.0/24")
    assert sample_address(net) == ipaddress.ip_address("10.226.1.1")
    assert sample_address(net, {ipaddress.ip_address("10.226.1.1")}) == ipaddress.ip_address("10.226.1.2")
    assert sample_address(ipaddress.ip_network("10.226.2.1/32"), {ipaddress.ip_address("10.226.2.1")}) is None


def test_every_target_has_rows_of_its_own():
    """A target equal to a hole's destination (or to a protected sample) still gets its tcp and icmp rows."""
    dmz = load_dmz(OPEN)
    hole, sample = ipaddress.ip_address("10.232.0.25"), ipaddress.ip_address("10.232.0.2")
    targets = [(hole, 25), (sample, 22), (hole, 25)]
    probes, _ = plan(dmz, SRC4, SRC6, ["10.232.0.1", "fdd0:232::1"], targets)
    rows = [(p.dst, p.proto, p.port) for p in _by(probes, "target")]
    assert rows == [(hole, "tcp", 25), (hole, "icmp", None), (sample, "tcp", 22), (sample, "icmp", None)]
    assert [(p.dst, p.port) for p in _by(probes, "hole") if p.dst == hole] == [(hole, 25)]
    assert {(p.proto, p.port) for p in _by(probes, "protected") if p.dst == sample} == {("tcp", 22), ("udp", 53),
                                                                                 ("icmp", None)}
    assert len({p.id for p in probes}) == len(probes)


def test_stay_on_this_host_keeps_only_samples_on_the_host_s_links():
    dmz = load_dmz(OPEN)
    probes, _ = plan(dmz, SRC4, SRC6)
    implicit = implicit_destinations(probes)
    assert implicit and all(p.kind in IMPLICIT_KINDS for p in probes if p.dst in implicit)
    linked, routed = implicit[0], implicit[1]
    routes = {linked: {"dst": str(linked), "dev": "vpk0"}, routed: {"gateway": "10.226.0.254", "dev": "vpk1"}}
    kept, notes = stay_on_this_host(probes, routes)
    assert {p.dst for p in kept if p.kind in IMPLICIT_KINDS} == {linked}
    assert [p for p in probes if p.kind not in IMPLICIT_KINDS] == [p for p in kept if p.kind not in IMPLICIT_KINDS]
    assert sum(f"{routed} via 10.226.0.254 on vpk1, beyond this machine" in n for n in notes) == 1
    assert len(notes) == len(implicit) - 1, "one note per destination not probed (no route: nowhere)"


def test_probe_status():
    dmz = load_dmz(OPEN)
    probes, _ = plan(dmz, SRC4, SRC6)
    blocked = next(p for p in probes if not p.expected.allowed)
    allowed = next(p for p in probes if p.expected.allowed)
    for probe, observed, status in ((blocked, "timeout", "ok"), (blocked, "refused", "MISMATCH"),
                                    (blocked, "reply", "MISMATCH"), (allowed, "connected", "ok"),
                                    (allowed, "unreachable", "ok"), (allowed, "timeout", "unconfirmed"),
                                    (allowed, "error", "error")):
        probe.observed = observed
        assert probe.status == status, (probe.label(), observed)


def test_host_addresses_from_ip_json_skips_loopback_link_local_and_skip_prefixes():
    data = [
        {"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "scope": "host"}, {"local": "::1", "scope": "host"}]},
        {"ifname": "eth0", "addr_info": [{"local": "192.0.2.2", "scope": "global"},
                                         {"local": "fd00::2", "scope": "global"},
                                         {"local": "fe80::1", "scope": "link"}]},
        {"ifname": "br", "addr_info": [{"local": "10.231.0.1", "scope": "global"},
                                       {"local": "fdd0:231::1", "scope": "global"}]},
    ]
    found = host_addresses_from_ip_json(data, ["192.0.2.0/24", "fd00::/64"])
    assert [str(a) for a in found] == ["10.231.0.1", "fdd0:231::1"]
    assert len(host_addresses_from_ip_json(data)) == 4


def test_choose_addresses_takes_the_top_of_the_static_half_and_avoids_what_is_in_use():
    dmz = load_dmz(OPEN)
    src4, src6 = choose_addresses(dmz, set())
    assert (str(src4), str(src6)) == ("10.231.0.127", "fdd0:231::ffff:ffff:ffff:fffe")
    src4, src6 = choose_addresses(dmz, {ipaddress.ip_address("10.231.0.127"), src6})
    assert (str(src4), str(src6)) == ("10.231.0.126", "fdd0:231::ffff:ffff:ffff:fffd")


def test_a_failing_bridge_or_ip_call_is_one_line_host_error():
    """ProbeNamespace's calls (`bridge link set ... isolated on` among them) check their return code."""
    from dmzctl.errors import HostError
    from dmzctl.host.netns import _run

    with pytest.raises(HostError) as failed:
        _run("bridge", "link", "set", "dev", "vpk-none0", "isolated", "on")  # no such device: changes nothing
    assert str(failed.value).startswith("`bridge link set dev vpk-none0 isolated on` failed: ")
    assert "\n" not in str(failed.value)
    with pytest.raises(HostError, match="vpk-no-such-tool"):
        _run("vpk-no-such-tool")


# --- live -----------------------------------------------------------------------------

def _require_host():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("ip", "bridge", "nft", "virsh"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def _foreign_host_addresses() -> list[str]:
    """--skip for every address and subnet of this host that is not one of the test's own: verify
    samples the host's subnets, and other subnets here are none of this test's business."""
    data = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True).stdout)
    skip = ["192.0.2.0/24", "fd00::/64"]
    for address in host_addresses_from_ip_json(data):
        if not any(address.version == n.version and address in n for n in OURS):
            skip.append(f"{address}/{address.max_prefixlen}")
    for link in data:
        for info in link.get("addr_info", []):
            subnet = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
            if not subnet.is_link_local and not any(subnet.subnet_of(n) for n in OURS if n.version == subnet.version):
                skip.append(str(subnet))
    return skip


class Up:
    def __init__(self, world: netns.World):
        self.world = world
        self.dmz = None

    def use(self, path: Path):
        dmz = load_dmz(path)
        if self.dmz is not None and self.dmz != dmz:
            netns.dmz_down(self.dmz)
            self.dmz = None
        if self.dmz is None:
            netns.dmz_up_without_vms(dmz)
            self.dmz = dmz
        return path

    def close(self):
        if self.dmz is not None:
            netns.dmz_down(self.dmz)
            self.dmz = None


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    _require_host()
    for path in (OPEN, CLOSED):
        dmz = load_dmz(path)
        if netns.dmz_exists(dmz):
            netns.dmz_down(dmz)
    with netns.World(tmp_path_factory.mktemp("verify")) as world:
        state = Up(world)
        try:
            yield state
        finally:
            state.close()
    assert not netns.leftovers(), netns.leftovers()


def _verify_argv(config: Path, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "dmzctl.cli", "verify", str(config), "--timeout", "1.5", "--json"]
    for target in TARGETS:
        argv += ["--target", target]
    for prefix in _foreign_host_addresses():
        argv += ["--skip", prefix]
    return argv + list(extra)


def _probe_namespaces(pid: int) -> list[str]:
    return [n for n in netns.netns_list() if n == f"dmzv-{str(pid)[-7:]}"]


def _gone(pid: int) -> bool:
    tag = str(pid)[-7:]
    return not _probe_namespaces(pid) and not Path(f"/sys/class/net/dmzv{tag}h").exists()


@pytest.mark.host
def test_verify_passes_on_a_dmz_as_configured(up):
    config = up.use(OPEN)
    result = subprocess.run(_verify_argv(config), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report, = json.loads(result.stdout)
    assert report["ok"] and not report["problems"]
    counts = report["counts"]
    assert counts["probes"] == counts["ok"] == counts["blocked_as_expected"] + counts["allowed_as_expected"]
    assert counts["allowed_as_expected"] >= 10 and counts["blocked_as_expected"] >= 25
    probed = {p["dst"] for p in report["probes"]}
    assert all(any(ipaddress.ip_address(a) in n for n in OURS) for a in probed), sorted(probed)
    assert {p["decided_by"] for p in report["probes"]} >= {"hole", "protected", "host", "dns", "egress-any"}


@pytest.mark.host
def test_verify_text_output(up):
    config = up.use(OPEN)
    argv = [a for a in _verify_argv(config) if a != "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: " in result.stdout and "blocked and" in result.stdout
    assert "hole allow[6]" in result.stdout


@pytest.mark.host
def test_verify_fails_when_the_table_is_deleted_while_it_runs(up):
    from dmzctl.host import nft
    from dmzctl.render.nft import delete_batch, table_name

    config = up.use(OPEN)
    dmz = load_dmz(config)
    process = subprocess.Popen(_verify_argv(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert netns.wait_until(lambda: _probe_namespaces(process.pid) or process.poll() is not None, 30)
        assert process.poll() is None, process.communicate()
        nft.apply(delete_batch(table_name(dmz)))  # our own test DMZ's table
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        netns.reapply_table(dmz)
    assert process.returncode == 1, out + err
    report, = json.loads(out)
    assert not report["ok"]
    assert any("vanished" in p for p in report["problems"]), report["problems"]
    mismatched = [p for p in report["probes"] if p["status"] == "MISMATCH"]
    # Without the table the protected LAN and the host answer: the probes say so. (The LAN's answers come
    # from its hosts behind the holes, 10.232.0.10 and .25, probed beside and outside their holes; the
    # protected sample 10.232.0.2 is nobody in this world, and the host's "host unreachable" for it comes
    # only when ARP gives up, ~3 s, after this test's 1.5 s.)
    lan = ipaddress.ip_network("10.232.0.0/24")
    assert any(p["kind"] in ("hole", "hole-edge") and ipaddress.ip_address(p["dst"]) in lan for p in mismatched)
    assert any(p["kind"] == "host" for p in mismatched)
    assert _gone(process.pid)


def _agent_running(pid: int) -> bool:
    names = _probe_namespaces(pid)
    if not names:
        return False
    pids = subprocess.run(["ip", "netns", "pids", names[0]], capture_output=True, text=True).stdout.split()
    for agent in pids:
        try:
            argv = Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dmzctl.verify.agent" in argv:
            return True
    return False


@pytest.mark.host
@pytest.mark.parametrize("when", ["setting-up", "probing"])
def test_verify_cleans_up_when_terminated(up, when):
    config = up.use(OPEN)
    process = subprocess.Popen(_verify_argv(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = (lambda: _probe_namespaces(process.pid)) if when == "setting-up" else \
            (lambda: _agent_running(process.pid))
        assert netns.wait_until(lambda: ready() or process.poll() is not None, 30, 0.05)
        assert process.poll() is None, process.communicate()
        os.kill(process.pid, signal.SIGTERM)  # the process this test started
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, out + err
    assert "interrupted" in err
    assert netns.wait_until(lambda: _gone(process.pid), 5), netns.netns_list()


@pytest.mark.host
def test_verify_egress_none_and_isolated_vms(up):
    config = up.use(CLOSED)
    result = subprocess.run(_verify_argv(config), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report, = json.loads(result.stdout)
    targets = [p for p in report["probes"] if p["kind"] == "target"]
    assert targets and all(p["expected"] == "blocked" and p["decided_by"] == "egress" for p in targets)


@pytest.mark.host
def test_verify_refuses_a_dmz_that_is_not_up(up):
    up.close()
    result = subprocess.run(_verify_argv(OPEN), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "bridge dmzt-iso0 does not exist" in result.stderr
