"""`dmzctl status` and `dmzctl check`: the live DMZ against its config, from one snapshot.

Both print state.diff()'s differences, nothing else decides "as configured": status
groups them under the objects it shows, check lists them one per line with a summary
line made from the same list (for cron and monitoring); check --fix acts on them
through `up` and looks again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ..addresses import ObservedAddress, format_addresses, observed_addresses
from ..config import DMZ
from ..errors import DmzctlError
from ..host.lock import dmz_lock
from ..host.neighbours import bridge_neighbours
from ..host.virt import Virt
from ..settings import Settings
from ..state import Difference, Snapshot, snapshot, summary_of
from . import lifecycle, teardown
from .common import desired_state


def inspect(virt: Virt, dmz: DMZ, settings: Settings) -> Snapshot:
    return snapshot(virt, desired_state(virt, dmz, settings), settings.hooks_dir)


# --- status ----------------------------------------------------------------------------

@dataclass
class VMStatus:
    name: str
    state: str
    as_configured: bool
    uptime_s: Optional[float] = None
    configured: list[str] = field(default_factory=list)  # the config's ip and ip6
    observed: Optional[list[ObservedAddress]] = None     # seen on the host; None unless running
    problems: list[str] = field(default_factory=list)


@dataclass
class DMZStatus:
    name: str
    config: str
    network: str  # active | inactive | absent | foreign
    network_as_configured: bool
    firewall: str  # in sync | drifted | absent
    vms: list[VMStatus]
    problems: list[str]
    warnings: list[str] = field(default_factory=list)
    hooks: str = "installed"  # installed | missing
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def verdict(self) -> str:
        """OK; DOWN (defined, not running: `dmzctl down`); NOT DEFINED; or NOT AS CONFIGURED."""
        kinds = {d.kind for d in self.differences}
        if not kinds:
            return "OK"
        if "dmz-down" in kinds:
            return "DOWN (defined, not running)" if len(kinds) == 1 else "DOWN (defined, not as configured)"
        if self.network == "absent" and all(vm.state == "absent" for vm in self.vms):
            return "NOT DEFINED"
        return "NOT AS CONFIGURED"

    def to_dict(self) -> dict:
        data = asdict(self)  # observed addresses become {"address", "sources"}
        data["ok"] = self.ok
        data["verdict"] = self.verdict
        return data


def dmz_status(virt: Virt, dmz: DMZ, settings: Settings) -> DMZStatus:
    snap = inspect(virt, dmz, settings)
    observed, differences = snap.observed, snap.differences
    about_vms = {d.subject for d in differences if d.kind.startswith("vm-") and d.subject}
    network = _network_word(dmz, observed.network)
    table = observed.table
    seen = _seen(virt, dmz, observed.network if network == "active" else None, observed.domains)
    vms = [_vm_status(dmz, vm, observed.domains.get(vm.name), differences, seen) for vm in dmz.vms]
    problems = [d.line() for d in differences if d.subject not in about_vms or not d.kind.startswith("vm-")]
    return DMZStatus(name=dmz.name, config=str(dmz.source), network=network,
                     network_as_configured=network == "active" and not any(d.kind.startswith("network-")
                                                                             for d in differences),
                     firewall="absent" if not table.exists else "in sync" if table.in_sync else "drifted",
                     vms=vms, problems=problems, warnings=[],
                     hooks="missing" if observed.hooks_missing else "installed", differences=differences)


def _network_word(dmz: DMZ, network) -> str:
    if network is None:
        return "absent"
    if network.owner != dmz.name:
        return "foreign"
    return "active" if network.active else "inactive"


def _seen(virt: Virt, dmz: DMZ, network, domains: dict) -> dict:
    """What the host sees of the running VMs' addresses: libvirt's leases, the bridge's neighbour table,
    and the guest agent of each VM that runs one."""
    running = [name for name, info in domains.items() if info is not None and info.running
               and info.owner == dmz.name]
    seen = {"leases": [], "neighbours": [], "agent": {name: virt.agent_addresses(name) for name in running}}
    if network is not None:
        seen["leases"] = virt.dhcp_leases(dmz.name)
        seen["neighbours"] = bridge_neighbours(network.bridge or dmz.bridge)
    return seen


def _vm_status(dmz: DMZ, vm, info, differences: list[Difference], seen: dict) -> VMStatus:
    mine = [d for d in differences if d.subject == vm.name and d.kind.startswith("vm-")]
    status = VMStatus(name=vm.name, state="absent", as_configured=not mine,
                      problems=[d.problem for d in mine])
    if info is not None:
        status.state = info.state if info.owner == dmz.name else "foreign"
        if info.started_at:
            status.uptime_s = round(time.time() - info.started_at, 1)
    status.configured = [str(a) for a in (vm.ip, vm.ip6) if a is not None]
    if info is not None and info.running and info.owner == dmz.name:
        status.observed = observed_addresses(vm.mac, seen["leases"], seen["neighbours"],
                                             seen["agent"].get(vm.name, ()))
    return status


def format_status(status: DMZStatus) -> str:
    differs = " (differs from config)" if not status.network_as_configured and status.network == "active" else ""
    lines = [f"DMZ {status.name} ({status.config}): {status.verdict}",
             f"  network   {status.network}{differs}",
             f"  firewall  {status.firewall}",
             f"  hooks     {status.hooks}"]
    for vm in status.vms:
        uptime = f", up {_duration(vm.uptime_s)}" if vm.uptime_s is not None else ""
        lines.append(f"  vm {vm.name:<12} {vm.state}{uptime}, {format_addresses(vm.configured, vm.observed)}")
        lines.extend(f"      ! {problem}" for problem in vm.problems)
    lines.extend(f"  ! {problem}" for problem in status.problems)
    lines.extend(f"  warning: {warning}" for warning in status.warnings)
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --- check -----------------------------------------------------------------------------

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
                "differences": [d.to_dict() for d in self.differences],
                "fixed": self.fixed, "fix_error": self.error, "seconds": round(self.seconds, 3)}


def check_dmz(virt: Virt, dmz: DMZ, settings: Settings) -> DMZCheck:
    began = time.monotonic()
    snap = inspect(virt, dmz, settings)
    return DMZCheck(dmz.name, str(dmz.source), snap.differences, seconds=time.monotonic() - began)


def fix(virt: Virt, dmz: DMZ, result: DMZCheck, settings: Settings, say: Callable[[str], None]) -> DMZCheck:
    """Re-apply with `up` (idempotent: only what differs changes), remove the VMs the config no longer
    names, then check again."""
    changes: list[str] = []
    error = None
    strays = [d.subject for d in result.differences if d.kind == "vm-not-in-config"]
    try:
        with dmz_lock(settings.run_dir, dmz.name, say=say):
            outcome = lifecycle.up(virt, dmz, settings, say=lambda message: None)
            # The config no longer names them: stopped and undefined, as `destroy` would (disks stay).
            teardown.remove_domains(virt, dmz, strays, settings, outcome, say=lambda message: None)
            changes = outcome.changes + outcome.refreshed + [f"PENDING: {p}" for p in outcome.pending]
    except DmzctlError as failure:
        error = str(failure)
    again = check_dmz(virt, dmz, settings)
    again.fixed = changes
    again.error = error
    again.seconds += result.seconds
    return again


def summary(results: list[DMZCheck], fixed: bool = False) -> str:
    """One line for all DMZs, from the same differences the per-line report lists."""
    drifted = [r for r in results if not r.in_sync]
    repaired = [r for r in results if r.fixed and r.in_sync]
    head = f"dmzctl check: {len(results)} DMZ(s)"
    if fixed and repaired:
        head += f", {len(repaired)} fixed ({', '.join(r.name for r in repaired)})"
    if not drifted:
        return f"{head}, all in sync"
    word = "still drifted" if fixed else "drifted"
    return f"{head}, {len(drifted)} {word}: {', '.join(summary_of(r.name, r.differences) for r in drifted)}"


def format_check(result: DMZCheck) -> str:
    lines = [f"{result.name}: fixed: {change}" for change in result.fixed]
    if result.error:
        lines.append(f"{result.name}: fix failed: {result.error}")
    if result.in_sync:
        lines.append(f"{result.name}: in sync ({result.config})")
    else:
        lines.extend(f"{result.name}: {d.line()}" for d in result.differences)
    return "\n".join(lines)
