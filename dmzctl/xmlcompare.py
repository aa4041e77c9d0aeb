"""Compare a live libvirt definition with the rendered one, setting aside what libvirt adds.

libvirt writes back more than it was given (a generated <mac>, PCI addresses, defaults
it fills in, the machine alias expanded, its own order): those are pruned from the
live document before comparing, so what remains is what someone changed behind
dmzctl's back or what the config changed. Pure.
"""

from __future__ import annotations

import difflib
from typing import Optional

from lxml import etree

from .render.base import NS, to_string


def _comparable(live_xml: str, want_xml: str) -> tuple[list[str], list[str]]:
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    live = etree.fromstring(live_xml.encode(), parser)
    want = etree.fromstring(want_xml.encode(), parser)
    for root in (live, want):
        owned = root.find(f"metadata/{{{NS}}}*")
        if owned is not None:
            for key in ("digest", "hash"):  # the file's bytes, not what it says
                owned.attrib.pop(key, None)
    _prune(live, want)
    for root in (live, want):
        for node in root.iter():  # what pruning leaves of indentation is no difference
            if node.text is not None and not node.text.strip():
                node.text = None
            if node.tail is not None and not node.tail.strip():
                node.tail = None
    return to_string(live).splitlines(), to_string(want).splitlines()


def differs(live_xml: str, want_xml: str) -> bool:
    """Whether the live definition says something else than the rendered one."""
    old, new = _comparable(live_xml, want_xml)
    return old != new


HostEntry = tuple[int, str]  # (index of its <ip> among the network's <ip> elements: libvirt's parentIndex, <host>)


def dhcp_host_change(live_xml: str, want_xml: str) -> Optional[tuple[list[HostEntry], list[HostEntry]]]:
    """(removed, added) <host> entries of the DHCP sections (IPv4 and IPv6), when the two network documents
    differ in those alone; None when anything else differs too (a DHCP section appearing or going
    included: libvirt switches dnsmasq's DHCPv6 on or off only when the network starts)."""
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    live, want = (etree.fromstring(x.encode(), parser) for x in (live_xml, want_xml))
    hosts = []
    for root in (live, want):
        entries = {}
        for index, ip in enumerate(root.findall("ip")):
            for host in ip.findall("dhcp/host"):
                entries[(index, _host_key(host))] = (index, to_string(host).strip())
                host.getparent().remove(host)
        hosts.append(entries)
    if differs(to_string(live), to_string(want)):
        return None
    removed = [entry for key, entry in hosts[0].items() if key not in hosts[1]]
    added = [entry for key, entry in hosts[1].items() if key not in hosts[0]]
    return removed, added


def _host_key(host: etree._Element) -> tuple:
    return tuple(sorted((key, host.get(key)) for key in ("mac", "name", "ip") if host.get(key)))


def xml_diff(live_xml: str, want_xml: str) -> list[str]:
    """A unified diff of a live definition and the rendered one, without libvirt's own additions."""
    old, new = _comparable(live_xml, want_xml)
    diff = list(difflib.unified_diff(old, new, "live", "config", n=1, lineterm=""))
    if not diff:
        return ["(differs only where libvirt fills in defaults; compare `virsh dumpxml --inactive` "
                "with `dmzctl render`)"]
    return diff


def _prune(live: etree._Element, want: etree._Element) -> None:
    """Set aside in `live` what libvirt adds or rewrites: attributes and child kinds the rendered
    document has not, the machine alias it expands (pc -> pc-i440fx-7.2), the order of attributes
    and of child kinds."""
    for key in list(live.attrib):
        if key not in want.attrib:
            del live.attrib[key]
        elif _expanded(live.tag, key, live.get(key), want.get(key)):
            live.set(key, want.get(key))
    # ... and attributes in its own order: show them in the rendered document's.
    values = dict(live.attrib)
    live.attrib.clear()
    for key in sorted(values, key=lambda k: list(want.attrib).index(k)):
        live.set(key, values[key])
    wanted: dict[str, list[etree._Element]] = {}
    for child in want:
        wanted.setdefault(child.tag, []).append(child)
    used: set[int] = set()
    for child in list(live):
        peers = wanted.get(child.tag)
        if not peers:
            live.remove(child)
            continue
        # Pair with the most alike rendered element of its kind (not by position: one
        # inserted in the config would shift every pair after it).
        pool = [p for p in peers if id(p) not in used] or peers
        best = max(pool, key=lambda peer: _alike(child, peer))
        used.add(id(best))
        _prune(child, best)
    # libvirt writes children in its schema's order; only the order within one kind means something.
    rank = {}
    for position, child in enumerate(want):
        rank.setdefault(child.tag, position)
    ordered = sorted(live, key=lambda child: rank[child.tag])
    for child in ordered:
        live.append(child)


def _alike(a: etree._Element, b: etree._Element) -> int:
    """How much two elements have in common: equal attributes anywhere below, and kinds of descendants."""
    def signature(element):
        pairs, tags = set(), set()
        for node in element.iter():
            tags.add(node.tag)
            pairs.update((node.tag, key, value) for key, value in node.attrib.items())
            if node.text and node.text.strip():
                pairs.add((node.tag, "#text", node.text.strip()))
        return pairs, tags

    pairs_a, tags_a = signature(a)
    pairs_b, tags_b = signature(b)
    return 2 * len(pairs_a & pairs_b) + len(tags_a & tags_b)


def _expanded(tag: str, key: str, live: str, want: str) -> bool:
    """A value libvirt expands from the one dmzctl wrote: the same setting."""
    if tag == "type" and key == "machine" and live != want:
        return live.startswith((f"{want}-", f"pc-{want}-")) or (want == "pc" and live.startswith("pc-i440fx-"))
    return False


