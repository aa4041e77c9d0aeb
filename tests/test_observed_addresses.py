"""`status`: the addresses a VM's config names, apart from those seen on the host.

The formatting is pure (dmzctl/addresses.py); the host test runs the tiny guest under libvirt
(one boot): a DHCP lease and the bridge's neighbour table show up as observed addresses while it
runs, and nothing but "configured" once it is off. The same module checks DHCPv6 through dmzctl's
own table from a namespace on the bridge: the configured ip6 of a VM goes to its MAC and to no other
(the tiny guest's busybox has no DHCPv6 client), also after a VM was added to the running network.

Names start with `v6-`; the DMZ is 10.217.0.0/24 and fdd0:217::/64.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmzctl.addresses import AGENT, LEASE, NEIGHBOUR, ObservedAddress, format_addresses, observed_addresses

MAC = "52:54:00:21:71:10"


# --- pure -------------------------------------------------------------------------------------

def test_each_address_once_with_every_source_that_saw_it():
    leases = [{"mac": MAC, "ipaddr": "10.217.0.10", "type": 0},
              {"mac": MAC.upper(), "ipaddr": "fdd0:217::10", "type": 1},
              {"mac": "52:54:00:99:99:99", "ipaddr": "10.217.0.99"}]
    neighbours = [{"dst": "10.217.0.10", "lladdr": MAC, "state": ["REACHABLE"]},
                  {"dst": "fdd0:217::5054:ff:fe21:7110", "lladdr": MAC, "state": ["STALE"]},
                  {"dst": "fe80::5054:ff:fe21:7110", "lladdr": MAC, "state": ["REACHABLE"]},  # link-local: left out
                  {"dst": "10.217.0.11", "lladdr": MAC, "state": ["FAILED"]},
                  {"dst": "10.217.0.12", "state": ["INCOMPLETE"]},
                  {"dst": "10.217.0.99", "lladdr": "52:54:00:99:99:99", "state": ["REACHABLE"]}]
    agent = [(MAC, "10.217.0.10"), (MAC, "127.0.0.1"), ("00:00:00:00:00:00", "::1"), (MAC, "fdd0:217::10")]
    found = observed_addresses(MAC, leases, neighbours, agent)
    assert found == [ObservedAddress("10.217.0.10", (LEASE, NEIGHBOUR, AGENT)),
                     ObservedAddress("fdd0:217::10", (LEASE, AGENT)),
                     ObservedAddress("fdd0:217::5054:ff:fe21:7110", (NEIGHBOUR,))]
    assert found[0].to_dict() == {"address": "10.217.0.10", "sources": ["dhcp lease", "neighbour", "guest agent"]}


def test_garbage_from_the_sources_is_ignored():
    assert observed_addresses(MAC, [{"mac": MAC}, {"mac": MAC, "ipaddr": "not an address"}],
                              [{"lladdr": MAC}, {"dst": "ff02::1", "lladdr": MAC}], [(MAC, "")]) == []


def test_format_keeps_configured_and_observed_apart():
    seen = [ObservedAddress("10.217.0.10", (LEASE, NEIGHBOUR)), ObservedAddress("fdd0:217::10", (NEIGHBOUR,))]
    assert format_addresses(["10.217.0.10", "fdd0:217::10"], seen) == (
        "configured: 10.217.0.10 fdd0:217::10 · observed: 10.217.0.10 (dhcp lease, neighbour), "
        "fdd0:217::10 (neighbour)")
    assert format_addresses(["10.217.0.10"], []) == "configured: 10.217.0.10 · observed: none yet"
    # Not running: no observed part at all, never an address shown as if in use.
    assert format_addresses(["10.217.0.10"], None) == "configured: 10.217.0.10"
    assert format_addresses([], None) == "configured: none"


def test_status_of_a_vm_that_is_not_running_has_only_configured():
    from dmzctl.config import parse_dmz
    from dmzctl.ops.inspect import _vm_status

    dmz = parse_dmz({"dmz": {"name": "v6-u", "gateway": "10.217.0.1/24", "gateway6": "fdd0:217::1/64",
                             "protected": ["10.218.0.0/24"]},
                     "vm": [{"name": "a", "ip": "10.217.0.10", "ip6": "fdd0:217::10", "mac": MAC,
                             "disks": ["/x.qcow2"]}]})
    seen = {"leases": [{"mac": MAC, "ipaddr": "10.217.0.10"}],
            "neighbours": [{"dst": "10.217.0.10", "lladdr": MAC, "state": ["STALE"]}], "agent": {}}
    absent = _vm_status(dmz, dmz.vms[0], None, [], seen)
    assert (absent.state, absent.configured, absent.observed) == ("absent", ["10.217.0.10", "fdd0:217::10"], None)


# --- on the host ------------------------------------------------------------------------------

DMZ, WEB, GHOST, LATE = "v6-st", "v6-st-web", "v6-st-ghost", "v6-st-late"
GATEWAY, GATEWAY6 = "10.217.0.1/24", "fdd0:217::1/64"
WEB_IP, WEB_IP6 = "10.217.0.10", "fdd0:217::10"
GHOST_MAC, GHOST_IP6 = "52:54:00:21:71:20", "fdd0:217::20"    # configured, never started: a namespace is it
LATE_MAC, LATE_IP6 = "52:54:00:21:71:30", "fdd0:217::30"      # added to the running DMZ later
CLIENT_NS, CLIENT_HOST, CLIENT_IF = "v6-st-c", "v6-st-ch", "v6-st-cn"


def dhcpv6_solicit(ifname: str, timeout: float = 3) -> list[str]:
    """Run in a namespace: a DHCPv6 Solicit (DUID-EN, as systemd makes them; no hostname), the IA_NA
    addresses the Advertise offers. dnsmasq can only tell the client by the MAC it sees on the link."""
    def option(code, data):
        return struct.pack("!HH", code, len(data)) + data

    duid = struct.pack("!HI", 2, 32473) + os.urandom(8)
    message = bytes([1]) + os.urandom(3) + option(1, duid) + option(8, b"\0\0") + option(3, struct.pack("!III", 1, 0, 0))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind(("::", 546))
        sock.settimeout(timeout)
        sock.sendto(message, ("ff02::1:2", 547, 0, socket.if_nametoindex(ifname)))
        reply = sock.recv(4096)
    addresses, offset, body = [], 4, reply
    while offset + 4 <= len(body):
        code, length = struct.unpack("!HH", body[offset:offset + 4])
        if code == 3:  # IA_NA: IAID, T1, T2, then options
            inner, at = body[offset + 16:offset + 4 + length], 0
            while at + 4 <= len(inner):
                icode, ilength = struct.unpack("!HH", inner[at:at + 4])
                if icode == 5:
                    addresses.append(socket.inet_ntop(socket.AF_INET6, inner[at + 4:at + 20]))
                at += 4 + ilength
        offset += 4 + length
    return addresses


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=60)


def solicit_as(mac: str, tries: int = 8) -> list[str]:
    """From the client namespace, with its NIC's MAC set to `mac` (its link-local address follows it)."""
    sh("ip", "-n", CLIENT_NS, "link", "set", CLIENT_IF, "down")
    sh("ip", "-n", CLIENT_NS, "link", "set", CLIENT_IF, "address", mac)
    sh("ip", "-n", CLIENT_NS, "link", "set", CLIENT_IF, "up")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_observed_addresses as t; "
            f"print(' '.join(t.dhcpv6_solicit({CLIENT_IF!r})))")
    for _ in range(tries):  # the new bridge port forwards after ~4 s; its link-local address after DAD
        result = sh("ip", "netns", "exec", CLIENT_NS, sys.executable, "-c", code, check=False)
        if result.returncode == 0:
            return result.stdout.split()
        time.sleep(1.5)
    raise AssertionError(f"no DHCPv6 answer for {mac}: {result.stderr[-800:]}")


@pytest.fixture
def client_ns():
    def remove():
        sh("ip", "netns", "del", CLIENT_NS, check=False)
        sh("ip", "link", "del", CLIENT_HOST, check=False)

    remove()
    try:
        yield remove
    finally:
        remove()


def attach_client(bridge: str) -> None:
    sh("ip", "netns", "add", CLIENT_NS)
    sh("ip", "link", "add", CLIENT_HOST, "type", "veth", "peer", "name", CLIENT_IF, "netns", CLIENT_NS)
    sh("ip", "link", "set", CLIENT_HOST, "master", bridge, "up")
    sh("ip", "-n", CLIENT_NS, "link", "set", "lo", "up")


def status_of(config: Path) -> tuple[dict, str]:
    from guest import dmzctl

    report = json.loads(dmzctl("status", str(config), "--json").stdout)[0]
    return {vm["name"]: vm for vm in report["vms"]}, dmzctl("status", str(config)).stdout


def write_config(path: Path, late: bool = False) -> Path:
    from guest import guest_dir, kernel_vm_toml

    web = kernel_vm_toml(WEB, WEB_IP, GATEWAY, guest_dir(), ip6=WEB_IP6, gateway6=GATEWAY6)
    web = web.replace(f" dmz.ip={WEB_IP}/24 dmz.gw=10.217.0.1", "")  # IPv4 by DHCP: a lease to observe
    vms = [web, f'[[vm]]\nname = "{GHOST}"\nmac = "{GHOST_MAC}"\nip = "10.217.0.20"\nip6 = "{GHOST_IP6}"\n'
                f'disks = ["/var/tmp/{GHOST}-never-started.qcow2"]\nautostart = false\n']
    if late:
        vms.append(f'[[vm]]\nname = "{LATE}"\nmac = "{LATE_MAC}"\nip = "10.217.0.30"\nip6 = "{LATE_IP6}"\n'
                   f'disks = ["/var/tmp/{LATE}-never-started.qcow2"]\nautostart = false\n')
    path.write_text(f"""
[dmz]
name = "{DMZ}"
bridge = "v6st0"
gateway = "{GATEWAY}"
gateway6 = "{GATEWAY6}"
protected = ["10.218.0.0/24", "fdd0:218::/64"]

""" + "\n".join(vms))
    return path


@pytest.mark.host
@pytest.mark.guest
def test_status_shows_observed_addresses_while_running_and_none_after(tmp_path, monkeypatch, client_ns):
    from guest import dmzctl, in_guest, wait_for_serial, wipe

    monkeypatch.setenv("DMZCTL_EVENT_LOG", str(tmp_path / "events.log"))
    config = write_config(tmp_path / f"{DMZ}.toml")
    wipe(DMZ, [WEB, GHOST, LATE])
    try:
        dmzctl("up", str(config), "--vm", WEB, check=True)
        wait_for_serial(WEB, f"DMZGUEST NET ip={WEB_IP}", timeout=120)
        assert in_guest(WEB_IP, "true")[0] == 0 and in_guest(WEB_IP6, "true", timeout=60)[0] == 0
        vms, text = status_of(config)
        observed = {o["address"]: o["sources"] for o in vms[WEB]["observed"]}
        assert "dhcp lease" in observed[WEB_IP] and "neighbour" in observed[WEB_IP], observed
        assert observed[WEB_IP6] == ["neighbour"], observed  # static in this guest: no lease, seen on the link
        assert vms[WEB]["configured"] == [WEB_IP, WEB_IP6]
        assert vms[GHOST]["state"] == "absent" and vms[GHOST]["observed"] is None
        line = next(line for line in text.splitlines() if f"vm {WEB}" in line)
        assert f"configured: {WEB_IP} {WEB_IP6} · observed: {WEB_IP} (dhcp lease" in line, text
        assert f"{WEB_IP6} (neighbour)" in line, text
        ghost_line = next(line for line in text.splitlines() if f"vm {GHOST}" in line)
        assert ghost_line.rstrip().endswith(f"configured: 10.217.0.20 {GHOST_IP6}"), text

        dhcpv6_by_mac_through_dmzctls_table(config, tmp_path)

        dmzctl("kill", str(config), check=True)
        vms, text = status_of(config)
        assert vms[WEB]["state"] == "shut off" and vms[WEB]["observed"] is None, vms[WEB]
        assert "· observed" not in text, text
    finally:
        dmzctl("destroy", str(config), "--timeout", "0")
        wipe(DMZ, [WEB, GHOST, LATE])


def dhcpv6_by_mac_through_dmzctls_table(config: Path, tmp_path: Path) -> None:
    """A namespace on the bridge plays the configured, never-started VM: the Solicit passes dmzctl's
    table and dnsmasq offers the configured ip6 for the MAC, none for another MAC. Then a VM added to
    the config is added to the running network (net-update, no restart) and its MAC gets its ip6."""
    _solicits(config)


def _solicits(config: Path) -> None:
    from guest import dmzctl

    attach_client("v6st0")
    assert solicit_as(GHOST_MAC) == [GHOST_IP6]
    assert solicit_as("52:54:00:21:71:99") == []            # not in the config: no address at all
    # What runs is the rendered network (the dnsmasq options included): no difference, no restart pending.
    checked = json.loads(dmzctl("check", str(config), "--json").stdout)["dmzs"][0]
    assert [d for d in checked["differences"] if d["kind"].startswith("network-")] == [], checked
    bridge_before = Path("/sys/class/net/v6st0/ifindex").read_text()
    added = dmzctl("up", str(write_config(config, late=True)), "--vm", WEB, check=True)
    assert "static DHCP leases updated live" in added.stdout, added.stdout
    assert Path("/sys/class/net/v6st0/ifindex").read_text() == bridge_before  # no network restart
    assert solicit_as(LATE_MAC) == [LATE_IP6]
    assert solicit_as(GHOST_MAC) == [GHOST_IP6]
