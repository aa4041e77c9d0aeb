"""`dmzctl plan`: what `up` would change, decided exactly as `up` decides it (ops/decide.py),
changing nothing; and the differences it would resolve, as status and check list them.

The diffs are for people: XML is compared after libvirt's own additions are set
aside (a <mac> it generated, PCI addresses, defaults it filled in), and the
firewall in nft's text form as the kernel lists it, counters left out.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Optional

from ..config import DMZ
from ..desired import DesiredDMZ
from ..host import nft
from ..host.virt import Virt
from ..render.base import to_string
from ..render.nft import FAMILY, apply_batch
from ..render.nft_edges import is_name_set
from ..settings import Settings
from ..state import Difference
from ..xmlcompare import xml_diff
from .decide import (
    StorageDecision, decide_domain, decide_firewall_action, decide_network, decide_nwfilters, decide_storage,
)


# --- the plan -----------------------------------------------------------------

@dataclass
class Step:
    kind: str  # network | nwfilter | firewall | pool | volume | seed | vm
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
    differences: list[Difference] = field(default_factory=list)  # what status and check report
    notes: list[str] = field(default_factory=list)  # what up will leave as it is, and say so

    @property
    def empty(self) -> bool:
        return not self.steps

    def to_dict(self) -> dict:
        return {"dmz": self.dmz, "config": self.config, "changes": [s.to_dict() for s in self.steps],
                "differences": [d.to_dict() for d in self.differences], "notes": self.notes}


def compute(virt: Virt, dmz: DMZ, settings: Settings, only: Optional[list[str]] = None,
            restart_changed: bool = False, diffs: bool = True) -> Plan:
    """What `up` (with the same options) would do, in its order. Raises what up's checks raise."""
    from .common import inspect_for_up

    snap, vm_names = inspect_for_up(virt, dmz, settings, only)
    desired, observed = snap.desired, snap.observed
    plan = Plan(dmz.name, str(dmz.source), differences=snap.differences)
    plan.steps += _network_steps(desired, observed, diffs)
    for decision in decide_nwfilters(desired, observed):
        diff = xml_diff(decision.live_xml, to_string(decision.element)) if diffs and decision.live_xml else []
        plan.steps.append(Step("nwfilter", decision.name, decision.action, diff=diff))
    action = decide_firewall_action(observed)
    if action is not None:
        plan.steps.append(Step("firewall", f"{FAMILY} {desired.table}", action,
                               "replaced whole in one transaction" if observed.table.exists else "",
                               firewall_diff(desired) if diffs else []))
    for name in vm_names:
        storage = decide_storage(desired, observed, name)
        plan.steps += _storage_steps(storage, name)
        plan.notes += list(storage.notes) if storage is not None else []
        plan.steps += _domain_steps(desired, observed, name, restart_changed, diffs)
    return plan


def _storage_steps(decision: Optional[StorageDecision], name: str) -> list[Step]:
    if decision is None:
        return []
    steps = []
    if decision.pool_action == "create":
        steps.append(Step("pool", decision.pool, "create", "a dir pool at /var/lib/dmzctl/pool, autostart"))
    elif decision.pool_action == "start":
        steps.append(Step("pool", decision.pool, "start"))
    for volume in decision.volumes:
        kind = "seed" if volume.kind == "seed" else "volume"
        note = {"root": f"qcow2 over its base image, VM {name}", "data": f"empty qcow2, VM {name}",
                "seed": f"cloud-init NoCloud ISO, VM {name}"}[volume.kind]
        if volume.action == "update":
            note = f"cloud-init inputs changed: made anew, VM {name}"
        steps.append(Step(kind, f"{volume.pool}/{volume.name}", volume.action, note))
    return steps


def _network_steps(desired: DesiredDMZ, observed, diffs: bool) -> list[Step]:
    network = decide_network(desired, observed)
    label = f"{desired.dmz.name} (bridge {desired.dmz.bridge})"
    steps = []
    if network.define == "new":
        steps.append(Step("network", label, "define"))
    elif network.define == "update":
        steps.append(Step("network", label, "update",
                          "applies when the network restarts (dmzctl down, then up)" if network.pending else "",
                          xml_diff(network.live_xml, network.want_xml) if diffs else []))
    if network.start:
        steps.append(Step("network", label, "start", "and mark it autostart"))
    elif network.autostart:
        steps.append(Step("network", label, "autostart", "mark it autostart"))
    return steps


def _domain_steps(desired: DesiredDMZ, observed, name: str, restart_changed: bool, diffs: bool) -> list[Step]:
    vm = desired.dmz.vm(name)
    decision = decide_domain(desired, observed, name, restart_changed)
    steps = []
    if decision.define == "new":
        steps.append(Step("vm", name, "define"))
    elif decision.define == "update":
        note = ("applies at its next start (dmzctl up --restart-changed)"
                if decision.outdated and not decision.restart else "")
        diff = xml_diff(decision.info.definition, decision.want_xml) if diffs else []
        steps.append(Step("vm", name, "update", note, diff))
    if decision.autostart is not None:
        steps.append(Step("vm", name, "autostart", f"autostart {'on' if vm.autostart else 'off'}"))
    if decision.restart:
        steps.append(Step("vm", name, "restart", "ACPI shutdown, then started with the config's definition"))
    elif decision.start:
        steps.append(Step("vm", name, "start", "after its firewall is in place"))
    return steps


SYMBOLS = {"define": "+", "apply": "+", "create": "+", "update": "~", "start": ">", "autostart": "~",
           "restart": ">"}
WORDS = {"define": "defined", "apply": "applied", "create": "created", "update": "updated", "start": "started",
         "autostart": "changed", "restart": "restarted"}


def format_plan(plan: Plan) -> str:
    untouched = [d for d in plan.differences if d.kind in UP_LEAVES]
    notes = [f"  ! {d.line()} (up leaves it)" for d in untouched] + [f"  ! {note}" for note in plan.notes]
    if plan.empty:
        return "\n".join([f"{plan.dmz}: nothing to do ({plan.config})"] + notes) + "\n"
    lines = [f"{plan.dmz}: {len(plan.steps)} change(s) ({plan.config})"]
    for step in plan.steps:
        note = f": {step.note}" if step.note else ""
        lines.append(f"  {SYMBOLS.get(step.action, '*')} {step.kind} {step.name} {WORDS.get(step.action, step.action)}"
                     f"{note}")
        lines.extend(f"      {line}" for line in step.diff)
    return "\n".join(lines + notes) + "\n"


# Differences `up` does not act on: it never removes a VM the config dropped (down does).
UP_LEAVES = ("vm-not-in-config",)


# --- diffs for people ---------------------------------------------------------

_COUNTER_RE = re.compile(r"counter packets \d+ bytes \d+")


def _normal_text(text: str) -> list[str]:
    """Without counters' values, and without the elements of dynamic sets (the caps' meters: state)."""
    lines, in_dynamic, in_elements = [], False, False
    for line in text.splitlines():
        words = line.split()
        if words[:1] in (["set"], ["chain"]):
            in_dynamic = words[:1] == ["set"] and len(words) > 1 and is_name_set(words[1])
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
    live_text = nft.list_firewall_text(desired.table)
    if live_text is None:
        return [f"+ {line}" for line in want]
    diff = list(difflib.unified_diff(_normal_text(live_text), want, "live", "config", n=1, lineterm=""))
    return diff or ["(differs only in what nft's text form does not show)"]
