"""`dmzctl check`: is what runs still what the config says? For cron and monitoring.

Each difference is one line naming the object and what is wrong with it; the
last line sums up all DMZs. Exit 0 when all are in sync, 1 when one drifted.
The comparisons are those `up` makes (plan.py), plus what `up` leaves alone
but an admin wants to know: a network or VM running an older definition, a VM
of the DMZ that is no longer in its config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .config import DMZ
from .desired import DesiredDMZ, build
from .errors import DmzctlError
from .implicit import SET_NAMES
from .host.virt import Virt, digest_of, domains_of, owner_of
from .plan import decide_firewall, decide_nwfilters
from .render.base import to_string


IMPLICIT_SETS = set(SET_NAMES.values())


@dataclass
class Difference:
    object: str  # "firewall table inet dmzctl-demo", "network demo", "VM web", "nwfilter x"
    problem: str  # what is wrong, for the per-line report
    short: str  # a few words for the summary line

    def line(self) -> str:
        return f"{self.object}: {self.problem}"


@dataclass
class DMZCheck:
    name: str
    config: str
    differences: list[Difference] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)  # what --fix changed
    error: Optional[str] = None  # --fix failed with this
    seconds: float = 0.0

    @property
    def in_sync(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict:
        return {"dmz": self.name, "config": self.config, "in_sync": self.in_sync,
                "differences": [{"object": d.object, "problem": d.problem, "short": d.short}
                                for d in self.differences],
                "fixed": self.fixed, "fix_error": self.error, "seconds": round(self.seconds, 3)}


def check_dmz(virt: Virt, dmz: DMZ) -> DMZCheck:
    from .lifecycle import desired_state

    began = time.monotonic()
    result = DMZCheck(dmz.name, str(dmz.source))
    desired = desired_state(virt, dmz)
    found = result.differences
    network_ok = _check_network(virt, desired, found)
    if network_ok:
        _check_nwfilters(virt, desired, found)
    _check_firewall(desired, found)
    _check_domains(virt, desired, found)
    _check_hooks(found)
    result.seconds = time.monotonic() - began
    return result


def _check_network(virt: Virt, desired: DesiredDMZ, found: list[Difference]) -> bool:
    dmz = desired.dmz
    what = f"network {dmz.name}"
    net = virt.network(dmz.name)
    if net is None:
        found.append(Difference(what, "missing", "network missing"))
        return True
    definition = virt.network_xml(net)
    if owner_of(definition) != dmz.name:
        found.append(Difference(what, "exists and is not this DMZ's (dmzctl will not touch it)",
                                "network foreign"))
        return False
    want = digest_of(to_string(desired.network))
    if digest_of(definition) != want:
        found.append(Difference(what, "definition differs from the config", "network definition differs"))
    if not virt.network_active(net):
        found.append(Difference(what, "not active", "network inactive"))
    else:
        if digest_of(virt.network_xml(net, inactive=False)) != want and digest_of(definition) == want:
            found.append(Difference(what, "runs an older definition (dmzctl down, then up)",
                                    "network runs an older definition"))
        if not virt.network_autostart(net):
            found.append(Difference(what, "not marked autostart", "network autostart off"))
    return True


def _check_hooks(found: list[Difference]) -> None:
    from .install import missing_hooks

    for path in missing_hooks():
        found.append(Difference(f"libvirt hook {path}", "missing: virsh or virt-manager could start a VM of this "
                                                        "DMZ without its firewall table", "hooks missing"))


def _check_nwfilters(virt: Virt, desired: DesiredDMZ, found: list[Difference]) -> None:
    for decision in decide_nwfilters(virt, desired):
        if decision.live_xml is None:
            found.append(Difference(f"nwfilter {decision.name}", "missing", "nwfilter missing"))
        else:
            found.append(Difference(f"nwfilter {decision.name}", "differs from the config", "nwfilter differs"))


def _check_firewall(desired: DesiredDMZ, found: list[Difference]) -> None:
    what = f"firewall table inet {desired.table}"
    decision = decide_firewall(desired)
    if decision.in_sync:
        return
    if not decision.exists:
        found.append(Difference(what, "missing", "firewall table missing"))
        return
    for problem, short in table_drift(decision.live, decision.want):
        found.append(Difference(what, problem, short))


def table_drift(live: Any, want: Any) -> list[tuple[str, str]]:
    """What differs between two canonical listings, chain by chain: (problem, short)."""
    def parts(listing):
        chains, rules, sets = {}, {}, {}
        for item in listing:
            (kind, body), = item.items()
            if kind == "chain":
                chains[body["name"]] = body
                rules.setdefault(body["name"], [])
            elif kind == "rule":
                rules.setdefault(body["chain"], []).append(body)
            elif kind in ("set", "map"):
                sets[body["name"]] = body
        return chains, rules, sets

    live_chains, live_rules, live_sets = parts(live)
    want_chains, want_rules, want_sets = parts(want)
    out = []
    for name in want_chains:
        if name not in live_chains:
            out.append((f"chain {name} missing", f"firewall chain {name} missing"))
        elif live_chains[name] != want_chains[name]:
            out.append((f"chain {name} differs (hook, priority or policy)", f"firewall chain {name} differs"))
        elif not live_rules.get(name) and want_rules.get(name):
            out.append((f"chain {name} flushed (0 of {len(want_rules[name])} rules)",
                        f"firewall chain {name} flushed"))
        elif live_rules.get(name) != want_rules.get(name):
            have, need = live_rules.get(name, []), want_rules.get(name, [])
            missing = sum(1 for rule in need if rule not in have)
            extra = sum(1 for rule in have if rule not in need)
            detail = ", ".join(x for x in (f"{missing} missing" if missing else "",
                                           f"{extra} not in the config" if extra else "") if x) or "order differs"
            out.append((f"chain {name} rules differ ({detail})", f"firewall chain {name} altered"))
    for name in live_chains:
        if name not in want_chains:
            out.append((f"chain {name} is not in the config", f"firewall chain {name} added"))
    for name in want_sets:
        if live_sets.get(name) != want_sets[name]:
            if name.rstrip("46") in IMPLICIT_SETS and name in live_sets:
                out.append((f"set {name} is stale: the host's networks or the other DMZs changed since it was "
                            f"applied (check --fix re-applies)", f"firewall set {name} stale"))
            else:
                out.append((f"set {name} differs", f"firewall set {name} differs"))
    return out or [("differs from the config", "firewall table differs")]


def _check_domains(virt: Virt, desired: DesiredDMZ, found: list[Difference]) -> None:
    dmz = desired.dmz
    for vm in dmz.vms:
        what = f"VM {vm.name}"
        want = digest_of(to_string(desired.domains[vm.name]))
        info = virt.domain_info(vm.name)
        if info is None:
            found.append(Difference(what, "not defined", f"VM {vm.name} missing"))
            continue
        if info.owner != dmz.name:
            found.append(Difference(what, "a domain of this name exists and is not this DMZ's",
                                    f"VM {vm.name} foreign"))
            continue
        if info.digest != want:
            found.append(Difference(what, "definition differs from the config", f"VM {vm.name} definition differs"))
        if not info.running:
            found.append(Difference(what, f"{info.state}, expected running", f"VM {vm.name} {info.state}"))
        elif info.digest == want and info.live_digest != want:
            found.append(Difference(what, "runs an older definition (dmzctl up --restart-changed)",
                                    f"VM {vm.name} runs an older definition"))
        if info.autostart != vm.autostart:
            found.append(Difference(what, f"autostart {'on' if info.autostart else 'off'}, the config says "
                                          f"{'on' if vm.autostart else 'off'}", f"VM {vm.name} autostart"))
    configured = {vm.name for vm in dmz.vms}
    for name in domains_of(virt, dmz.name):
        if name not in configured:
            found.append(Difference(f"VM {name}", "belongs to this DMZ but is not in its config "
                                                  "(dmzctl down removes it)", f"VM {name} not in config"))


def fix(virt: Virt, dmz: DMZ, result: DMZCheck, say: Callable[[str], None]) -> DMZCheck:
    """Re-apply with `up` (idempotent: only what differs changes), then check again."""
    from . import lifecycle

    changes: list[str] = []
    error = None
    try:
        with lifecycle.dmz_lock(dmz.name, say=say):
            outcome = lifecycle.up(virt, dmz, say=lambda message: None)
            changes = outcome.changes + [f"PENDING: {p}" for p in outcome.pending]
    except DmzctlError as failure:
        error = str(failure)
    again = check_dmz(virt, dmz)
    again.fixed = changes
    again.error = error
    again.seconds += result.seconds
    return again


def summary(results: list[DMZCheck], fixed: bool = False) -> str:
    drifted = [r for r in results if not r.in_sync]
    repaired = [r for r in results if r.fixed and r.in_sync]
    head = f"dmzctl check: {len(results)} DMZ(s)"
    if fixed and repaired:
        head += f", {len(repaired)} fixed ({', '.join(r.name for r in repaired)})"
    if not drifted:
        return f"{head}, all in sync"
    reasons = []
    for r in drifted:
        shorts = list(dict.fromkeys(d.short for d in r.differences))
        more = f", +{len(shorts) - 1} more" if len(shorts) > 1 else ""
        reasons.append(f"{r.name} ({shorts[0]}{more})")
    word = "still drifted" if fixed else "drifted"
    return f"{head}, {len(drifted)} {word}: {', '.join(reasons)}"


def format_check(result: DMZCheck) -> str:
    lines = []
    for change in result.fixed:
        lines.append(f"{result.name}: fixed: {change}")
    if result.error:
        lines.append(f"{result.name}: fix failed: {result.error}")
    if result.in_sync:
        lines.append(f"{result.name}: in sync ({result.config})")
    else:
        lines.extend(f"{result.name}: {d.line()}" for d in result.differences)
    return "\n".join(lines)
