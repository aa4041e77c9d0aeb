"""Bringing a DMZ up and down through libvirt and nftables, fail closed.

Order in `up`: checks (nothing changed yet) -> network -> nwfilters -> nft table
-> VMs. VMs start only when the network is active and the table is in place.
Whatever one run created is undone, newest first, when a later step fails.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import events, install
from .config import DMZ, VM
from .desired import DesiredDMZ, build
from .errors import DmzctlError, HostError, LockedError
from .host import facts, images, nft
from .host.virt import Virt, check_owned, domains_of, owner_of
from .plan import decide_domain, decide_firewall, decide_network, decide_nwfilters, same_filter
from .render.base import to_string
from .render.domain import HostFacts
from .render.nft import apply_batch, delete_batch

LOCK_DIR = Path(os.environ.get("DMZCTL_RUN_DIR", "/run/dmzctl"))
# Taken around defining and removing the nwfilter all DMZs share (a DMZ name never starts with '.').
SHARED_FILTERS_LOCK = ".shared-nwfilters"
Say = Callable[[str], None]


@dataclass
class Outcome:
    """What one command did to one DMZ, for the CLI to print."""

    dmz: str
    say: Optional[Say] = None  # told of each change as it happens
    changes: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def change(self, what: str) -> None:
        self.changes.append(what)
        if self.say is not None:
            self.say(f"{self.dmz}: {what}")

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@contextmanager
def dmz_lock(name: str, timeout: float = 120.0, say: Optional[Say] = None) -> Iterator[None]:
    """One dmzctl run per DMZ at a time (flock, released when the process ends)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCK_DIR / f"{name}.lock", "w") as handle:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(f"DMZ {name}: another dmzctl run still holds {LOCK_DIR}/{name}.lock "
                                      f"after {timeout:.0f} s") from None
                if say and not told:
                    say(f"{name}: waiting for another dmzctl run on this DMZ")
                    told = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError("must run as root: nftables and libvirt's system instance need it")


def host_facts(virt: Virt, dmz: DMZ) -> HostFacts:
    """What rendering needs from the host; never anything read from a disk image (see images.py)."""
    override = os.environ.get("DMZCTL_VIRT_TYPE") or None
    if override not in (None, "kvm", "qemu"):
        raise HostError(f"DMZCTL_VIRT_TYPE must be kvm or qemu; got {override!r}")
    return HostFacts(kvm_usable=virt.kvm_usable(), virt_type_override=override)


def desired_state(virt: Virt, dmz: DMZ) -> DesiredDMZ:
    """The DMZ as `up` would make it on this host now: with the host's facts and networks."""
    return build(dmz, host_facts(virt, dmz), facts.host_view())


def preflight(virt: Virt, desired: DesiredDMZ, vm_names: list[str]) -> None:
    """Every check `up` needs, before it changes anything."""
    dmz = desired.dmz
    require_root()
    nft._binding()
    net = virt.network(dmz.name)
    if net is not None:
        check_owned("network", dmz.name, owner_of(virt.network_xml(net)), dmz.name)
    other = virt.network_of_bridge(dmz.bridge)
    if other is not None and other != dmz.name:
        raise HostError(f"bridge {dmz.bridge} belongs to libvirt network {other!r}; set dmz.bridge to a free name")
    if other is None and Path(f"/sys/class/net/{dmz.bridge}").exists():
        raise HostError(f"interface {dmz.bridge} already exists and is not a dmzctl network's bridge; "
                        f"set dmz.bridge to a free name")
    for vm in dmz.vms:
        info = virt.domain_info(vm.name)
        if info is not None:
            check_owned("domain", vm.name, info.owner, dmz.name)
    missing = []
    for vm in dmz.vms:
        if vm.name not in vm_names:
            continue
        layers = [("disk", image.path) for disk in vm.disks for image in disk.chain]
        for label, path in layers + [("cdrom", vm.cdrom), ("kernel", vm.kernel), ("initrd", vm.initrd)]:
            if path is not None and not path.exists():
                missing.append(f"vm[{vm.name}].{label} {path}")
    if missing:
        raise HostError("missing file(s): " + "; ".join(missing))
    images.check_disks(dmz, vm_names)


BRIDGE_NETFILTER = {4: Path("/proc/sys/net/bridge/bridge-nf-call-iptables"),
                    6: Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables")}


def bridge_netfilter_warnings(dmz: DMZ) -> list[str]:
    """The nwfilter block of protected subnets is iptables-layer: it needs br_netfilter."""
    families = [4] + ([6] if dmz.gateway6 is not None else [])
    off = []
    for family in families:
        try:
            enabled = BRIDGE_NETFILTER[family].read_text().strip() == "1"
        except OSError:
            enabled = False
        if not enabled:
            off.append(BRIDGE_NETFILTER[family].name)
    if not off:
        return []
    return [f"{' and '.join(off)} is off (br_netfilter): the per-VM nwfilter block of the protected subnets "
            f"cannot see bridged traffic, only the nftables table protects them; enable it with "
            f"'modprobe br_netfilter' and 'sysctl net.bridge.{off[0]}=1'"]


def selected_vms(dmz: DMZ, only: Optional[list[str]]) -> list[str]:
    names = [vm.name for vm in dmz.vms]
    if not only:
        return names
    unknown = [name for name in only if name not in names]
    if unknown:
        raise DmzctlError(f"DMZ {dmz.name} has no VM named {', '.join(unknown)}; "
                          f"its VMs: {', '.join(names) or 'none'}")
    return list(only)


class Undo:
    """Steps to reverse what this run created, run newest first on failure."""

    def __init__(self, say: Say):
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.say = say

    def add(self, what: str, step: Callable[[], None]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        for what, step in reversed(self.steps):
            try:
                step()
                self.say(f"  undone: {what}")
            except Exception as error:  # keep undoing the rest; say what could not be undone
                self.say(f"  could not undo {what}: {error}")


def firewall_in_sync(desired: DesiredDMZ) -> bool:
    return decide_firewall(desired).in_sync


def held_down_marker(name: str) -> Path:
    """Present while an admin's `firewall down` keeps the table away: `dmzctl guard` leaves it so."""
    return LOCK_DIR / f"{name}.firewall-down"


def apply_firewall(desired: DesiredDMZ, outcome: Outcome, undo: Optional[Undo]) -> None:
    held_down_marker(desired.dmz.name).unlink(missing_ok=True)
    existed = nft.table_exists(desired.table)
    if existed and firewall_in_sync(desired):
        return
    nft.apply(apply_batch(desired.dmz, desired.blocks))
    if not nft.table_exists(desired.table):
        raise HostError(f"nftables accepted table {desired.table} but it is not there; refusing to go on")
    outcome.change(f"firewall table inet {desired.table} {'updated' if existed else 'applied'}")
    events.record(f"dmz={desired.dmz.name} firewall table {desired.table} {'updated' if existed else 'applied'}")
    if undo is not None and not existed:
        undo.add(f"firewall table {desired.table}", lambda: nft.apply(delete_batch(desired.table)))


def up(virt: Virt, dmz: DMZ, only: Optional[list[str]] = None, restart_changed: bool = False,
       say: Say = print, hooks: bool = True) -> Outcome:
    """hooks: make sure libvirt's hooks refuse this DMZ's VMs without their table, whoever starts them."""
    vm_names = selected_vms(dmz, only)
    desired = desired_state(virt, dmz)
    preflight(virt, desired, vm_names)
    outcome = Outcome(dmz.name, say)
    for warning in bridge_netfilter_warnings(dmz):
        say(f"{dmz.name}: WARNING: {warning}")
    if hooks:
        for line in install.ensure_hooks():
            outcome.change(line)
    undo = Undo(say)
    try:
        _up_network(virt, desired, outcome, undo)
        with dmz_lock(SHARED_FILTERS_LOCK, say=say):
            _up_nwfilters(virt, desired, outcome, undo)
        apply_firewall(desired, outcome, undo)
        # Fail closed: re-check both layers right before any VM may run.
        if not nft.table_exists(desired.table):
            raise HostError(f"firewall table {desired.table} is missing; no VM is started without it")
        # The other DMZs must block this one's subnets before its VMs run (and vice versa).
        refresh_other_tables(dmz, outcome)
        for name in vm_names:
            _up_domain(virt, desired, name, restart_changed, outcome, undo, say)
    except BaseException:
        if undo.steps:
            say(f"{dmz.name}: failed; undoing what this run did")
        undo.run()
        raise
    return outcome


def refresh_other_tables(dmz: DMZ, outcome: Outcome) -> None:
    """Re-apply every other live DMZ table that the host's networks have made stale.

    Their configs are found through their networks' metadata. A DMZ held by another
    dmzctl run is left to it (it renders with the view it reads), as is one whose
    table an admin took down on purpose.
    """
    from .config import load_dmz
    from .implicit import blocks_for
    from .render.nft import table_name

    view = facts.host_view()
    others = {network.dmz: network.config for network in view.networks
              if network.dmz and network.dmz != dmz.name and network.config}
    for name, config in sorted(others.items()):
        try:
            other = load_dmz(Path(config))
        except DmzctlError as error:
            outcome.pending.append(f"DMZ {name}: its table could not be refreshed: {str(error).splitlines()[0]}")
            continue
        if other.name != name or held_down_marker(name).exists() or not nft.table_exists(table_name(other)):
            continue
        batch = apply_batch(other, blocks_for(other, view))
        try:
            with dmz_lock(name, timeout=0):
                if nft.canonical(nft.list_table(table_name(other))) == nft.kernel_form(batch, table_name(other)):
                    continue
                nft.apply(batch)
        except LockedError:
            continue
        outcome.change(f"firewall table inet {table_name(other)} of DMZ {name} refreshed (the host's networks "
                       f"changed)")
        events.record(f"dmz={name} firewall table {table_name(other)} refreshed by dmzctl up of {dmz.name}")


def _up_network(virt: Virt, desired: DesiredDMZ, outcome: Outcome, undo: Undo) -> None:
    dmz = desired.dmz
    decision = decide_network(virt, desired)  # the decision `dmzctl plan` shows
    net = decision.net
    if decision.define == "new":
        net = virt.define_network(decision.want_xml)
        outcome.change(f"network {dmz.name} defined (bridge {dmz.bridge})")
        undo.add(f"network {dmz.name}", lambda: virt.remove_network(net))
    elif decision.define == "update":
        virt.define_network(decision.want_xml)
        outcome.change(f"network {dmz.name} definition updated")
        if decision.pending:
            outcome.pending.append(f"network {dmz.name}: the new definition applies when the network restarts "
                                   f"(dmzctl down, then up)")
    if decision.start:
        was_defined_here = bool(undo.steps)
        virt.start_network(net)
        outcome.change(f"network {dmz.name} started")
        if not was_defined_here:
            undo.add(f"network {dmz.name} start", lambda: virt.stop_network(net))
    elif decision.autostart:
        virt.start_network(net)


def _up_nwfilters(virt: Virt, desired: DesiredDMZ, outcome: Outcome, undo: Undo) -> None:
    for decision in decide_nwfilters(virt, desired):
        name = decision.name
        virt.define_nwfilter(to_string(decision.element))
        outcome.change(f"nwfilter {name} {'updated' if decision.live_xml else 'defined'}")
        if decision.live_xml is None:
            undo.add(f"nwfilter {name}", lambda name=name: virt.undefine_nwfilter(name))


_same_filter = same_filter  # the comparison lives with the other decisions (plan.py)


def _up_domain(virt: Virt, desired: DesiredDMZ, name: str, restart_changed: bool, outcome: Outcome,
               undo: Undo, say: Say) -> None:
    dmz = desired.dmz
    vm = dmz.vm(name)
    decision = decide_domain(virt, desired, name, restart_changed)  # the decision `dmzctl plan` shows
    xml = decision.want_xml
    if decision.define == "new":
        dom = virt.define_domain(xml)
        outcome.change(f"VM {name} defined")
        undo.add(f"VM {name} definition", lambda: virt.undefine_domain(dom))
    else:
        dom = virt.domain(name)
        if decision.define == "update":
            virt.define_domain(xml)
            outcome.change(f"VM {name} definition updated")
        if decision.restart:
            say(f"{dmz.name}: restarting {name} for its new definition")
            for line in stop_domains(virt, dmz, [name], say=say):
                outcome.change(line)
        elif decision.outdated:
            outcome.pending.append(f"VM {name}: the new definition applies at its next start "
                                   f"(dmzctl up --restart-changed)")
    if virt.domain_autostart(dom) != vm.autostart:
        virt.set_autostart(dom, vm.autostart)
    if not virt.is_running(dom):
        say(f"{dmz.name}: starting {name}")
        began = time.monotonic()
        try:
            virt.start_domain(dom)
        except HostError as error:
            hint = limits_start_hint(str(error), vm)
            if hint is None:
                raise
            raise HostError(f"{error}; {hint}") from None
        outcome.change(f"VM {name} started ({time.monotonic() - began:.1f} s)")
        events.record(f"dmz={dmz.name} vm={name} started")
        undo.add(f"VM {name} start", lambda: virt.destroy_domain(dom))


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


def stop_domains(virt: Virt, dmz: DMZ, names: list[str], timeout: Optional[float] = None,
                 say: Say = print) -> list[str]:
    """ACPI shutdown for all at once, wait (event-driven) up to each VM's timeout, destroy the rest.

    Returns what happened to each VM, one line each.
    """
    report = []
    running = {}
    for name in names:
        dom = virt.domain(name)
        if dom is not None and not virt.is_off(dom):
            running[name] = dom
    if not running:
        return report
    began = time.monotonic()
    deadlines = {}
    for name, dom in running.items():
        limit = timeout if timeout is not None else _vm_timeout(dmz, name)
        deadlines[name] = began + limit
        virt.shutdown_domain(dom)
        say(f"{dmz.name}: asked {name} to power off (ACPI), waiting up to {limit:.0f} s")
        events.record(f"dmz={dmz.name} vm={name} ACPI shutdown requested")
    last_tick = [0.0]

    def tick(_remaining):
        now = time.monotonic()
        if now - last_tick[0] >= 5:
            waiting = [n for n, d in running.items() if not virt.is_off(d)]
            if waiting and now - began >= 1:
                say(f"  still waiting for {', '.join(waiting)} ({now - began:.0f} s)")
            last_tick[0] = now

    for name, dom in running.items():
        remaining = deadlines[name] - time.monotonic()
        if virt.wait_for(lambda: virt.is_off(dom), max(remaining, 0), tick=tick):
            report.append(f"VM {name} powered off ({time.monotonic() - began:.1f} s)")
            events.record(f"dmz={dmz.name} vm={name} powered off")
        else:
            virt.destroy_domain(dom)
            if not virt.wait_for(lambda: virt.is_off(dom), 30):
                # The firewall goes only once libvirt has confirmed every VM is off.
                raise HostError(f"VM {name} is still not off 30 s after destroy; its DMZ's firewall stays")
            report.append(f"VM {name} did not power off within its timeout: destroyed")
            events.record(f"dmz={dmz.name} vm={name} destroyed after shutdown timeout")
    return report


def _vm_timeout(dmz: DMZ, name: str) -> float:
    try:
        return dmz.vm(name).shutdown_timeout
    except KeyError:
        return 20.0


def down(virt: Virt, dmz: DMZ, only: Optional[list[str]] = None, timeout: Optional[float] = None,
         keep_network: bool = False, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    # Everything this DMZ owns on the host, also VMs since removed from the config.
    owned = sorted(set(domains_of(virt, dmz.name)) | {vm.name for vm in dmz.vms if _owned_domain(virt, vm.name, dmz)})
    names = selected_vms(dmz, only) if only else owned
    names = [n for n in names if n in owned]
    for line in stop_domains(virt, dmz, names, timeout, say):
        outcome.change(line)
    if only or keep_network:
        return outcome
    for name in names:
        dom = virt.domain(name)
        if dom is not None:
            virt.undefine_domain(dom)
            outcome.change(f"VM {name} undefined")
    _remove_nwfilters(virt, dmz, outcome)
    net = virt.network(dmz.name)
    if net is not None and owner_of(virt.network_xml(net)) == dmz.name:
        virt.remove_network(net)
        outcome.change(f"network {dmz.name} removed")
    table = f"dmzctl-{dmz.name}"
    if nft.table_exists(table):
        nft.apply(delete_batch(table))
        outcome.change(f"firewall table inet {table} removed")
        events.record(f"dmz={dmz.name} firewall table {table} removed")
    refresh_other_tables(dmz, outcome)
    return outcome


def _owned_domain(virt: Virt, name: str, dmz: DMZ) -> bool:
    info = virt.domain_info(name)
    return info is not None and info.owner == dmz.name


def _remove_nwfilters(virt: Virt, dmz: DMZ, outcome: Outcome) -> None:
    prefix = f"dmzctl-{dmz.name}-"
    # Referencing filters first: libvirt refuses to remove a filter still referenced.
    names = [n for n in virt.nwfilter_names() if n.startswith(prefix)]
    for name in sorted(names, key=lambda n: (n.count("-guard") + n.count("-spoof"), n)):
        virt.undefine_nwfilter(name)
        outcome.change(f"nwfilter {name} removed")
    # The shared clean-traffic filter goes with the last DMZ that uses it; the lock
    # keeps another DMZ's `up` from referencing it while it goes.
    with dmz_lock(SHARED_FILTERS_LOCK):
        if not any(n.startswith("dmzctl-") and n != "dmzctl-clean-traffic" for n in virt.nwfilter_names()):
            if virt.nwfilter_exists("dmzctl-clean-traffic"):
                virt.undefine_nwfilter("dmzctl-clean-traffic")
                outcome.change("nwfilter dmzctl-clean-traffic removed")


def kill(virt: Virt, dmz: DMZ, only: Optional[list[str]] = None, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    names = selected_vms(dmz, only) if only else domains_of(virt, dmz.name)
    for name in names:
        dom = virt.domain(name)
        if dom is None or virt.is_off(dom):
            continue
        if owner_of(virt.domain_xml(dom, inactive=False)) != dmz.name:
            continue
        virt.destroy_domain(dom)
        if not virt.wait_for(lambda: virt.is_off(dom), 30):
            raise HostError(f"VM {name} is still not off 30 s after destroy")
        outcome.change(f"VM {name} destroyed")
        events.record(f"dmz={dmz.name} vm={name} killed (destroyed)")
    return outcome


def firewall_up(dmz: DMZ, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    desired_table = build_table_only(dmz)
    apply_firewall(desired_table, outcome, None)
    return outcome


def build_table_only(dmz: DMZ) -> DesiredDMZ:
    """The table alone, with the host's networks as they are now."""
    from .implicit import blocks_for
    from .render.nft import render_table, table_name

    view = facts.host_view()
    blocks = blocks_for(dmz, view)
    return DesiredDMZ(dmz=dmz, network=None, nwfilters={}, table=table_name(dmz), nft=render_table(dmz, blocks),
                      domains={}, blocks=blocks, view=view)


def firewall_down(virt: Virt, dmz: DMZ, force: bool = False, say: Say = print) -> Outcome:
    require_root()
    outcome = Outcome(dmz.name, say)
    running = [n for n in domains_of(virt, dmz.name) if virt.domain_info(n).running]
    if running and not force:
        which = f"VM {running[0]} is" if len(running) == 1 else f"VMs {', '.join(running)} are"
        raise DmzctlError(f"DMZ {dmz.name}: {which} running; removing the firewall would "
                          f"leave {'it' if len(running) == 1 else 'them'} unprotected. Stop "
                          f"{'it' if len(running) == 1 else 'them'} first, or use --force")
    table = f"dmzctl-{dmz.name}"
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    held_down_marker(dmz.name).touch()
    if nft.table_exists(table):
        nft.apply(delete_batch(table))
        outcome.change(f"firewall table inet {table} removed")
        events.record(f"dmz={dmz.name} firewall table {table} removed by 'firewall down'")
        say(f"WARNING: DMZ {dmz.name} is no longer protected by its nftables table "
            f"(only the per-VM nwfilters remain)")
    return outcome
