"""IPv6 delivery, pure: the DHCPv6 host entries and router-advertisement flags in the rendered network,
the live update of those entries, and the DHCPv6 rule of the table (with explain agreeing).

The real client is in tests/test_ipv6_guest.py (the Debian guest: systemd-networkd's DHCPv6)."""

from __future__ import annotations

import ipaddress

from lxml import etree

from dmzctl.config import parse_dmz
from dmzctl.explain import Flow, explain
from dmzctl.render.base import to_string
from dmzctl.render.network import DNSMASQ_NS, render_network
from dmzctl.render.nft import render_table
from dmzctl.xmlcompare import dhcp_host_change, differs

WEB = {"name": "web", "ip": "10.217.0.10", "ip6": "fdd0:217::10", "mac": "52:54:00:21:70:10",
       "disks": ["/var/lib/x/web.qcow2"]}
MAIL = {"name": "mail", "ip": "10.217.0.11", "ip6": "fdd0:217::11", "mac": "52:54:00:21:70:11",
        "disks": ["/var/lib/x/mail.qcow2"]}
V4ONLY = {"name": "old", "ip": "10.217.0.12", "mac": "52:54:00:21:70:12", "disks": ["/var/lib/x/old.qcow2"]}


def dmz_of(*vms, **overrides):
    data = {"dmz": {"name": "v6-t", "gateway": "10.217.0.1/24", "gateway6": "fdd0:217::1/64",
                    "protected": ["10.218.0.0/24", "fdd0:218::/64"], **overrides},
            "vm": [{k: v for k, v in vm.items() if v is not None} for vm in vms]}
    data["dmz"] = {k: v for k, v in data["dmz"].items() if v is not None}
    return parse_dmz(data)


def network(*vms, **overrides) -> etree._Element:
    return render_network(dmz_of(*vms, **overrides))


def test_each_vm_with_ip6_has_a_dhcpv6_host_bound_to_its_mac():
    net = network(WEB, MAIL, V4ONLY)
    ip6 = net.find("ip[@family='ipv6']")
    hosts = [dict(host.attrib) for host in ip6.findall("dhcp/host")]
    # libvirt writes `<name>,[<ip>]` into dnsmasq's hostsfile: with a MAC as name, dnsmasq's dhcp-host=<mac>,[ip]
    assert hosts == [{"name": WEB["mac"], "ip": WEB["ip6"]}, {"name": MAIL["mac"], "ip": MAIL["ip6"]}]
    assert ip6.find("dhcp/range") is None  # static only: no address for a client the config does not name
    # The IPv4 leases are as before.
    assert [h.get("mac") for h in net.findall("ip[@address='10.217.0.1']/dhcp/host")] == [
        WEB["mac"], MAIL["mac"], V4ONLY["mac"]]


def test_router_advertisements_keep_slaac_next_to_dhcpv6():
    net = network(WEB)
    options = net.findall(f"{{{DNSMASQ_NS}}}options/{{{DNSMASQ_NS}}}option")
    assert [o.get("value") for o in options] == ["dhcp-range=fdd0:217::1,ra-only,64"]
    # Declared where libvirt writes it back, so that the live document compares equal.
    assert net.nsmap.get("dnsmasq") == DNSMASQ_NS
    assert to_string(net).startswith(f'<network xmlns:dnsmasq="{DNSMASQ_NS}">')


def test_no_dhcpv6_without_ip6_vms_or_without_dhcp():
    for net in (network(V4ONLY), network(WEB, dhcp=False), network(dict(WEB, ip6=None), gateway6=None, protected=["10.218.0.0/24"])):
        assert net.find("ip[@family='ipv6']/dhcp") is None
        assert net.find(f"{{{DNSMASQ_NS}}}options") is None
        assert "dnsmasq" not in to_string(net)


def test_libvirts_live_document_compares_equal():
    """What libvirt 9.0 returns for the rendered network (seen with net-dumpxml): single quotes, its own
    uuid/mac, the namespace on <network>."""
    want = to_string(network(WEB))
    live = want.replace('"', "'").replace("<bridge ", "<mac address='52:54:00:9f:70:f9'/>\n  <bridge ")
    assert not differs(live, want)


def test_an_added_or_removed_vm_updates_both_families_live():
    one, two = (to_string(network(*vms)) for vms in ((WEB,), (WEB, MAIL)))
    removed, added = dhcp_host_change(one, two)
    assert removed == []
    assert [(index, etree.fromstring(xml).attrib["ip"]) for index, xml in added] == [
        (0, MAIL["ip"]), (1, MAIL["ip6"])]  # parentIndex: the <ip> elements in order, IPv4 first
    removed, added = dhcp_host_change(two, one)
    assert added == [] and [index for index, _ in removed] == [0, 1]


def test_the_first_ip6_vm_or_the_last_one_gone_needs_a_network_restart():
    """libvirt switches dnsmasq's DHCPv6 on or off only when the network starts (an IPv6 <host> added by
    net-update to a network without DHCPv6 is written to the hostsfile, and nothing answers)."""
    without, with_ip6 = (to_string(network(*vms)) for vms in ((V4ONLY,), (V4ONLY, WEB)))
    assert dhcp_host_change(without, with_ip6) is None
    assert dhcp_host_change(with_ip6, without) is None
    # A VM without ip6 added next to one with: live, IPv4 only.
    removed, added = dhcp_host_change(with_ip6, to_string(network(V4ONLY, WEB, dict(MAIL, ip6=None))))
    assert removed == [] and [index for index, _ in added] == [0]


def _dhcp6_rules(dmz):
    return [c["add"]["rule"] for c in render_table(dmz)
            if "rule" in c.get("add", {}) and c["add"]["rule"].get("comment") == "DHCPv6 to the gateway"]


def test_the_table_accepts_dhcpv6_from_link_local_to_the_servers_address_only():
    rules = _dhcp6_rules(dmz_of(WEB))
    assert len(rules) == 1 and rules[0]["chain"] == "to_host"
    text = str(rules[0]["expr"])
    assert "'fe80::', 'len': 10" in text and "ff02::1:2" in text and "547" in text
    assert _dhcp6_rules(dmz_of(WEB, dhcp=False)) == []


def decide(dmz, dst, src, port=547):
    return explain(dmz, Flow(dst=ipaddress.ip_address(dst), proto="udp", src=ipaddress.ip_address(src), port=port))


def test_explain_agrees_on_dhcpv6():
    dmz = dmz_of(WEB)
    d = decide(dmz, "ff02::1:2", "fe80::5054:ff:fe21:7010")
    assert (d.allowed, d.decided_by, d.rule) == (True, "dhcp6", "DHCPv6 to the gateway")
    # From a global address, or another port, or with dhcp off: the host is not reached.
    assert decide(dmz, "ff02::1:2", "fdd0:217::10").decided_by == "host"
    assert decide(dmz, "ff02::1:2", "fe80::1", port=548).decided_by == "host"
    assert decide(dmz_of(WEB, dhcp=False), "ff02::1:2", "fe80::1").decided_by == "host"
