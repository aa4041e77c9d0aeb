"""`dmzctl destroy`: what `down` keeps goes too, the definitions; volumes only when asked by name.

`down` halts a DMZ and keeps its definitions, as virt-manager's shutdown does. `destroy`
halts it the same way, then undefines the VMs, removes the DMZ's nwfilters and network.
The disks and volumes stay: data is deleted only with `--delete-volumes`, and only the
volumes dmzctl made in a pool for these VMs (never a user's `disks`).
"""

from __future__ import annotations

from typing import Optional

from ..config import DMZ
from ..host.lock import SHARED_FILTERS, dmz_lock
from ..host.virt import Virt
from ..render.nwfilter import CLEAN_TRAFFIC, LEGACY_FILTER_SUFFIXES, VM_FILTER_SUFFIXES
from ..settings import Settings
from .common import Outcome, Say, require_root, selected_vms
from .lifecycle import down, owned_domains, stop_domains
from .refresh import refresh_other_tables

def destroy(virt: Virt, dmz: DMZ, settings: Settings, only: Optional[list[str]] = None,
            timeout: Optional[float] = None, delete_volumes: bool = False, say: Say = print) -> Outcome:
    """Halt (as `down`), then remove the definitions: the VMs (only these, with `only`), their
    nwfilters, and without `only` the DMZ's network. Volumes stay unless delete_volumes."""
    require_root()
    outcome = down(virt, dmz, settings, only, timeout, say=say)
    owned = owned_domains(virt, dmz)
    names = [n for n in (selected_vms(dmz, only) if only else owned) if n in owned]
    for name in names:
        virt.undefine_domain(name)
        outcome.change(f"VM {name} undefined")
    if delete_volumes:
        _delete_volumes(virt, dmz, selected_vms(dmz, only) if only else [vm.name for vm in dmz.vms], outcome)
    _remove_nwfilters(virt, dmz, names if only else None, outcome, settings)
    if not only:
        network = virt.network_info(dmz.name)
        if network is not None and network.owner == dmz.name:
            virt.remove_network(dmz.name)
            outcome.change(f"network {dmz.name} removed")
            refresh_other_tables(dmz, outcome, settings, virt)  # its subnets are no other DMZ's concern now
    return outcome


def volumes_to_delete(dmz: DMZ, names: list[str]) -> list[tuple[str, str]]:
    """The pool volumes dmzctl made for these VMs (pool, name); a user's `disks` are never among them."""
    from ..render.storage import volumes_of

    return [volume for vm in dmz.vms if vm.name in names for volume in volumes_of(vm)]


def _delete_volumes(virt: Virt, dmz: DMZ, names: list[str], outcome: Outcome) -> None:
    for pool, volume in volumes_to_delete(dmz, names):
        if virt.pool_info(pool) is not None and virt.volume_info(pool, volume) is not None:
            virt.delete_volume(pool, volume)
            outcome.change(f"volume {pool}/{volume} deleted")


def remove_domains(virt: Virt, dmz: DMZ, names: list[str], settings: Settings, outcome: Outcome,
                   say: Say = print) -> None:
    """Stop (ACPI, then destroy) and undefine these VMs of the DMZ; their disks stay."""
    for line in stop_domains(virt, dmz, names, settings, say=say):
        outcome.change(line)
    for name in names:
        virt.undefine_domain(name)
        outcome.change(f"VM {name} undefined")


def _remove_nwfilters(virt: Virt, dmz: DMZ, vms: Optional[list[str]], outcome: Outcome,
                      settings: Settings) -> None:
    """The DMZ's filters (with vms: only those VMs' filters); the shared one with the last DMZ."""
    if vms is None:
        names = [n for n in virt.nwfilter_names() if n.startswith(f"dmzctl-{dmz.name}-")]
    else:
        mine = {f"dmzctl-{dmz.name}-{vm}{suffix}" for vm in vms
                for suffix in VM_FILTER_SUFFIXES + LEGACY_FILTER_SUFFIXES}
        names = [n for n in virt.nwfilter_names() if n in mine]
    # Referencing filters first: libvirt refuses to remove a filter still referenced.
    for name in sorted(names, key=lambda n: (n.endswith(LEGACY_FILTER_SUFFIXES), n)):
        virt.undefine_nwfilter(name)
        outcome.change(f"nwfilter {name} removed")
    # The shared clean-traffic filter goes with the last DMZ that uses it; the lock
    # keeps another DMZ's `up` from referencing it while it goes.
    with dmz_lock(settings.run_dir, SHARED_FILTERS):
        if not any(n.startswith("dmzctl-") and n != CLEAN_TRAFFIC for n in virt.nwfilter_names()):
            if virt.nwfilter_exists(CLEAN_TRAFFIC):
                virt.undefine_nwfilter(CLEAN_TRAFFIC)
                outcome.change(f"nwfilter {CLEAN_TRAFFIC} removed")
