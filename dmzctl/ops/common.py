"""What the lifecycle commands share: the outcome they report, the undo they keep, and every
check and view of the host `up` and `plan` make before anything changes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..config import DEFAULT_POOL, DMZ, VM
from ..desired import DesiredDMZ, build
from ..errors import DmzctlError, HostError
from ..host import facts, images, nft
from ..host.objects import check_owned
from ..host.virt import Virt
from ..implicit import blocks_for
from ..render.domain import HostFacts
from ..render.nft import render_table, table_name
from ..render.storage import DEFAULT_POOL_DIR
from ..settings import Settings
from ..state import Observed, Snapshot, snapshot

Say = Callable[[str], None]


@dataclass
class Outcome:
    """What one command did to one DMZ, for the CLI to print.

    `refreshed` are the other DMZs' tables the run re-applied because the host's networks had
    changed: changes to the host, not to this DMZ (`changed` is about this DMZ alone, so that
    a tool running `up` for each DMZ in turn sees each one's own answer)."""

    dmz: str
    say: Optional[Say] = None  # told of each change as it happens
    changes: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)

    def change(self, what: str) -> None:
        self.changes.append(what)
        if self.say is not None:
            self.say(f"{self.dmz}: {what}")

    def refresh(self, what: str) -> None:
        self.refreshed.append(what)
        if self.say is not None:
            self.say(f"{self.dmz}: {what}")

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict:
        return {"dmz": self.dmz, "changed": self.changed, "changes": self.changes, "pending": self.pending,
                "refreshed": self.refreshed}


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


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError("must run as root: nftables and libvirt's system instance need it")


def host_facts(virt: Virt, settings: Settings, dmz: Optional[DMZ] = None) -> HostFacts:
    """What rendering needs from the host; never anything read from a disk image (see images.py)."""
    pools = pool_paths(virt, dmz) if dmz is not None else ()
    return HostFacts(kvm_usable=virt.kvm_usable(), virt_type_override=settings.virt_type, pool_paths=pools)


def desired_state(virt: Virt, dmz: DMZ, settings: Settings) -> DesiredDMZ:
    """The DMZ as `up` would make it on this host now: with the host's facts and networks."""
    return build(dmz, host_facts(virt, settings, dmz), facts.host_view())


def pool_paths(virt: Virt, dmz: DMZ) -> tuple[tuple[str, str], ...]:
    """(pool, directory) of the pools the DMZ's VMs name, as the host has them."""
    found = []
    for pool in sorted({vm.pool for vm in dmz.vms if vm.provisioned}):
        info = virt.pool_info(pool)
        if info is not None and info.path:
            found.append((pool, info.path))
    return tuple(found)


def check_pools(dmz: DMZ, observed: Observed, vm_names: list[str]) -> None:
    """Before anything changes: every pool a VM names exists, or is dmzctl's own (made by up)."""
    for vm in dmz.vms:
        if vm.name not in vm_names or not vm.provisioned:
            continue
        if observed.pools.get(vm.pool) is None and vm.pool != DEFAULT_POOL:
            raise HostError(f"VM {vm.name}: storage pool {vm.pool!r} does not exist; define it (virsh "
                            f"pool-define-as {vm.pool} dir --target DIR, pool-build, pool-start) or leave "
                            f"vm.pool unset to use dmzctl's own pool at {DEFAULT_POOL_DIR}")


def table_only(dmz: DMZ) -> DesiredDMZ:
    """The table alone, with the host's networks as they are now."""
    view = facts.host_view()
    blocks = blocks_for(dmz, view)
    return DesiredDMZ(dmz=dmz, network=None, nwfilters={}, table=table_name(dmz), nft=render_table(dmz, blocks),
                      domains={}, blocks=blocks, view=view)


def selected_vms(dmz: DMZ, only: Optional[list[str]]) -> list[str]:
    names = [vm.name for vm in dmz.vms]
    if not only:
        return names
    unknown = [name for name in only if name not in names]
    if unknown:
        raise DmzctlError(f"DMZ {dmz.name} has no VM named {', '.join(unknown)}; "
                          f"its VMs: {', '.join(names) or 'none'}")
    return list(only)


def preflight(virt: Virt, snap: Snapshot, vm_names: list[str]) -> None:
    """Every check `up` needs, before it changes anything."""
    dmz, observed = snap.desired.dmz, snap.observed
    require_root()
    nft.binding_available()
    if observed.network is not None:
        check_owned("network", dmz.name, observed.network.owner, dmz.name)
    other = virt.network_of_bridge(dmz.bridge)
    if other is not None and other != dmz.name:
        raise HostError(f"bridge {dmz.bridge} belongs to libvirt network {other!r}; set dmz.bridge to a free name")
    if other is None and Path(f"/sys/class/net/{dmz.bridge}").exists():
        raise HostError(f"interface {dmz.bridge} already exists and is not a dmzctl network's bridge; "
                        f"set dmz.bridge to a free name")
    for name, info in observed.domains.items():
        if info is not None:
            check_owned("domain", name, info.owner, dmz.name)
    missing = [f"vm[{vm.name}].{label} {path}" for vm in dmz.vms if vm.name in vm_names
               for label, path in _files_of(vm) if path is not None and not path.exists()]
    if missing:
        raise HostError("missing file(s): " + "; ".join(missing))
    images.check_disks(dmz, vm_names)
    check_pools(dmz, observed, vm_names)


def _files_of(vm: VM) -> list[tuple[str, Optional[Path]]]:
    layers = [("disk", image.path) for disk in vm.disks for image in disk.chain]
    layers += [("image", vm.image.path)] if vm.image is not None else []
    return layers + [("cdrom", vm.cdrom), ("kernel", vm.kernel), ("initrd", vm.initrd)]


def inspect_for_up(virt: Virt, dmz: DMZ, settings: Settings,
                   only: Optional[list[str]] = None) -> tuple[Snapshot, list[str]]:
    """The state `up` (and `plan`) decide on, after every check that changes nothing."""
    vm_names = selected_vms(dmz, only)
    snap = snapshot(virt, desired_state(virt, dmz, settings), settings.hooks_dir)
    preflight(virt, snap, vm_names)
    return snap, vm_names


def summary_lines(outcome: Outcome, verb: str) -> list[str]:
    """What a command says after its changes (each was said as it happened): pending, or nothing to do."""
    if not outcome.changes and not outcome.refreshed and not outcome.pending:
        return [f"{outcome.dmz}: {verb}: nothing to change"]
    return [f"{outcome.dmz}: PENDING: {pending}" for pending in outcome.pending]
