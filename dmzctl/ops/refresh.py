"""The other DMZs, when one comes or goes: their tables' implicit sets follow the host's networks
(a DMZ's bridge adds a subnet). No VM's nwfilter lists the host's addresses any more: one more DMZ
redefines no other DMZ's filters (docs/benchmarks-scale.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import events
from ..config import DMZ, load_dmz
from ..errors import DmzctlError, LockedError
from ..host import facts, nft
from ..host.lock import dmz_lock, held_down_marker
from ..host.virt import Virt
from ..implicit import blocks_for
from ..render.nft import apply_batch, table_name
from ..settings import Settings
from .common import Outcome


def refresh_other_tables(dmz: DMZ, outcome: Outcome, settings: Settings, virt: Optional[Virt] = None) -> None:
    """Re-apply every other live DMZ table that the host's networks have made stale. `virt` is
    accepted for the callers' sake; no filter needs refreshing.

    Their configs are found through their networks' metadata. A DMZ held by another
    dmzctl run is left to it (it renders with the view it reads), as is one whose
    table an admin took down on purpose.
    """
    view = facts.host_view()
    others = {network.dmz: network.config for network in view.networks
              if network.dmz and network.dmz != dmz.name and network.config}
    for name, config in sorted(others.items()):
        try:
            other = load_dmz(Path(config))
        except DmzctlError as error:
            outcome.pending.append(f"DMZ {name}: its table could not be refreshed: {str(error).splitlines()[0]}")
            continue
        if other.name != name:
            continue
        try:
            with dmz_lock(settings.run_dir, name, timeout=0):
                _refresh_table(other, view, outcome, settings, dmz.name)
        except LockedError:
            continue
        except DmzctlError as error:
            # Another DMZ's trouble does not stop this one's run: its table and filters stay as they were
            # (still blocking what they blocked), and its own check reports them stale.
            outcome.pending.append(f"DMZ {name}: could not be refreshed: {str(error).splitlines()[0]}")


def _refresh_table(other: DMZ, view, outcome: Outcome, settings: Settings, by: str) -> None:
    table = table_name(other)
    if held_down_marker(settings.run_dir, other.name).exists() or not nft.table_exists(table):
        return  # taken down on purpose, or the DMZ is down
    batch = apply_batch(other, blocks_for(other, view))
    if nft.canonical(nft.list_firewall(table)) == nft.kernel_form(batch, table):
        return
    nft.apply(batch)
    outcome.refresh(f"firewall table inet {table} of DMZ {other.name} refreshed (the host's networks changed)")
    events.record(settings.event_log, f"dmz={other.name} firewall table {table} refreshed by dmzctl of {by}")
