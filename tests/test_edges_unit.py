"""The DMZ's edges without the host: validation (one line per bad field), the rendered order and sets,
dnsmasq's nftset options, and explain's answers (tests/test_edges.py proves them with real packets)."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest

from dmzctl.config import parse_dmz
from dmzctl.errors import ConfigError
from dmzctl.explain import explain, make_flow
from dmzctl.render.network import dhcp6_options, nftset_options, render_network
from dmzctl.render.nft import render_table

SOURCE = Path("/etc/dmzctl/e.toml")
BASE = {
    "dmz": {
        "name": "e", "gateway": "10.80.0.1/24", "gateway6": "fd42:80::1/64",
        "protected": ["192.168.1.0/24", "fd42:1::/64"], "egress": "allowlist",
        "publish": [{"to": "web", "proto": "tcp", "port": 443, "listen": "203.0.113.5"},
                    {"to": "web", "proto": "tcp", "port": 80, "listen": "host", "listen_port": 8080},
                    {"to": "web", "proto": "tcp", "port": 22, "from": ["198.51.100.0/24"]}],
        "egress_allow": [{"to": "198.51.100.0/24", "proto": "tcp", "port": [80, 443]},
                         {"to": "deb.debian.org", "proto": "tcp", "port": [80, 443]},
                         {"to": "relay.example.org", "proto": "tcp", "port": 587, "from": "web"},
                         {"to": "192.168.1.0/24", "proto": "tcp", "port": 80},
                         {"to": "172.16.0.0/12", "proto": "tcp", "port": 80},
                         {"to": "0.0.0.0/0", "proto": "udp", "port": 123}],
    },
    "vm": [{"name": "web", "memory": 256, "disks": ["/var/lib/dmzctl/web.qcow2"], "ip": "10.80.0.10",
            "ip6": "fd42:80::10"},
           {"name": "db", "memory": 256, "disks": ["/var/lib/dmzctl/db.qcow2"], "ip": "10.80.0.11"}],
}
HOSTS = ["198.19.0.1", "10.80.0.1"]


def dmz_with(**dmz_changes):
    data = copy.deepcopy(BASE)
    for key, value in dmz_changes.items():
        if value is None:
            data["dmz"].pop(key, None)
        else:
            data["dmz"][key] = value
    return parse_dmz(data, SOURCE)


def problems(**dmz_changes) -> list[str]:
    with pytest.raises(ConfigError) as info:
        dmz_with(**dmz_changes)
    return info.value.problems


# --- validation -----------------------------------------------------------------

def test_base_is_valid_and_the_model_names_are_the_issues():
    dmz = dmz_with()
    assert dmz.inbound == "published" and dmz.lan_inbound is True
    first = dmz.publish[0]
    assert (first.to, first.proto, first.ports, first.listen, first.listen_port, first.sources) == \
        ("web", "tcp", (443, 443), ipaddress.ip_address("203.0.113.5"), None, ())
    assert dmz.publish[1].listen == "host" and dmz.publish[1].listen_ports == (8080, 8080)
    assert [e.ports for e in dmz.egress_allow if e.origin == "egress_allow[1]"] == [(80, 80), (443, 443)]
    assert dmz.egress_names == ("deb.debian.org", "relay.example.org")


def test_inbound_defaults_to_any_without_publish_so_existing_configs_keep_working():
    assert dmz_with(publish=None).inbound == "any"
    assert dmz_with(publish=None, inbound="published").inbound == "published"
    assert dmz_with(inbound="any").inbound == "any"


BAD = [
    ({"publish": [{"to": "nope", "proto": "tcp", "port": 80}]}, "dmz.publish[1].to", "is not a VM of this DMZ"),
    ({"publish": [{"to": "web", "proto": "icmp", "port": 80}]}, "dmz.publish[1].proto", "must be one of tcp, udp"),
    ({"publish": [{"to": "web", "proto": "tcp"}]}, "dmz.publish[1].port", "required but missing"),
    ({"publish": [{"to": "web", "proto": "tcp", "port": 80, "listen": "::1"}]}, "dmz.publish[1].listen",
     "must be an IPv4 address"),
    ({"publish": [{"to": "web", "proto": "tcp", "port": 80, "listen": "127.0.0.1"}]}, "dmz.publish[1].listen",
     "cannot be forwarded from"),
    ({"publish": [{"to": "web", "proto": "tcp", "port": 80, "listen_port": 8080}]}, "dmz.publish[1].listen_port",
     "needs 'listen'"),
    ({"publish": [{"to": "web", "proto": "tcp", "port": "80-90", "listen": "host", "listen_port": 8080}]},
     "dmz.publish[1].listen_port", "a port range is forwarded to the same ports"),
    ({"publish": [{"to": "web", "proto": "tcp", "port": 80, "from": "10.0.0.1/8"}]}, "dmz.publish[1].from",
     "has host bits set"),
    ({"publish": [{"to": "web", "proto": "tcp", "port": 80, "prot": 1}]}, "dmz.publish[1].prot", "unknown key"),
    ({"mode": "nat"}, "dmz.publish", "lets no new flow into the DMZ"),
    ({"inbound": "some"}, "dmz.inbound", "must be one of published, any"),
    ({"lan_inbound": "yes"}, "dmz.lan_inbound", "must be"),
    ({"egress": "any"}, "dmz.egress_allow", 'is used only with egress = "allowlist"'),
    ({"egress_allow": [{"to": "not a name!", "proto": "tcp"}]}, "dmz.egress_allow[1].to",
     "neither an address, a prefix nor a DNS name"),
    ({"egress_allow": [{"to": "10.80.0.0/25", "proto": "tcp"}]}, "dmz.egress_allow[1].to", "inside the DMZ itself"),
    ({"egress_allow": [{"to": "1.2.3.4", "proto": "tcp", "port": [80, "x"]}]}, "dmz.egress_allow[1].port",
     "must be a port number or a range"),
    ({"egress_allow": [{"to": "1.2.3.4", "proto": "tcp", "from": "db6"}]}, "dmz.egress_allow[1].from",
     "is not a VM of this DMZ"),
    ({"egress_allow": [{"to": "2001:db8::1", "proto": "tcp", "from": "db"}]}, "dmz.egress_allow[1].from",
     "has no static IPv6 address"),
    ({"dhcp": False}, "dmz.egress_allow", "DNS names need the gateway's dnsmasq"),
    ({"dns_forwarders": ["8.8.8.x"]}, "dmz.dns_forwarders[1]", "is not a valid address"),
    ({"masquerade": "yes"}, "dmz.masquerade", "must be"),
    ({"masquerade": True, "mode": "nat", "publish": None}, "dmz.masquerade", "masquerades already"),
]


@pytest.mark.parametrize("change, field, text", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_one_clear_line_per_bad_field(change, field, text):
    found = problems(**change)
    assert len(found) == 1, found
    assert found[0].startswith(f"{SOURCE}: {field}: ") and text in found[0], found
    assert "\n" not in found[0]


# --- rendering -------------------------------------------------------------------

def test_masquerade_takes_the_host_s_address_beyond_the_host_only():
    """One public IPv4: IPv4 leaving the DMZ for beyond the host is masqueraded; the DMZ itself and the
    protected subnets (its holes) see the VM's own address; no masquerade unless asked."""
    assert not [c for c in render_table(dmz_with(), ()) if "masquerade" in str(c) and "hairpin" not in str(c)]
    rules = [r for r in _rules(render_table(dmz_with(masquerade=True), ()), "srcnat") if "masquerade:" in r["comment"]]
    assert len(rules) == 1
    text = str(rules[0]["expr"])
    assert "'saddr'" in text and "'10.80.0.0'" in text and "'!='" in text and "'192.168.1.0'" in text



def _rules(commands, chain):
    return [c["add"]["rule"] for c in commands if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def _comments(commands, chain):
    return [r["comment"] for r in _rules(commands, chain)]


def test_allowlist_comes_after_every_block_and_ends_in_a_drop():
    order = _comments(render_table(dmz_with()), "from_dmz")
    last_block = max(i for i, c in enumerate(order) if c.startswith("to "))
    first_allow = next(i for i, c in enumerate(order) if c.startswith(("egress", "DNS to anywhere")))
    assert last_block < first_allow
    assert order[first_allow] == "DNS to anywhere but the gateway (names are allowlisted)"
    assert order[-1] == "egress allowlist: anything else"


def test_prefixes_are_one_concatenated_set_lookup_per_family_whatever_their_number():
    many = [{"to": f"198.{i}.7.0/24", "proto": "tcp", "port": [80, 443]} for i in range(50)]
    commands = render_table(dmz_with(egress_allow=many))
    assert [c for c in _comments(commands, "from_dmz") if c.startswith("egress allowlist IPv")] == \
        ["egress allowlist IPv4"]
    elements = [c["add"]["element"] for c in commands if "element" in c.get("add", {})
                and c["add"]["element"]["name"] == "egress4"]
    assert len(elements[0]["elem"]) == 100


def test_inbound_published_order_and_no_chain_without_publish():
    commands = render_table(dmz_with())
    assert _comments(commands, "forward")[-1] == "into the DMZ (inbound published)"
    assert _comments(commands, "to_dmz") == ["from protected IPv4 (lan_inbound)", "from protected IPv6 (lan_inbound)",
                                             "published IPv4", "published IPv6", "publish[3]", "not published"]
    assert "to_dmz" not in str(render_table(dmz_with(publish=None, egress="any", egress_allow=None)))
    assert _comments(render_table(dmz_with(lan_inbound=False)), "to_dmz")[0] == "published IPv4"


def test_drop_chains_log_under_their_reason_rate_limited_and_counted():
    commands = render_table(dmz_with())
    for chain, reason in (("inbound", "inbound"), ("egress", "egress"), ("dns", "dns-elsewhere")):
        log, drop = _rules(commands, chain)
        assert "limit" in log["expr"][0] and log["expr"][1]["log"]["prefix"] == f"dmzctl e {reason}: "
        assert drop["expr"] == [{"counter": None}, {"drop": None}]


def test_batch_accepted_by_libnftables():
    nftables = pytest.importorskip("nftables", reason="python3-nftables (scripts/setup.sh)")
    from dmzctl.render.nft import apply_batch

    for dmz in (dmz_with(), dmz_with(lan_inbound=False, inbound="published", publish=None)):
        nft = nftables.Nftables()
        nft.set_dry_run(True)
        rc, _out, err = nft.json_cmd(apply_batch(dmz))
        assert rc == 0, err


OVERLAPS = [
    {"publish": [{"to": "web", "proto": "tcp", "port": "80-90"}, {"to": "web", "proto": "tcp", "port": 85},
                 {"to": "web", "proto": "tcp", "port": 80, "listen": "host"}]},
    {"egress_allow": [{"to": "198.51.100.0/24", "proto": "tcp", "port": "80-90"},
                      {"to": "198.51.100.0/24", "proto": "tcp", "port": 85},
                      {"to": "198.51.100.5", "proto": "tcp", "port": 85},
                      {"to": "198.51.100.0/24", "proto": "tcp", "port": 85, "from": "web"},
                      {"to": "198.51.100.0/25", "proto": "tcp", "port": "1-1000", "from": "db"}]},
]


@pytest.mark.parametrize("change", OVERLAPS, ids=["publish", "egress"])
def test_overlapping_entries_are_merged_so_that_the_set_takes_them(change):
    nftables = pytest.importorskip("nftables", reason="python3-nftables (scripts/setup.sh)")
    from dmzctl.render.nft import apply_batch

    nft = nftables.Nftables()
    nft.set_dry_run(True)
    rc, _out, err = nft.json_cmd(apply_batch(dmz_with(**change)))
    assert rc == 0, err


def test_dnat_from_an_address_and_from_every_host_address():
    dstnat = _rules(render_table(dmz_with()), "dstnat")
    assert dstnat[0]["expr"][-1] == {"dnat": {"family": "ip", "addr": "10.80.0.10"}}
    assert {"fib": {"flags": ["daddr"], "result": "type"}} in [e["match"]["left"] for e in dstnat[1]["expr"][:1]]
    assert dstnat[1]["expr"][-1] == {"dnat": {"family": "ip", "addr": "10.80.0.10", "port": 80}}


def test_dnsmasq_fills_the_name_sets_of_the_dmzs_table():
    dmz = dmz_with()
    assert nftset_options(dmz) == [
        "nftset=/deb.debian.org/4#inet#dmzctl-e#names1_4,6#inet#dmzctl-e#names1_6",
        "nftset=/relay.example.org/4#inet#dmzctl-e#names2_4,6#inet#dmzctl-e#names2_6"]
    ns = "{http://libvirt.org/schemas/network/dnsmasq/1.0}"
    values = [o.get("value") for o in render_network(dmz).iter(f"{ns}option")]
    # DHCPv6's ra-only context first (render/network.py), then no cache, then the names' sets.
    assert values == dhcp6_options(dmz) + ["cache-size=0"] + nftset_options(dmz)
    no_names = dmz_with(egress_allow=[{"to": "1.2.3.4", "proto": "tcp"}])
    assert [o.get("value") for o in render_network(no_names).iter(f"{ns}option")] == dhcp6_options(no_names)


def test_name_sets_are_state_not_drift():
    from dmzctl.host.nft import canonical

    listing = {"nftables": [{"set": {"family": "inet", "name": "names1_4", "table": "dmzctl-e",
                                     "type": "ipv4_addr", "elem": ["1.2.3.4"]}},
                            {"set": {"family": "inet", "name": "egress4", "table": "dmzctl-e",
                                     "type": "ipv4_addr", "elem": ["5.6.7.8"]}}]}
    sets = canonical(listing)
    assert "elem" not in sets[0]["set"] and sets[1]["set"]["elem"] == ["5.6.7.8"]


# --- explain ---------------------------------------------------------------------

ROWS = [
    # (from, to, proto, outside, resolved, allowed, decided_by)
    ("198.18.1.1", "203.0.113.5:443", "tcp", True, (), True, "published"),
    ("198.18.1.1", "198.19.0.1:8080", "tcp", True, (), True, "published"),
    ("198.18.1.1", "198.19.0.1:8081", "tcp", True, (), True, "not-from-dmz"),  # the host's own: not ours
    ("198.18.1.1", "10.80.0.10:443", "tcp", True, (), True, "published"),
    ("2001:db8::1", "[fd42:80::10]:443", "tcp", True, (), True, "published"),
    ("2001:db8::1", "[fd42:80::10]:22", "tcp", True, (), False, "inbound"),
    ("198.18.1.1", "10.80.0.10:22", "tcp", True, (), False, "inbound"),
    ("198.51.100.7", "10.80.0.10:22", "tcp", True, (), True, "published"),
    ("198.18.1.1", "10.80.0.11:5432", "tcp", True, (), False, "inbound"),
    ("192.168.1.5", "10.80.0.11:5432", "tcp", True, (), True, "lan-inbound"),
    ("web", "198.51.100.9:443", "tcp", False, (), True, "egress-allow"),
    ("web", "198.51.100.9:25", "tcp", False, (), False, "egress"),
    ("web", "151.101.1.1:443", "tcp", False, (), False, "egress"),
    ("web", "151.101.1.1:443", "tcp", False, ("deb.debian.org",), True, "egress-name"),
    ("web", "151.101.1.1:587", "tcp", False, ("relay.example.org",), True, "egress-name"),
    ("db", "151.101.1.1:587", "tcp", False, ("relay.example.org",), False, "egress"),
    ("web", "9.9.9.9:53", "udp", False, (), False, "dns-elsewhere"),
    ("web", "10.80.0.1:53", "udp", False, (), True, "dns"),
    ("db", "203.0.113.5:443", "tcp", False, (), True, "within-dmz"),  # hairpin through the DNAT address
    ("db", "198.19.0.1:8080", "tcp", False, (), True, "within-dmz"),
    ("db", "198.19.0.1:8081", "tcp", False, (), False, "host"),
    ("web", "203.0.113.5:443", "tcp", False, (), False, "layer2"),  # its own service: no hairpin on a bridge
    # Allowlisted, but the blocks before win: protected, a private range, the host.
    ("web", "192.168.1.7:80", "tcp", False, (), False, "protected"),
    ("web", "172.16.2.3:80", "tcp", False, (), False, "private"),
    ("web", "8.8.8.8:123", "udp", False, (), True, "egress-allow"),  # 0.0.0.0/0: everything allowed beyond
    ("web", "198.19.0.1:80", "tcp", False, (), False, "host"),
    # A name whose answer is a protected or private address (DNS rebinding) gains nothing.
    ("web", "192.168.1.7:443", "tcp", False, ("deb.debian.org",), False, "protected"),
]


@pytest.mark.parametrize("source, target, proto, outside, resolved, allowed, decided_by", ROWS,
                         ids=[f"{r[0]}->{r[1]}{'+' + r[4][0] if r[4] else ''}" for r in ROWS])
def test_explain_rows(source, target, proto, outside, resolved, allowed, decided_by):
    dmz = dmz_with()
    flow = make_flow(dmz, source, target, proto, outside=outside, resolved=resolved)
    decision = explain(dmz, flow, HOSTS)
    assert (decision.allowed, decision.decided_by) == (allowed, decided_by), decision.trace


def test_explain_says_which_lookup_would_open_a_name():
    dmz = dmz_with()
    decision = explain(dmz, make_flow(dmz, "web", "151.101.1.1:443"), HOSTS)
    assert any("deb.debian.org" in note and "--resolved" in note for note in decision.notes)
    assert decision.log_prefix == "dmzctl e egress: "


def test_a_base_documents_own_dns_settings_and_dnsmasq_options_are_kept():
    from lxml import etree

    ns = "http://libvirt.org/schemas/network/dnsmasq/1.0"
    base = etree.fromstring(f'<network xmlns:dnsmasq="{ns}"><bridge stp="on" delay="0"/>'
                            '<dns><txt name="example" value="kept"/><forwarder addr="192.0.2.99"/></dns>'
                            '<ip address="10.80.0.1" netmask="255.255.255.0"/>'
                            '<dnsmasq:options><dnsmasq:option value="log-queries"/>'
                            '<dnsmasq:option value="nftset=/old.example/4#inet#x#y"/></dnsmasq:options></network>')
    net = render_network(dmz_with(dns_forwarders=["198.51.100.53"]), base)
    assert net.find("dns/txt").get("value") == "kept"
    assert [f.get("addr") for f in net.findall("dns/forwarder")] == ["198.51.100.53"]
    values = [o.get("value") for o in net.iter(f"{{{ns}}}option")]
    assert values == ["log-queries"] + dhcp6_options(dmz_with()) + ["cache-size=0"] + nftset_options(dmz_with())
