"""Desired state: everything `up` would make exist for one DMZ, built purely from its config."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

from lxml import etree

from .config import DMZ
from .implicit import Blocked, HostView, blocks_for
from .render.base import NS, load_base, to_string, xml_dir
from .render.domain import HostFacts, render_domain
from .render.network import render_network
from .render.nft import Command, render_table, table_name
from .render.nwfilter import CLEAN_TRAFFIC, clean_traffic_filter, render_nwfilters
from .render.seed import seed_files, seed_iso


@dataclass
class DesiredDMZ:
    dmz: DMZ
    network: etree._Element
    nwfilters: dict[str, etree._Element]  # in definition order: referenced before referencing
    table: str
    nft: list[Command]
    domains: dict[str, etree._Element]
    blocks: tuple[Blocked, ...] = ()  # the implicit blocks the table holds
    view: HostView = HostView()  # the host's networks they were read from
    seeds: dict[str, bytes] = field(default_factory=dict)  # VM name -> its cloud-init seed ISO


def stamp_digest(element: etree._Element) -> str:
    """Record a digest of the rendered document in its dmzctl metadata, so that a
    later run can tell whether the live object still is what this config renders."""
    owned = element.find(f"metadata/{{{NS}}}*")
    owned.attrib.pop("digest", None)
    # Only what the document says counts, not which file or which edit of it said so.
    bare = copy.deepcopy(element)
    for key in ("digest", "hash", "config"):
        bare.find(f"metadata/{{{NS}}}*").attrib.pop(key, None)
    digest = hashlib.sha256(to_string(bare).encode()).hexdigest()[:16]
    owned.set("digest", digest)
    return digest


def build(dmz: DMZ, facts: HostFacts = HostFacts(), view: HostView = HostView()) -> DesiredDMZ:
    """Everything for one DMZ; `view` is the host's networks (empty: only what needs no host)."""
    blocks = blocks_for(dmz, view)
    nwfilters: dict[str, etree._Element] = {CLEAN_TRAFFIC: clean_traffic_filter()}
    domains: dict[str, etree._Element] = {}
    for vm in dmz.vms:
        nwfilters.update(render_nwfilters(dmz, vm))
        base = load_base(vm.domain_xml) if vm.domain_xml else load_base(xml_dir() / "domain.xml")
        domains[vm.name] = render_domain(dmz, vm, facts, base=base)
        stamp_digest(domains[vm.name])
    network = render_network(dmz)
    stamp_digest(network)
    seeds = {vm.name: seed_iso(seed_files(dmz, vm)) for vm in dmz.vms if vm.cloud_init is not None}
    return DesiredDMZ(dmz=dmz, network=network, nwfilters=nwfilters, table=table_name(dmz),
                      nft=render_table(dmz, blocks), domains=domains, blocks=blocks, view=view, seeds=seeds)
