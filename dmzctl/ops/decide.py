"""What `up` does to each object, decided from the desired state and the observed one.

`up` (ops/lifecycle.py) executes these decisions and `plan` prints them: the two
cannot disagree. Pure: the observed state was read once by state.observe().
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from lxml import etree

from .. import xmlcompare
from ..desired import DesiredDMZ
from ..host.objects import DomainInfo, digest_of
from ..render.base import to_string
from ..config import DEFAULT_POOL, VM, seed_volume_name
from ..render.storage import render_data_volume, render_pool, render_root_volume, render_seed_volume
from ..state import Observed, same_filter, seed_hash


@dataclass(frozen=True)
class NetworkDecision:
    want_xml: str
    live_xml: Optional[str]  # its persistent definition
    define: Optional[str]  # "new" | "update" | None
    start: bool
    autostart: bool  # active, but not marked autostart: up sets it
    pending: bool  # definition updated while active: applies at the network's next start


def decide_network(desired: DesiredDMZ, observed: Observed) -> NetworkDecision:
    xml = to_string(desired.network)
    net = observed.network
    if net is None:
        return NetworkDecision(xml, None, "new", start=True, autostart=False, pending=False)
    define = "update" if net.digest != digest_of(xml) or xmlcompare.differs(net.definition, xml) else None
    return NetworkDecision(xml, net.definition, define, start=not net.active,
                           autostart=net.active and not net.autostart, pending=define is not None and net.active)


@dataclass(frozen=True)
class FilterDecision:
    name: str
    element: etree._Element  # what to define (under the live uuid when it exists)
    live_xml: Optional[str]

    @property
    def action(self) -> str:
        return "update" if self.live_xml is not None else "define"


def decide_nwfilters(desired: DesiredDMZ, observed: Observed) -> list[FilterDecision]:
    """The filters to define or redefine, in definition order (referenced first)."""
    decisions = []
    for name, element in desired.nwfilters.items():
        live = observed.nwfilters.get(name)
        if live is not None and same_filter(live, element):
            continue
        if live is not None:
            # libvirt redefines a filter only under its existing uuid.
            element = copy.deepcopy(element)
            element.find("uuid").text = etree.fromstring(live.encode()).findtext("uuid")
        decisions.append(FilterDecision(name, element, live))
    return decisions


@dataclass(frozen=True)
class DomainDecision:
    name: str
    info: Optional[DomainInfo]
    want_xml: str
    define: Optional[str]  # "new" | "update" | None
    autostart: Optional[bool]  # the value up sets, None when it is right already
    start: bool  # not running: up starts it
    outdated: bool = False  # running, and what runs is not (or will not be) the config's definition
    restart: bool = False  # outdated and up was asked to --restart-changed


def decide_domain(desired: DesiredDMZ, observed: Observed, name: str,
                  restart_changed: bool = False) -> DomainDecision:
    xml = to_string(desired.domains[name])
    want = digest_of(xml)
    vm = desired.dmz.vm(name)
    info = observed.domains.get(name)
    if info is None:
        return DomainDecision(name, None, xml, "new", True if vm.autostart else None, start=True)
    define = "update" if info.digest != want or xmlcompare.differs(info.definition, xml) else None
    autostart = vm.autostart if info.autostart != vm.autostart else None
    # What runs now: a definition updated by an earlier `up` applies only at the next start.
    outdated = info.running and (define is not None or info.live_digest != want)
    return DomainDecision(name, info, xml, define, autostart, start=not info.running, outdated=outdated,
                          restart=outdated and restart_changed)


def decide_firewall_action(observed: Observed) -> Optional[str]:
    """apply (absent) | update (differs) | None (in sync): the table is always replaced whole."""
    if observed.table.in_sync:
        return None
    return "update" if observed.table.exists else "apply"


@dataclass(frozen=True)
class VolumeDecision:
    vm: str
    pool: str
    name: str
    kind: str  # root | data | seed
    action: str  # create | update (a seed whose content differs: deleted and made anew)
    xml: str
    data: Optional[bytes] = None  # what is uploaded into it (the seed)


@dataclass(frozen=True)
class StorageDecision:
    pool: str
    pool_action: Optional[str]  # create (dmzctl's own pool, absent) | start | None
    pool_xml: Optional[str]
    volumes: tuple[VolumeDecision, ...]
    notes: tuple[str, ...] = ()  # what up leaves as it is, and says


def decide_storage(desired: DesiredDMZ, observed: Observed, name: str) -> Optional[StorageDecision]:
    """The pool, volumes and seed a cloud-image VM needs before it is defined. An existing root or
    data volume is never made anew (it holds the VM's data); a seed whose content differs is."""
    vm = desired.dmz.vm(name)
    if not vm.provisioned:
        return None
    pool = observed.pools.get(vm.pool)
    action = None if pool is not None and pool.active else ("start" if pool is not None else "create")
    pool_xml = to_string(render_pool(vm.pool)) if action == "create" and vm.pool == DEFAULT_POOL else None
    wanted = _wanted_volumes(desired, vm)
    decisions, notes = [], []
    for kind, volume_name, element, data in wanted:
        live = observed.volumes.get((vm.pool, volume_name))
        if live is None:
            decisions.append(VolumeDecision(name, vm.pool, volume_name, kind, "create", to_string(element), data))
        elif kind == "seed" and observed.seeds.get(name) != seed_hash(data):
            decisions.append(VolumeDecision(name, vm.pool, volume_name, kind, "update", to_string(element), data))
        elif kind == "root" and (live.backing != str(vm.image.path) or live.backing_format != vm.image.format):
            notes.append(f"volume {vm.pool}/{volume_name} exists over {live.backing} ({live.backing_format}), not "
                         f"{vm.image.path} ({vm.image.format}); dmzctl never makes a root volume anew: "
                         f"delete it yourself to start from the new image")
        elif kind != "seed" and live.capacity < element_capacity(element):
            notes.append(f"volume {vm.pool}/{volume_name} is smaller than the config says; dmzctl does not resize "
                         f"volumes (virsh vol-resize, then grow the file system)")
    return StorageDecision(vm.pool, action, pool_xml, tuple(decisions), tuple(notes))


def element_capacity(element: etree._Element) -> int:
    return int(element.findtext("capacity"))


def _wanted_volumes(desired: DesiredDMZ, vm: VM) -> list[tuple[str, str, etree._Element, Optional[bytes]]]:
    wanted = []
    if vm.image is not None:
        root = render_root_volume(vm)
        wanted.append(("root", root.findtext("name"), root, None))
    for volume in vm.volumes:
        element = render_data_volume(vm, volume)
        wanted.append(("data", element.findtext("name"), element, None))
    if vm.cloud_init is not None:
        data = desired.seeds[vm.name]
        wanted.append(("seed", seed_volume_name(vm.name), render_seed_volume(vm, len(data)), data))
    return wanted
