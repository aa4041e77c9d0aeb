"""A cloud-image VM's storage, made by `up` before the VM is defined: its pool (dmzctl's own is
created when absent), the root volume over the base image, the data volumes, and the seed.

Only what this run created is undone on failure; a volume that existed before is never deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import events
from ..desired import DesiredDMZ
from ..host.virt import Virt
from ..render.storage import DEFAULT_POOL_DIR
from ..settings import Settings
from ..state import Observed, observe_storage
from .common import Outcome, Undo
from .decide import StorageDecision, VolumeDecision, decide_storage


def up_storage(virt: Virt, desired: DesiredDMZ, observed: Observed, name: str, outcome: Outcome, undo: Undo,
               settings: Settings) -> Optional[StorageDecision]:
    """Make what the VM's decision says, in order: pool, volumes, seed."""
    decision = decide_storage(desired, observed, name)
    if decision is None:
        return None
    dmz = desired.dmz.name
    if decision.pool_action == "create":
        virt.create_pool(decision.pool_xml)
        outcome.change(f"storage pool {decision.pool} created at {DEFAULT_POOL_DIR} (autostart)")
        events.record(settings.event_log, f"dmz={dmz} storage pool {decision.pool} created")
        undo.add(f"storage pool {decision.pool}", lambda: virt.remove_pool(decision.pool))
        observed.pools[decision.pool] = virt.pool_info(decision.pool)
    elif decision.pool_action == "start":
        virt.start_pool(decision.pool)
        outcome.change(f"storage pool {decision.pool} started")
        # An inactive pool shows no volumes: look again before deciding what to make.
        for found, fresh in zip((observed.pools, observed.volumes, observed.seeds), observe_storage(virt, desired)):
            found.update(fresh)
        decision = decide_storage(desired, observed, name)
    for volume in decision.volumes:
        _make_volume(virt, volume, outcome, undo, settings, dmz)
        observed.volumes[(volume.pool, volume.name)] = virt.volume_info(volume.pool, volume.name)
    outcome.pending.extend(decision.notes)
    return decision


def _make_volume(virt: Virt, volume: VolumeDecision, outcome: Outcome, undo: Undo, settings: Settings,
                 dmz: str) -> None:
    where = f"volume {volume.pool}/{volume.name}"
    if volume.action == "update":
        # A seed only: its content is the config's, nothing else; it is made anew, never patched.
        virt.delete_volume(volume.pool, volume.name)
    path = virt.create_volume(volume.pool, volume.xml)
    if volume.action == "create":
        undo.add(where, lambda: virt.delete_volume(volume.pool, volume.name))
    if volume.data is not None:
        virt.upload_volume(volume.pool, volume.name, volume.data)
    what = {"root": "root volume", "data": "data volume", "seed": "cloud-init seed"}[volume.kind]
    done = "regenerated" if volume.action == "update" else "created"
    outcome.change(f"{what} {where} {done} ({Path(path).name}, VM {volume.vm})")
    events.record(settings.event_log, f"dmz={dmz} vm={volume.vm} {what} {volume.pool}/{volume.name} {done}")
