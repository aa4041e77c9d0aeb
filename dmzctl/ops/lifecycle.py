"""Bringing a DMZ up and down through libvirt and nftables, fail closed.

Order in `up`: checks (nothing changed yet) -> hooks -> network -> nwfilters -> nft
table -> the other DMZs' tables -> VMs (each: its pool, volumes and seed, then the domain). VMs start only when the network is active and
the table is in place. Whatever one run created is undone, newest first, when a later
step fails. What to do to each object comes from ops/decide.py, on the state observed
once at the start (state.py): `plan` shows the very same decisions.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Optional

from .. import events, xmlcompare
from ..config import DMZ, VM
from ..desired import DesiredDMZ
from ..errors import DmzctlError, HostError
from ..hooks import files as hook_files
from ..host import images, nft
from ..host.lock import SHARED_FILTERS, dmz_lock, held_down_marker
from ..host.virt import Virt
from ..render.base import to_string
from ..render.nft import apply_batch, delete_batch, table_name
from ..render.nft_backstop import backstop_name
from ..render.nwfilter import LEGACY_FILTER_SUFFIXES, vm_filter_name
from ..settings import Settings
from ..state import Observed, TableState, observe_table
from .common import (Outcome, Say, Undo, inspect_for_up, require_root, selected_vms,
                     table_only)
from .decide import decide_domain, decide_firewall_action, decide_network, decide_nwfilters
from .provision import up_storage
from .refresh import refresh_other_tables


# --- up ----------------------------------------------------------------------------

def up(virt: Virt, dmz: DMZ, settings: Settings, only: Optional[list[str]] = None,
       restart_changed: bool = False, say: Say = print, hooks: bool = True) -> Outcome:
    """hooks: make sure libvirt's hooks refuse this DMZ's VMs without their table, whoever starts them."""
    snap, vm_names = inspect_for_up(virt, dmz, settings, only)
    desired, observed = snap.desired, snap.observed
    outcome = Outcome(dmz.name, say)
    if hooks:
        for line in hook_files.ensure_hooks(settings.hooks_dir):
            outcome.change(line)
    undo = Undo(say)
    try:
        _up_network(virt, desired, observed, outcome, undo)
        with dmz_lock(settings.run_dir, SHARED_FILTERS, say=say):
            # Read again under the lock: another DMZ's down may have removed the shared filter since.
            observed = replace(observed, nwfilters={name: virt.nwfilter_xml(name) for name in desired.nwfilters})
            _up_nwfilters(virt, desired, observed, outcome, undo)
        apply_firewall(desired, observed.table, outcome, undo, settings)
        # Fail closed: re-check the table right before any VM may run.
        if not (nft.table_exists(desired.table) and nft.table_exists(backstop_name(desired.table))):
            raise HostError(f"firewall table {desired.table} or its backstop is missing; no VM is started "
                            f"without them")
        # The other DMZs must block this one's subnets before its VMs run (and vice versa).
        refresh_other_tables(dmz, outcome, settings, virt)
        to_start = [name for name in vm_names
                    if _up_domain(virt, desired, observed, name, restart_changed, outcome, undo, settings)]
        start_vms(virt, dmz, to_start, outcome, undo, settings)
    except BaseException:
        if undo.steps:
            say(f"{dmz.name}: failed; undoing what this run did")
        undo.run()
        raise
    return outcome


def _up_network(virt: Virt, desired: DesiredDMZ, observed: Observed, outcome: Outcome, undo: Undo) -> None:
    name = desired.dmz.name
    decision = decide_network(desired, observed)
    if decision.define == "new":
        virt.define_network(decision.want_xml)
        outcome.change(f"network {name} defined (bridge {desired.dmz.bridge})")
        undo.add(f"network {name}", lambda: virt.remove_network(name))
    elif decision.define == "update":
        virt.define_network(decision.want_xml)
        outcome.change(f"network {name} definition updated")
        hosts = xmlcompare.dhcp_host_change(observed.network.live, decision.want_xml) if decision.pending else None
        if hosts is not None:
            # Only static DHCP leases differ (a VM added or removed): applied to the running network.
            virt.update_dhcp_hosts(name, *hosts)
            outcome.change(f"network {name}: static DHCP leases updated live")
        elif decision.pending:
            outcome.pending.append(f"network {name}: the new definition applies when the network restarts "
                                   f"(dmzctl down, then up)")
    if decision.start:
        virt.start_network(name)
        outcome.change(f"network {name} started")
        if decision.define != "new":
            undo.add(f"network {name} start", lambda: virt.stop_network(name))
    elif decision.autostart:
        virt.start_network(name)
        outcome.change(f"network {name} marked autostart")


def _up_nwfilters(virt: Virt, desired: DesiredDMZ, observed: Observed, outcome: Outcome, undo: Undo) -> None:
    for decision in decide_nwfilters(desired, observed):
        name = decision.name
        virt.define_nwfilter(to_string(decision.element))
        outcome.change(f"nwfilter {name} {'updated' if decision.live_xml else 'defined'}")
        if decision.live_xml is None:
            undo.add(f"nwfilter {name}", lambda name=name: virt.undefine_nwfilter(name))
    # An earlier design's filters (the per-VM block and guards), unreferenced once the VM's
    # filter is redefined above: the backstop table does their work now.
    legacy = {f"{vm_filter_name(desired.dmz, vm)}{suffix}" for vm in desired.dmz.vms for suffix in LEGACY_FILTER_SUFFIXES}
    for name in sorted(legacy & set(virt.nwfilter_names())):
        virt.undefine_nwfilter(name)
        outcome.change(f"nwfilter {name} removed (an earlier design's; the backstop table replaces it)")


def apply_firewall(desired: DesiredDMZ, table: TableState, outcome: Outcome, undo: Optional[Undo],
                   settings: Settings) -> None:
    held_down_marker(settings.run_dir, desired.dmz.name).unlink(missing_ok=True)
    action = decide_firewall_action(Observed(None, {}, table, {}))
    if action is None:
        return
    nft.apply(apply_batch(desired.dmz, desired.blocks))
    if not (nft.table_exists(desired.table) and nft.table_exists(backstop_name(desired.table))):
        raise HostError(f"nftables accepted table {desired.table} and its backstop but one is not there; "
                        f"refusing to go on")
    done = "updated" if table.exists else "applied"
    outcome.change(f"firewall table inet {desired.table} {done}")
    events.record(settings.event_log, f"dmz={desired.dmz.name} firewall table {desired.table} {done}")
    if undo is not None and not table.exists:
        undo.add(f"firewall table {desired.table}", lambda: nft.apply(delete_batch(desired.table)))


def _up_domain(virt: Virt, desired: DesiredDMZ, observed: Observed, name: str, restart_changed: bool,
               outcome: Outcome, undo: Undo, settings: Settings) -> bool:
    """Storage, definition, restart, autostart of one VM; True when it is to be started."""
    dmz, vm = desired.dmz, desired.dmz.vm(name)
    # Volumes and the seed first: a domain is never defined over a disk that is not there.
    up_storage(virt, desired, observed, name, outcome, undo, settings)
    decision = decide_domain(desired, observed, name, restart_changed)
    if decision.define is not None:
        virt.define_domain(decision.want_xml)
        outcome.change(f"VM {name} {'defined' if decision.define == 'new' else 'definition updated'}")
        if decision.define == "new":
            undo.add(f"VM {name} definition", lambda: virt.undefine_domain(name))
    if decision.restart:
        outcome.say and outcome.say(f"{dmz.name}: restarting {name} for its new definition")
        for line in stop_domains(virt, dmz, [name], settings, say=outcome.say or print):
            outcome.change(line)
    elif decision.outdated:
        outcome.pending.append(f"VM {name}: the new definition applies at its next start "
                               f"(dmzctl up --restart-changed)")
    if virt.domain_info(name).autostart != vm.autostart:
        virt.set_autostart(name, vm.autostart)
        outcome.change(f"VM {name} autostart {'on' if vm.autostart else 'off'}")
    return not virt.is_running(name)


def start_vms(virt: Virt, dmz: DMZ, names: list[str], outcome: Outcome, undo: Undo, settings: Settings) -> None:
    """Start them all at once (libvirt creates domains in parallel): `up` of N VMs takes about as long
    as one. The table is in place before this is called. Every VM that started is undone on any failure."""
    say = outcome.say or print
    for name in names:
        say(f"{dmz.name}: starting {name}")

    def start(name: str) -> float:
        began = time.monotonic()
        start_vm(virt, dmz.vm(name), dmz)
        return time.monotonic() - began

    with ThreadPoolExecutor(max_workers=max(1, min(len(names), 8)), thread_name_prefix="start") as pool:
        futures = {name: pool.submit(start, name) for name in names}
    failures = []
    for name, future in futures.items():
        error = future.exception()
        if error is not None:
            failures.append(error)
            continue
        outcome.change(f"VM {name} started ({future.result():.1f} s)")
        events.record(settings.event_log, f"dmz={dmz.name} vm={name} started")
        undo.add(f"VM {name} start", lambda name=name: virt.destroy_domain(name))
    if failures:
        raise failures[0]


def start_vm(virt: Virt, vm: VM, dmz: DMZ) -> None:
    """Start the domain; a start libvirt refuses because of a [vm.limits] setting names the setting."""
    try:
        virt.start_domain(vm.name)
    except HostError as error:
        hint = limits_start_hint(str(error), vm)
        if hint is None:
            raise
        raise HostError(f"{error}; {hint}") from None


def limits_start_hint(message: str, vm: VM) -> Optional[str]:
    """Which [vm.limits] setting a failed start comes from, when libvirt's message tells, and what to do."""
    where = f"vm[{vm.name}].limits"
    limits = vm.limits
    if limits.memory_max_mib is not None and "cannot limit locked memory" in message:
        # libvirt 9.0 raises RLIMIT_MEMLOCK to the hard limit, which needs CAP_SYS_RESOURCE.
        return (f"{where}.memory_max: libvirt sets QEMU's locked-memory limit to it and libvirtd lacks "
                f"CAP_SYS_RESOURCE to do so (a container?); remove memory_max or give libvirtd that capability")
    if (limits.net_to_vm_bytes_per_sec or limits.net_from_vm_bytes_per_sec) and "(tc " in message:
        return (f"{where}.net_to_vm/net_from_vm: the kernel lacks traffic control libvirt shapes with "
                f"(sch_htb, sch_sfq, cls_u32, act_police); load those modules or remove the net limits")
    if "cgroup" in message.lower() and (limits.cpu_per_vcpu is not None or limits.memory_max_mib is not None):
        return (f"{where}: cpu_per_vcpu and memory_max need libvirt's cgroup cpu and memory controllers; "
                f"mount them or remove those limits")
    return None


# --- down ----------------------------------------------------------------------------

def stop_domains(virt: Virt, dmz: DMZ, names: list[str], settings: Settings, timeout: Optional[float] = None,
                 say: Say = print) -> list[str]:
    """ACPI shutdown for all at once, wait (event-driven) up to each VM's timeout, destroy the rest.

    Returns what happened to each VM, one line each. Raises when libvirt cannot confirm one is off.
    """
    running = [name for name in names if not virt.is_off(name)]
    if not running:
        return []
    began = time.monotonic()
    deadlines = {}
    for name in running:
        limit = timeout if timeout is not None else _vm_timeout(dmz, name)
        deadlines[name] = began + limit
        virt.shutdown_domain(name)
        say(f"{dmz.name}: asked {name} to power off (ACPI), waiting up to {limit:.0f} s")
        events.record(settings.event_log, f"dmz={dmz.name} vm={name} ACPI shutdown requested")
    tick = _waiting_reporter(virt, running, began, say)
    report = []
    for name in running:
        remaining = deadlines[name] - time.monotonic()
        if virt.wait_for(lambda: virt.is_off(name), max(remaining, 0), tick=tick):
            report.append(f"VM {name} powered off ({time.monotonic() - began:.1f} s)")
            events.record(settings.event_log, f"dmz={dmz.name} vm={name} powered off")
            continue
        destroy_confirmed(virt, name)
        report.append(f"VM {name} did not power off within its timeout: destroyed")
        events.record(settings.event_log, f"dmz={dmz.name} vm={name} destroyed after shutdown timeout")
    return report


def destroy_confirmed(virt: Virt, name: str) -> None:
    """Destroy, and return only once libvirt confirms the VM is off: a DMZ's firewall goes only then."""
    virt.destroy_domain(name)
    if not virt.wait_for(lambda: virt.is_off(name), 30):
        raise HostError(f"VM {name} is still not off 30 s after destroy; its DMZ's firewall stays")


def _waiting_reporter(virt: Virt, names: list[str], began: float, say: Say) -> Callable[[float], None]:
    last = [0.0]

    def tick(_remaining: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 5:
            waiting = [n for n in names if not virt.is_off(n)]
            if waiting and now - began >= 1:
                say(f"  still waiting for {', '.join(waiting)} ({now - began:.0f} s)")
            last[0] = now
    return tick


def _vm_timeout(dmz: DMZ, name: str) -> float:
    try:
        return dmz.vm(name).shutdown_timeout
    except KeyError:
        return 20.0


def owned_domains(virt: Virt, dmz: DMZ) -> list[str]:
    """Everything of this DMZ on the host, VMs since removed from the config included."""
    configured = [vm.name for vm in dmz.vms if (info := virt.domain_info(vm.name)) and info.owner == dmz.name]
    return sorted(set(virt.domains_of(dmz.name)) | set(configured))


def down(virt: Virt, dmz: DMZ, settings: Settings, only: Optional[list[str]] = None,
         timeout: Optional[float] = None, keep_network: bool = False, say: Say = print) -> Outcome:
    """Halt, as the original's `stop`: the VMs off (ACPI, then destroy), the network stopped, the table
    removed. Every definition stays (virt-manager lists the VMs as "Shut off"); `destroy` removes them.
    With the hooks in place nobody starts them again without their table."""
    require_root()
    outcome = Outcome(dmz.name, say)
    owned = owned_domains(virt, dmz)
    names = [n for n in (selected_vms(dmz, only) if only else owned) if n in owned]
    for line in stop_domains(virt, dmz, names, settings, timeout, say):
        outcome.change(line)
    if only or keep_network:
        return outcome
    network = virt.network_info(dmz.name)
    if network is not None and network.owner == dmz.name and network.active:
        virt.stop_network(dmz.name)
        outcome.change(f"network {dmz.name} stopped (still defined)")
    remove_table(dmz, outcome, settings, virt)
    return outcome


def remove_table(dmz: DMZ, outcome: Outcome, settings: Settings, virt: Virt) -> None:
    """The DMZ's table goes (its VMs are off), then the other DMZs' tables follow the host's networks."""
    table = table_name(dmz)
    if nft.firewall_exists(table):
        nft.apply(delete_batch(table))
        outcome.change(f"firewall table inet {table} removed (and its backstop)")
        events.record(settings.event_log, f"dmz={dmz.name} firewall table {table} removed")
    refresh_other_tables(dmz, outcome, settings, virt)


def kill(virt: Virt, dmz: DMZ, settings: Settings, only: Optional[list[str]] = None, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    for name in selected_vms(dmz, only) if only else virt.domains_of(dmz.name):
        if virt.is_off(name) or virt.live_domain_owner(name) != dmz.name:
            continue
        destroy_confirmed(virt, name)
        outcome.change(f"VM {name} destroyed")
        events.record(settings.event_log, f"dmz={dmz.name} vm={name} killed (destroyed)")
    return outcome


def restart(virt: Virt, dmz: DMZ, settings: Settings, only: Optional[list[str]] = None,
            timeout: Optional[float] = None, say: Say = print) -> tuple[Outcome, Outcome]:
    # Refuse before stopping anything: a disk `up` would refuse must not leave the VM down.
    images.check_disks(dmz, selected_vms(dmz, only))
    stopped = down(virt, dmz, settings, only, timeout, keep_network=True, say=say)
    return stopped, up(virt, dmz, settings, only, say=say)


# --- the firewall alone ----------------------------------------------------------------

def firewall_up(dmz: DMZ, settings: Settings, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    desired = table_only(dmz)
    apply_firewall(desired, observe_table(desired), outcome, None, settings)
    return outcome


def firewall_down(virt: Virt, dmz: DMZ, settings: Settings, force: bool = False, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    running = [n for n in virt.domains_of(dmz.name) if virt.domain_info(n).running]
    if running and not force:
        one = len(running) == 1
        which = f"VM {running[0]} is" if one else f"VMs {', '.join(running)} are"
        raise DmzctlError(f"DMZ {dmz.name}: {which} running; removing the firewall would leave "
                          f"{'it' if one else 'them'} unprotected. Stop {'it' if one else 'them'} first, "
                          f"or use --force")
    table = table_name(dmz)
    marker = held_down_marker(settings.run_dir, dmz.name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if nft.firewall_exists(table):
        nft.apply(delete_batch(table))
        outcome.change(f"firewall table inet {table} removed (and its backstop)")
        events.record(settings.event_log, f"dmz={dmz.name} firewall table {table} removed by 'firewall down'")
        say(f"WARNING: DMZ {dmz.name} is no longer protected by its nftables tables "
            f"(only the per-VM nwfilters' anti-spoofing remains)")
    return outcome


