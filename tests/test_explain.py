"""`dmzctl explain`: pure decisions from the validated config, in the rendered table's rule order.

The agreement with real packets is in tests/test_isolation.py (every matrix row goes through
explain too); here: each rule that can decide, the order between them, and the command line.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmzctl.cli import app
from dmzctl.config import parse_dmz
from dmzctl.explain import (ORDER, ExplainError, Flow, explain, make_flow, parse_proto, parse_target,
                            rule_kind)
from dmzctl.render.nft import render_table

ROOT = Path(__file__).resolve().parents[1]
OPEN = Path(__file__).parent / "configs" / "isolation" / "open.toml"
CLOSED = Path(__file__).parent / "configs" / "isolation" / "closed.toml"
ALL_CONFIGS = sorted((ROOT / "examples").glob("*.toml")) + sorted((Path(__file__).parent / "configs").rglob("*.toml"))
HOSTS = ["10.232.0.1", "fdd0:232::1", "10.233.0.1"]


def load(path: Path):
    return parse_dmz(tomllib.loads(path.read_text()), path)


def dmz_from(**overrides):
    data = {"dmz": {"name": "t", "gateway": "10.9.0.1/24", "gateway6": "fd09::1/64",
                    "protected": ["10.8.0.0/24", "fd08::/64"]}}
    data["dmz"].update(overrides)
    data["dmz"] = {k: v for k, v in data["dmz"].items() if v is not None}
    return parse_dmz(data)


def flow(dst, proto="tcp", src=None, port=None, **kw):
    return Flow(dst=ipaddress.ip_address(dst), proto=proto, src=ipaddress.ip_address(src) if src else None,
                port=port, **kw)


def decide(dmz, dst, proto="tcp", src=None, port=None, hosts=HOSTS, bridge_netfilter=None, **kw):
    return explain(dmz, flow(dst, proto, src, port, **kw), hosts, bridge_netfilter)


# --- which rule decides -------------------------------------------------------------

def test_protected_blocked_and_logged_v4_and_v6():
    dmz = load(OPEN)
    for dst, src in (("10.232.0.99", "10.231.0.10"), ("fdd0:232::99", "fdd0:231::10")):
        d = decide(dmz, dst, "udp", src, 9)
        assert (d.allowed, d.decided_by, d.hook) == (False, "protected", "forward")
        assert d.rule == f"to protected IPv{ipaddress.ip_address(dst).version}"
        assert d.log_prefix == "dmzctl dmzt-iso to-protected: "


def test_every_protocol_to_protected_is_blocked():
    dmz = load(OPEN)
    for proto, port in (("tcp", 1), ("udp", 1), ("sctp", 1), ("icmp", None), ("gre", None), ("esp", None), ("4", None)):
        assert decide(dmz, "10.232.0.99", proto, "10.231.0.10", port).decided_by == "protected", proto


def test_holes_exactly_and_nothing_broader():
    dmz = load(OPEN)
    web, mail = "10.231.0.10", "10.231.0.25"
    hole = decide(dmz, "10.232.0.25", "tcp", mail, 25)
    assert (hole.allowed, hole.decided_by, hole.origin, hole.rule) == (True, "hole", "allow[2]", "hole allow[2]")
    assert decide(dmz, "10.232.0.25", "tcp", web, 25).decided_by == "protected"    # another VM
    assert decide(dmz, "10.232.0.25", "tcp", mail, 26).decided_by == "protected"   # another port
    assert decide(dmz, "10.232.0.26", "tcp", mail, 25).decided_by == "protected"   # another host
    assert decide(dmz, "10.232.0.25", "udp", mail, 25).decided_by == "protected"   # another protocol
    assert decide(dmz, "fdd0:232::25", "tcp", "fdd0:231::25", 588).origin == "allow[3]"
    assert not decide(dmz, "fdd0:232::25", "tcp", "fdd0:231::25", 589).allowed
    assert decide(dmz, "10.232.0.53", "udp", web, 53).origin == "dns"
    assert decide(dmz, "10.232.0.53", "tcp", web, 53).origin == "dns"
    # from = "10.231.0.0/28"
    assert decide(dmz, "10.232.0.10", "sctp", "10.231.0.15", 9000).allowed
    assert not decide(dmz, "10.232.0.10", "sctp", "10.231.0.16", 9000).allowed


def test_hole_needs_the_port_to_match():
    dmz = load(OPEN)
    d = decide(dmz, "10.232.0.25", "tcp", "10.231.0.25", None)
    assert not d.allowed and any("give --to ADDR:PORT" in step for step in d.trace)


def test_icmp_hole_covers_every_type_of_its_family_only():
    dmz = load(OPEN)
    for kind in (128, 139, 1):
        assert decide(dmz, "fdd0:232::10", "icmpv6", "fdd0:231::10", icmp_type=kind).origin == "allow[4]"
    assert not decide(dmz, "10.232.0.10", "icmp", "10.231.0.10", icmp_type=8).allowed


def test_anti_spoofing_comes_before_the_holes():
    dmz = load(OPEN)
    d = decide(dmz, "10.232.0.10", "udp", "10.233.0.77", 123)  # would be hole allow[1] from a DMZ address
    assert (d.allowed, d.decided_by, d.chain) == (False, "spoofed", "spoofed")
    assert d.log_prefix == "dmzctl dmzt-iso spoofed: "
    assert not any("hole" in step for step in d.trace)
    d = decide(dmz, "fdd0:232::1", "udp", "fdd0:233::77", 7023)  # a hole on the host's own address
    assert (d.decided_by, d.hook) == ("spoofed", "input")


def test_link_local_and_unspecified_sources_only_towards_the_host():
    dmz = load(OPEN)
    assert decide(dmz, "fdd0:231::1", "icmpv6", "fe80::5", icmp_type=135).decided_by == "nd"
    assert decide(dmz, "fdd0:232::10", "icmpv6", "fe80::5", icmp_type=128).decided_by == "spoofed"
    assert decide(dmz, "255.255.255.255", "udp", "0.0.0.0", 67).decided_by == "dhcp"
    assert decide(dmz, "10.233.0.100", "udp", "0.0.0.0", 67).decided_by == "spoofed"


def test_a_dmz_without_ipv6_drops_every_ipv6_packet_as_spoofed():
    dmz = dmz_from(gateway6=None, protected=["10.8.0.0/24"])
    d = decide(dmz, "2001:db8::1", "tcp", "fe80::1", 443)
    assert (d.decided_by, d.rule) == ("spoofed", "the DMZ has no IPv6")


def test_the_host_dhcp_dns_and_neighbour_discovery():
    dmz = load(OPEN)
    web = "10.231.0.10"
    for dst in ("10.231.0.1", "10.232.0.1", "10.233.0.1"):
        d = decide(dmz, dst, "tcp", web, 22)
        assert (d.allowed, d.decided_by, d.hook, d.log_prefix) == (False, "host", "input", "dmzctl dmzt-iso to-host: ")
    assert decide(dmz, "10.231.0.1", "udp", web, 53).decided_by == "dns"
    assert decide(dmz, "10.231.0.1", "tcp", web, 53).decided_by == "dns"
    assert decide(dmz, "10.232.0.1", "tcp", web, 53).decided_by == "host"   # DNS only on the gateway
    v6dns = decide(dmz, "fdd0:231::1", "udp", "fdd0:231::10", 53)
    assert (v6dns.allowed, v6dns.decided_by) == (True, "dns6")
    # libvirt's router advertisements name the bridge's link-local address as the DNS server.
    assert decide(dmz, "fe80::1", "udp", "fdd0:231::10", 53).decided_by == "dns6"
    assert decide(dmz, "fdd0:231::1", "udp", "fdd0:231::10", 5353).decided_by == "host"
    assert decide(dmz, "10.231.0.1", "udp", web, 67).decided_by == "dhcp"
    assert decide(dmz, "fdd0:231::1", "icmpv6", "fdd0:231::10", icmp_type=133).decided_by == "nd"
    assert decide(dmz, "fdd0:231::1", "icmpv6", "fdd0:231::10", icmp_type=128).decided_by == "host"
    assert decide(dmz, "10.232.0.1", "tcp", web, 7022).origin == "allow[6]"  # a hole to the host itself
    # Without dhcp there is no DHCP/DNS rule.
    nodhcp = dmz_from(dhcp=False)
    assert decide(nodhcp, "10.9.0.1", "udp", "10.9.0.5", 53).decided_by == "host"


def test_the_host_is_any_address_the_caller_says_it_owns():
    dmz = load(OPEN)
    assert decide(dmz, "192.0.2.2", "tcp", "10.231.0.10", 22, hosts=["192.0.2.2"]).decided_by == "host"
    assert decide(dmz, "192.0.2.2", "tcp", "10.231.0.10", 22, hosts=[]).decided_by == "egress-any"
    assert decide(dmz, "192.0.2.2", "tcp", "10.231.0.10", 22, hosts=["192.0.2.2/24"]).decided_by == "host"
    assert decide(dmz, "10.231.0.255", "udp", "10.231.0.10", 9).hook == "input"  # the DMZ's broadcast


def test_egress_any_and_none():
    assert decide(load(OPEN), "198.51.100.7", "tcp", "10.231.0.10", 443).decided_by == "egress-any"
    d = decide(load(CLOSED), "198.51.100.7", "tcp", "10.231.0.10", 443)
    assert (d.allowed, d.decided_by, d.log_prefix) == (False, "egress", "dmzctl dmzt-iso egress: ")
    assert decide(load(CLOSED), "10.232.0.53", "udp", "10.231.0.10", 53).origin == "dns"  # holes still work


def test_vm_to_vm():
    open_, closed = load(OPEN), load(CLOSED)
    web, mail = "10.231.0.10", "10.231.0.25"
    # Through the host: the forward chain, which lets VM to VM pass unless isolate_vms.
    assert decide(open_, mail, "tcp", web, 80, via_host=True).decided_by == "within-dmz"
    d = decide(closed, mail, "tcp", web, 80, via_host=True)
    assert (d.decided_by, d.log_prefix) == ("vm-to-vm", "dmzctl dmzt-iso vm-to-vm: ")
    # Switched on the bridge: nftables sees it only through br_netfilter.
    assert decide(open_, mail, "tcp", web, 80, bridge_netfilter=False).decided_by == "layer2"
    assert decide(open_, mail, "tcp", web, 80, bridge_netfilter=True).decided_by == "within-dmz"
    assert decide(closed, mail, "tcp", web, 80, bridge_netfilter=False).decided_by == "port-isolation"
    assert decide(closed, mail, "tcp", web, 80, bridge_netfilter=True).decided_by == "vm-to-vm"
    egress_none = dmz_from(egress="none")
    assert decide(egress_none, "10.9.0.6", "tcp", "10.9.0.5", 80, bridge_netfilter=False).allowed
    # egress = "none" is about leaving the DMZ, not about VM to VM.
    assert decide(egress_none, "10.9.0.6", "tcp", "10.9.0.5", 80, bridge_netfilter=True).decided_by == "within-dmz"
    unknown = decide(egress_none, "10.9.0.6", "tcp", "10.9.0.5", 80, bridge_netfilter=None)
    assert unknown.allowed and any("br_netfilter" in n for n in unknown.notes)
    forged = decide(open_, mail, "udp", "10.232.0.9", 80, bridge_netfilter=False)
    assert (forged.allowed, forged.decided_by) == (False, "nwfilter")


def test_flows_from_outside_the_dmz():
    dmz = load(OPEN)
    d = decide(dmz, "10.231.0.10", "tcp", "10.232.0.10", 80, from_dmz=False)
    assert (d.allowed, d.decided_by) == (True, "not-from-dmz")
    nat = dmz_from(mode="nat")
    assert decide(nat, "10.9.0.5", "tcp", "10.8.0.9", 80, from_dmz=False).decided_by == "libvirt-nat"
    isolated = dmz_from(mode="isolated")
    assert decide(isolated, "10.9.0.5", "tcp", "10.8.0.9", 80, from_dmz=False).decided_by == "libvirt-isolated"


def test_isolated_mode_rejects_what_the_table_accepts_beyond_the_host():
    # Holes are refused in isolated mode by validation; egress "any" still meets libvirt's reject.
    dmz = dmz_from(mode="isolated")
    assert decide(dmz, "8.8.8.8", "udp", "10.9.0.5", 53).decided_by == "libvirt-isolated"
    assert decide(dmz, "10.9.0.1", "udp", "10.9.0.5", 53).decided_by == "dns"  # the host is not forwarded to


def test_a_dhcp_vm_matches_no_address_bound_hole():
    dmz = dmz_from(allow=[{"to": "10.8.0.7", "proto": "tcp", "port": 22, "from": "10.9.0.0/28"},
                          {"to": "10.8.0.8", "proto": "tcp", "port": 22}],
                   )
    d = decide(dmz, "10.8.0.7", "tcp", None, 22)
    assert d.decided_by == "protected" and any("DHCP address" in step for step in d.trace)
    assert decide(dmz, "10.8.0.8", "tcp", None, 22).origin == "allow[2]"


def test_a_flooding_vm_is_capped_whatever_it_sends_to():
    dmz = load(OPEN)
    web = "10.231.0.10"
    for dst, proto, port, hook in (("198.18.33.100", "udp", 5000, "forward"),     # egress
                                   ("10.232.0.53", "udp", 53, "forward"),        # a hole
                                   ("10.231.0.1", "udp", 53, "input"),           # DNS on the gateway
                                   ("2001:db8:33::100", "tcp", 80, "forward")):
        src = web if ":" not in dst else "fdd0:231::10"
        assert decide(dmz, dst, proto, src, port).allowed  # a new flow under the caps
        d = decide(dmz, dst, proto, src, port, flood=True)
        assert (d.allowed, d.decided_by, d.chain, d.hook) == (False, "flood", "flood", hook)
        assert d.rule == "new flows over max_new_flows" and d.log_prefix == "dmzctl dmzt-iso flood: "
        step = "from_dmz 3" if hook == "forward" else "to_host 3"
        assert d.trace[-1].startswith(f"{step} a new flow; ") and d.trace[-1].endswith("jump flood")
    # VM to VM through the host, and switched when br_netfilter shows it to the forward hook.
    assert decide(dmz, "10.231.0.30", "tcp", web, 80, via_host=True, flood=True).decided_by == "flood"
    assert decide(dmz, "10.231.0.25", "tcp", web, 80, bridge_netfilter=True, flood=True).decided_by == "flood"
    assert decide(dmz, "10.231.0.25", "tcp", web, 80, bridge_netfilter=False, flood=True).decided_by == "layer2"
    # Caps come before anti-spoofing: a forged source counts against the VM that sends it.
    assert decide(dmz, "10.232.0.10", "udp", "10.233.0.77", 123, flood=True).decided_by == "flood"


def test_caps_are_named_in_every_trace_and_per_vm():
    dmz = load(OPEN)
    d = decide(dmz, "10.233.0.100", "udp", "10.231.0.10", 5000)
    assert "from_dmz 3 a new flow: counted against dmzt-web's caps (2000/second new flows, burst 4000; " \
           "20000 flows at once): under them, next rule" in d.trace
    assert any(step.startswith("from_dmz 4 ") for step in d.trace)
    assert any(step.startswith("to_host 3 a new flow: counted against its VM's caps") for step in
               decide(dmz, "10.231.0.1", "udp", None, 53).trace)
    own = dmz_from(max_flows=300, max_new_flows="20/second")
    assert "counted against its VM's caps (20/second new flows, burst 40; 300 flows at once)" in \
        decide(own, "198.51.100.1", "udp", "10.9.0.5", 9).trace[2]
    data = tomllib.loads(OPEN.read_text())
    data["vm"][1]["max_flows"] = 100000
    mail = parse_dmz(data)
    d = decide(mail, "10.233.0.100", "tcp", "10.231.0.25", 80, flood=True)
    assert d.rule == "new flows over dmzt-mail's max_new_flows"
    assert "100000 flows at once" in d.reason


def test_flows_from_outside_are_never_capped():
    dmz = load(OPEN)
    assert decide(dmz, "10.231.0.10", "tcp", "10.232.0.10", 80, from_dmz=False, flood=True).decided_by \
        == "not-from-dmz"
    with pytest.raises(ExplainError):
        make_flow(dmz, "10.232.0.5", "10.231.0.10:80", outside=True, flood=True)


# --- the order is render/nft.py's --------------------------------------------------------

def _chains(commands):
    chains: dict[str, list[str]] = {}
    for command in commands:
        rule = command.get("add", {}).get("rule")
        if rule:
            chains.setdefault(rule["chain"], []).append(rule_kind(rule["comment"]))
    return chains


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: p.stem)
def test_explain_walks_the_rendered_chains_in_their_order(config):
    chains = _chains(render_table(load(config)))
    for chain, order in ORDER.items():
        kinds = chains.get(chain, [])  # to_dmz and dstnat only with publish
        assert all(kind in order for kind in kinds), f"{chain}: a rule explain does not know: {kinds}"
        positions = [order.index(kind) for kind in kinds]
        assert positions == sorted(positions), f"{chain} renders {kinds}; explain assumes {order}"


# --- reading flows ------------------------------------------------------------------------

def test_parse_target_and_proto():
    assert parse_target("10.0.0.1:80") == (ipaddress.ip_address("10.0.0.1"), 80)
    assert parse_target("10.0.0.1") == (ipaddress.ip_address("10.0.0.1"), None)
    assert parse_target("[fd00::1]:443") == (ipaddress.ip_address("fd00::1"), 443)
    assert parse_target("fd00::1") == (ipaddress.ip_address("fd00::1"), None)
    for bad in ("10.0.0.1:0", "10.0.0.1:70000", "host:80", "[fd00::1]:x"):
        with pytest.raises(ExplainError):
            parse_target(bad)
    assert parse_proto("ICMP6") == "icmpv6" and parse_proto("47") == "gre" and parse_proto("4") == "4"
    with pytest.raises(ExplainError):
        parse_proto("smtp")


def test_make_flow():
    dmz = load(OPEN)
    f = make_flow(dmz, "dmzt-mail", "[fdd0:232::25]:587")
    assert (str(f.src), f.vm) == ("fdd0:231::25", "dmzt-mail")
    f = make_flow(dmz, "dmzt-web", "fdd0:232::10", "icmp", icmp_type=139)
    assert (f.proto, f.icmp_type) == ("icmpv6", 139)
    assert make_flow(dmz, "10.232.0.5", "10.231.0.10:80", outside=True).from_dmz is False
    assert make_flow(dmz, "dmzt-web", "10.232.0.1:22").proto == "tcp"
    for args in (("nosuchvm", "10.232.0.1:22"), ("dmzt-web", "10.232.0.1"), ("10.231.0.5", "fdd0:232::1:22"),
                 ("dmzt-web", "10.232.0.1:22", "icmp"), ("dmzt-web", "10.232.0.1", "icmpv6")):
        with pytest.raises(ExplainError):
            make_flow(dmz, *args)


# --- the command ---------------------------------------------------------------------------

def test_cli_explain_text_and_json():
    runner = CliRunner()
    result = runner.invoke(app, ["explain", str(OPEN), "--from", "dmzt-web", "--to", "10.232.0.25:25",
                                 "--no-read-host"])
    assert result.exit_code == 0, result.output
    assert "BLOCKED" in result.output and "to protected IPv4" in result.output
    assert "hole allow[2]" in result.output and "only from dmzt-mail" in result.output
    result = runner.invoke(app, ["explain", str(OPEN), "--from", "dmzt-mail", "--to", "10.232.0.25:25",
                                 "--no-read-host", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["verdict"], data["origin"], data["decided_by"]) == ("allowed", "allow[2]", "hole")
    result = runner.invoke(app, ["explain", str(OPEN), "--from", "dmzt-web", "--to", "192.0.2.77:22",
                                 "--no-read-host", "--host-address", "192.0.2.77", "--json"])
    assert json.loads(result.output)["decided_by"] == "host"


def test_cli_explain_flood():
    result = CliRunner().invoke(app, ["explain", str(OPEN), "--from", "dmzt-web", "--to", "10.233.0.100:80",
                                      "--no-read-host", "--flood"])
    assert result.exit_code == 0, result.output
    assert "BLOCKED" in result.output and "(while flooding)" in result.output
    assert "logged (rate-limited) with the prefix 'dmzctl dmzt-iso flood: '" in result.output


def test_cli_explain_errors_are_one_line():
    runner = CliRunner()
    result = runner.invoke(app, ["explain", str(OPEN), "--from", "nosuch", "--to", "10.232.0.25:25",
                                 "--no-read-host"])
    assert result.exit_code == 2
    assert "neither a VM of DMZ dmzt-iso" in result.output
    result = runner.invoke(app, ["explain", str(ROOT / "examples" / "web-and-mail.toml"),
                                 str(Path(__file__).parent / "configs" / "isolated-dual.toml"),
                                 "--from", "web", "--to", "192.168.1.25:25", "--no-read-host"])
    assert result.exit_code == 2 and "give the one config file" in result.output
