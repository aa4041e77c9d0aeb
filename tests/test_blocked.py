"""dmzctl blocked: the tables' drop log read back, grouped by VM, destination and reason; a real
blocked attempt from a namespace with a VM's configured MAC and addresses (tests/mtworld.py) is named."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import pytest

from dmzctl.blocked import attempts, format_groups, group, parse_line, parse_since
from dmzctl.config import load_dmz
from dmzctl.errors import ConfigError

# As the kernel writes them (nf_log_syslog), with the prefix render/nft.py gives each reason.
V4 = ("dmzctl mt-m to-protected: IN=mt-m0 OUT=mt-lan-h PHYSIN=mt-web-h MAC=52:54:00:aa:bb:cc:52:54:00:22:50:10:08:00 "
      "SRC=10.225.0.10 DST=10.240.0.10 LEN=60 TOS=0x00 PREC=0x00 TTL=63 ID=1 DF PROTO=TCP SPT=41000 DPT=80 "
      "WINDOW=64240 RES=0x00 SYN URGP=0 ")
V6 = ("dmzctl mt-m to-protected: IN=mt-m0 OUT=mt-lan-h MAC=52:54:00:aa:bb:cc:52:54:00:22:50:10:86:dd "
      "SRC=fdd0:0225:0000:0000:0000:0000:0000:0010 DST=fdd0:0240:0000:0000:0000:0000:0000:0010 LEN=53 TC=0 "
      "HOPLIMIT=64 FLOWLBL=1 PROTO=ICMPv6 TYPE=128 CODE=0 ID=7 SEQ=1 ")
ICMP = ("dmzctl mt-m to-host: IN=mt-m0 OUT= MAC=52:54:00:aa:bb:cc:52:54:00:99:99:99:08:00 SRC=10.225.0.77 "
        "DST=10.225.0.1 LEN=28 TOS=0x00 PREC=0x00 TTL=64 ID=9 PROTO=ICMP TYPE=8 CODE=0 ID=3 SEQ=1 ")
OTHER_DMZ = V4.replace("dmzctl mt-m ", "dmzctl someone-else ")


@pytest.fixture
def dmz(tmp_path):
    import mtworld

    path = tmp_path / "mt-m.toml"
    path.write_text(mtworld.CONFIG)
    return load_dmz(path)


def test_a_log_line_is_read_field_by_field():
    a = parse_line(10.0, "[ 12.5] " + V4)
    assert (a.dmz, a.reason, a.src, a.dst, a.proto, a.port, a.mac) == \
        ("mt-m", "to-protected", "10.225.0.10", "10.240.0.10", "tcp", 80, "52:54:00:22:50:10")
    six = parse_line(11.0, V6)
    assert (six.src, six.dst, six.proto, six.port) == ("fdd0:225::10", "fdd0:240::10", "icmpv6", 128)
    assert parse_line(1.0, "some other kernel line") is None
    assert parse_line(1.0, "dmzctl mt-m to-host: truncated") is None


def test_the_sender_is_named_by_mac_then_by_address_and_groups_are_newest_first(dmz):
    forged = V4.replace("SRC=10.225.0.10", "SRC=10.99.0.5")
    by_address = ICMP.replace("SRC=10.225.0.77", "SRC=10.225.0.10")
    lines = [(100.0, V4), (101.0, V4), (102.0, V6), (103.0, ICMP), (104.0, forged), (105.0, OTHER_DMZ),
             (106.0, by_address)]
    groups = group(attempts(lines, [dmz]))
    rows = [(g.vm, g.src, g.dst, g.proto, g.port, g.reason, g.count) for g in groups]
    assert rows == [
        ("mt-web", "10.225.0.10", "10.225.0.1", "icmp", 8, "to-host", 1),        # by address: its MAC is unknown
        ("mt-web", "10.225.0.10", "10.240.0.10", "tcp", 80, "to-protected", 3),  # the forged source joins its VM
        (None, "10.225.0.77", "10.225.0.1", "icmp", 8, "to-host", 1),
        ("mt-web", "fdd0:225::10", "fdd0:240::10", "icmpv6", 128, "to-protected", 1),
    ]
    assert groups[1].sources == {"10.225.0.10", "10.99.0.5"}, "a forged source is named by the MAC that sent it"
    assert group(attempts(lines, [dmz], since=104.5))[0].last == 106.0
    assert len(group(attempts(lines, [dmz], since=104.5))) == 1
    text = format_groups(groups, "test")
    assert "mt-web (10.225.0.10, 10.99.0.5)" in text and "10.240.0.10:80 tcp" in text and "? (10.225.0.77)" in text
    assert json.loads(json.dumps([g.to_dict() for g in groups]))[1]["sources"] == ["10.225.0.10", "10.99.0.5"]


def test_since_takes_durations_and_iso_times():
    now = 1_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("1h", now) == now - 3600
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("2026-11-30T03:00:00", now) == datetime(2026, 11, 30, 3, tzinfo=timezone.utc).timestamp()
    assert parse_since(None, now) is None
    with pytest.raises(ConfigError) as caught:
        parse_since("yesterday", now)
    assert "--since yesterday" in caught.value.problems[0]


def test_the_journal_is_read_as_json(tmp_path, monkeypatch):
    """Where journald runs: `journalctl -k -o json`, its realtime stamps and messages (a stand-in
    journalctl here: this machine has no journal)."""
    from dmzctl.host import kernlog

    entry = {"__REALTIME_TIMESTAMP": "1700000000123456", "MESSAGE": V4}
    fake = tmp_path / "journalctl"
    fake.write_text("#!/bin/sh\necho \"$*\" > " + str(tmp_path / "argv") + "\n"
                    f"echo '{json.dumps(entry)}'\necho 'not json'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    lines = kernlog.read_journal(since=1700000000.0)
    assert lines == [(1700000000.123456, V4)]
    argv = (tmp_path / "argv").read_text()
    assert argv.startswith("-k -o json") and "--since" in argv


# --- on the host ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import mtworld

    if os.geteuid() != 0:
        pytest.fail("the blocked-log host test needs root")
    with mtworld.Site(tmp_path_factory.mktemp("blocked")) as site:
        yield site
    assert not mtworld.leftovers(), mtworld.leftovers()


@pytest.mark.host
def test_blocked_names_a_real_attempt_with_its_vm_and_destination(site):
    import mtworld

    began = time.time()
    port = 8000 + int(began) % 1000  # a destination port of this run's own
    site.probe([{"id": "t", "proto": "tcp", "dst": mtworld.LAN_IP, "port": port, "timeout": 0.5},
                {"id": "u", "proto": "udp", "dst": mtworld.LAN_IP6, "port": port, "timeout": 0.5},
                {"id": "h", "proto": "udp", "dst": mtworld.GATEWAY, "port": port, "timeout": 0.5}])
    out = mtworld.dmzctl("blocked", str(site.config), "--json", "--since", "5m").stdout
    groups = json.loads(out)
    mine = {(g["vm"], g["destination"], g["proto"], g["reason"]): g for g in groups if g["port"] == port}
    assert ("mt-web", mtworld.LAN_IP, "tcp", "to-protected") in mine, groups
    assert ("mt-web", mtworld.LAN_IP6, "udp", "to-protected") in mine, groups
    assert ("mt-web", mtworld.GATEWAY, "udp", "to-host") in mine, groups
    tcp = mine[("mt-web", mtworld.LAN_IP, "tcp", "to-protected")]
    assert tcp["source"] == mtworld.VM_IP and tcp["dmz"] == "mt-m"
    last = datetime.fromisoformat(tcp["last"]).timestamp()
    assert began - 5 <= last <= time.time() + 5, "the kernel's timestamps were not turned into the right time"
    # newest first
    stamps = [g["last"] for g in groups]
    assert stamps == sorted(stamps, reverse=True)
    text = mtworld.dmzctl("blocked", str(site.config), "--since", "5m").stdout
    assert f"mt-web ({mtworld.VM_IP})" in text and f"{mtworld.LAN_IP}:{port} tcp" in text
    later = datetime.fromtimestamp(time.time() + 60, timezone.utc).replace(tzinfo=None).isoformat()
    assert json.loads(mtworld.dmzctl("blocked", str(site.config), "--json", "--since", later).stdout) == []
