"""What `up` would change, decided exactly as `up` decides it.

`up` (lifecycle.py) asks the decide_* functions below what to do for each object
and then does it; `dmzctl plan` asks the same functions and prints their answers
as a diff, changing nothing. So the two cannot disagree.

The diffs are for people: XML is compared after libvirt's own additions are set
aside (a <mac> it generated, PCI addresses, defaults it filled in), and the
firewall in nft's text form as the kernel lists it, counters left out.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from lxml import etree

from .config import DMZ
from .desired import DesiredDMZ, build
from .host import nft
from .host.virt import DomainInfo, Virt, digest_of
from .render.base import NS, to_string
from .render.nft import FAMILY, apply_batch


# --- decisions (lifecycle.up executes these) ---------------------------------

@dataclass
class NetworkDecision:
    net: Any  # the libvirt network, None when absent
    want_xml: str
    live_xml: Optional[str]  # its persistent definition
    define: Optional[str]  # "new" | "update" | None
    start: bool
    autostart: bool  # active, but not marked autostart: up sets it
    pending: bool  # definition updated while active: applies at the network's next start


def decide_network(virt: Virt, desired: DesiredDMZ) -> NetworkDecision:
    xml = to_string(desired.network)
    net = virt.network(desired.dmz.name)
    if net is None:
        return NetworkDecision(None, xml, None, "new", start=True, autostart=False, pending=False)
    live = virt.network_xml(net)
    active = virt.network_active(net)
    define = "update" if digest_of(live) != digest_of(xml) else None
    return NetworkDecision(net, xml, live, define, start=not active,
                           autostart=active and not virt.network_autostart(net), pending=define is not None and active)


@dataclass
class FilterDecision:
    name: str
    element: etree._Element  # what to define (under the live uuid when it exists)
    live_xml: Optional[str]

    @property
    def action(self) -> str:
        return "update" if self.live_xml is not None else "define"


def same_filter(live_xml: str, element: etree._Element) -> bool:
    """Equal as XML: libvirt writes filters back with other quoting and indentation."""
    parser = etree.XMLParser(remove_blank_text=True)
    live = etree.fromstring(live_xml.encode(), parser)
    wanted = etree.fromstring(etree.tostring(element), parser)
    return etree.tostring(live, method="c14n") == etree.tostring(wanted, method="c14n")


def decide_nwfilters(virt: Virt, desired: DesiredDMZ) -> list[FilterDecision]:
    """The filters to define or redefine, in definition order (referenced first)."""
    decisions = []
    for name, element in desired.nwfilters.items():
        live = virt.nwfilter_xml(name)
        if live is not None and same_filter(live, element):
            continue
        if live is not None:
            # libvirt redefines a filter only under its existing uuid.
            live_uuid = etree.fromstring(live.encode()).findtext("uuid")
            element = copy.deepcopy(element)
            element.find("uuid").text = live_uuid
        decisions.append(FilterDecision(name, element, live))
    return decisions


@dataclass
class FirewallDecision:
    table: str
    live: Any  # canonical listing, None when absent
    want: Any  # canonical kernel form; None when not computed (the table is absent)

    @property
    def exists(self) -> bool:
        return self.live is not None

    @property
    def in_sync(self) -> bool:
        return self.live is not None and self.live == self.want

    @property
    def action(self) -> Optional[str]:
        if self.in_sync:
            return None
        return "update" if self.exists else "apply"


def decide_firewall(desired: DesiredDMZ) -> FirewallDecision:
    """Compare the live table with the config's, as the kernel lists both (no comparison when absent)."""
    live = nft.canonical(nft.list_table(desired.table))
    want = nft.kernel_form(apply_batch(desired.dmz, desired.blocks), desired.table) if live is not None else None
    return FirewallDecision(desired.table, live, want)


@dataclass
class DomainDecision:
    name: str
    info: Optional[DomainInfo]
    want_xml: str
    define: Optional[str]  # "new" | "update" | None
    autostart: Optional[bool]  # the value up sets, None when it is right already
    start: bool  # not running: up starts it
    outdated: bool = False  # running, and what runs is not (or will not be) the config's definition
    restart: bool = False  # outdated and up was asked to --restart-changed

    @property
    def running(self) -> bool:
        return self.info is not None and self.info.running


def decide_domain(virt: Virt, desired: DesiredDMZ, name: str, restart_changed: bool = False) -> DomainDecision:
    xml = to_string(desired.domains[name])
    want = digest_of(xml)
    vm = desired.dmz.vm(name)
    info = virt.domain_info(name)
    if info is None:
        return DomainDecision(name, None, xml, "new", True if vm.autostart else None, start=True)
    define = "update" if info.digest != want else None
    autostart = vm.autostart if info.autostart != vm.autostart else None
    # What runs now: a definition updated by an earlier `up` applies only at the next start.
    outdated = info.running and (define is not None or getattr(info, "live_digest", want) != want)
    return DomainDecision(name, info, xml, define, autostart, start=not info.running, outdated=outdated,
                          restart=outdated and restart_changed)


# --- the plan -----------------------------------------------------------------

@dataclass
class Step:
    kind: str  # network | nwfilter | firewall | vm
    name: str
    action: str  # define | update | start | apply | autostart | restart
    note: str = ""
    diff: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "action": self.action, "note": self.note,
                "diff": self.diff}


@dataclass
class Plan:
    dmz: str
    config: str
    steps: list[Step] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.steps

    def to_dict(self) -> dict:
        return {"dmz": self.dmz, "config": self.config, "changes": [s.to_dict() for s in self.steps]}


def compute(virt: Virt, dmz: DMZ, only: Optional[list[str]] = None, restart_changed: bool = False,
            diffs: bool = True) -> Plan:
    """What `up` (with the same options) would do, in its order. Raises what up's checks raise."""
    from .lifecycle import desired_state, preflight, selected_vms

    vm_names = selected_vms(dmz, only)
    desired = desired_state(virt, dmz)
    preflight(virt, desired, vm_names)
    plan = Plan(dmz.name, str(dmz.source))

    network = decide_network(virt, desired)
    label = f"{dmz.name} (bridge {dmz.bridge})"
    if network.define == "new":
        plan.steps.append(Step("network", label, "define"))
    elif network.define == "update":
        plan.steps.append(Step("network", label, "update",
                               "applies when the network restarts (dmzctl down, then up)" if network.pending else "",
                               xml_diff(network.live_xml, network.want_xml) if diffs else []))
    if network.start:
        plan.steps.append(Step("network", label, "start", "and mark it autostart"))
    elif network.autostart:
        plan.steps.append(Step("network", label, "autostart", "mark it autostart"))

    for decision in decide_nwfilters(virt, desired):
        diff = []
        if diffs and decision.live_xml is not None:
            diff = xml_diff(decision.live_xml, to_string(decision.element))
        plan.steps.append(Step("nwfilter", decision.name, decision.action, diff=diff))

    firewall = decide_firewall(desired)
    if firewall.action is not None:
        diff = firewall_diff(desired) if diffs else []
        plan.steps.append(Step("firewall", f"{FAMILY} {desired.table}", firewall.action,
                               "replaced whole in one transaction" if firewall.exists else "", diff))

    for name in vm_names:
        vm = dmz.vm(name)
        decision = decide_domain(virt, desired, name, restart_changed)
        if decision.define == "new":
            plan.steps.append(Step("vm", name, "define"))
        elif decision.define == "update":
            live = virt.domain_xml(virt.domain(name), inactive=True)
            note = ("applies at its next start (dmzctl up --restart-changed)"
                    if decision.outdated and not decision.restart else "")
            plan.steps.append(Step("vm", name, "update", note, xml_diff(live, decision.want_xml) if diffs else []))
        if decision.autostart is not None:
            plan.steps.append(Step("vm", name, "autostart", f"autostart {'on' if vm.autostart else 'off'}"))
        if decision.restart:
            plan.steps.append(Step("vm", name, "restart", "ACPI shutdown, then started with the config's definition"))
        elif decision.start:
            plan.steps.append(Step("vm", name, "start", "after its firewall is in place"))
    return plan


SYMBOLS = {"define": "+", "apply": "+", "update": "~", "start": ">", "autostart": "~", "restart": ">"}
WORDS = {"define": "defined", "apply": "applied", "update": "updated", "start": "started",
         "autostart": "changed", "restart": "restarted"}


def format_plan(plan: Plan) -> str:
    if plan.empty:
        return f"{plan.dmz}: nothing to do ({plan.config})\n"
    lines = [f"{plan.dmz}: {len(plan.steps)} change(s) ({plan.config})"]
    for step in plan.steps:
        note = f": {step.note}" if step.note else ""
        lines.append(f"  {SYMBOLS.get(step.action, '*')} {step.kind} {step.name} {WORDS.get(step.action, step.action)}"
                     f"{note}")
        lines.extend(f"      {line}" for line in step.diff)
    return "\n".join(lines) + "\n"


# --- diffs for people ---------------------------------------------------------

def xml_diff(live_xml: str, want_xml: str) -> list[str]:
    """A unified diff of a live definition and the rendered one, without libvirt's own additions."""
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    live = etree.fromstring(live_xml.encode(), parser)
    want = etree.fromstring(want_xml.encode(), parser)
    for root in (live, want):
        owned = root.find(f"metadata/{{{NS}}}*")
        if owned is not None:
            for key in ("digest", "hash"):  # the file's bytes, not what it says
                owned.attrib.pop(key, None)
    _prune(live, want)
    old = to_string(live).splitlines()
    new = to_string(want).splitlines()
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


_COUNTER_RE = re.compile(r"counter packets \d+ bytes \d+")


def _normal_text(text: str) -> list[str]:
    """Without counters' values, and without the elements of dynamic sets (the caps' meters: state)."""
    lines, in_dynamic, in_elements = [], False, False
    for line in text.splitlines():
        words = line.split()
        if words[:1] in (["set"], ["chain"]):
            in_dynamic = False
        elif words[:1] == ["flags"] and "dynamic" in words[1].split(","):
            in_dynamic = True
        elif in_dynamic and words[:2] == ["elements", "="]:
            in_elements = True
        if in_elements:
            in_elements = not line.rstrip().endswith("}")
            continue
        if line.strip():
            lines.append(_COUNTER_RE.sub("counter", line).rstrip())
    return lines


def firewall_diff(desired: DesiredDMZ) -> list[str]:
    """Rules, chains and set elements added/removed between the live table and the config's."""
    want = _normal_text(nft.kernel_text(apply_batch(desired.dmz, desired.blocks), desired.table))
    live_text = nft.list_table_text(desired.table)
    if live_text is None:
        return [f"+ {line}" for line in want]
    diff = list(difflib.unified_diff(_normal_text(live_text), want, "live", "config", n=1, lineterm=""))
    return diff or ["(differs only in what nft's text form does not show)"]
