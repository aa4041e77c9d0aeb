"""One observed state, one diff: what `status`, `check`, `plan`, `guard` and `up` all build on.

`observe(virt, desired)` reads everything dmzctl knows about a live DMZ once, through
host/ only, into a plain value. `diff(desired, observed)` is pure and is the only
definition of "as configured": each command differs only in what it does with the
differences (status and check print them, plan shows them as diffs, up, check --fix
and guard act on them).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import xmlcompare
from .desired import DesiredDMZ
from .host import nft
from .config import seed_volume_name
from .host.objects import DomainInfo, NetworkInfo, digest_of
from .host.storage import PoolInfo, VolumeInfo
from .host.virt import Virt
from .implicit import SET_NAMES
from .hooks.files import missing_hooks
from .render.base import to_string
from .render.nft import apply_batch
from .render.storage import volumes_of

IMPLICIT_SETS = set(SET_NAMES.values())


@dataclass(frozen=True)
class TableState:
    live: Any  # the live table as the kernel lists it (canonical), None when absent
    want: Any  # the config's table as the kernel would list it; None when the table is absent

    @property
    def exists(self) -> bool:
        return self.live is not None

    @property
    def in_sync(self) -> bool:
        return self.live is not None and self.live == self.want


@dataclass(frozen=True)
class Observed:
    network: Optional[NetworkInfo]
    nwfilters: dict  # name -> live XML, None when absent
    table: TableState
    domains: dict  # VM name -> DomainInfo, None when absent
    strays: tuple[str, ...] = ()  # domains of this DMZ that its config no longer names
    hooks_missing: tuple[str, ...] = ()
    pools: dict = field(default_factory=dict)  # pool name -> PoolInfo, None when absent
    volumes: dict = field(default_factory=dict)  # (pool, volume name) -> VolumeInfo, None when absent
    seeds: dict = field(default_factory=dict)  # VM name -> sha256 of its seed volume's content, None: absent


def seed_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def observe_storage(virt: Virt, desired: DesiredDMZ) -> tuple[dict, dict, dict]:
    """The pools, volumes and seeds of the DMZ's cloud-image VMs (pools, volumes, seeds)."""
    vms = [vm for vm in desired.dmz.vms if vm.provisioned]
    pools: dict[str, Optional[PoolInfo]] = {vm.pool: None for vm in vms}
    for name in pools:
        pools[name] = virt.pool_info(name)
    volumes: dict[tuple[str, str], Optional[VolumeInfo]] = {}
    seeds: dict[str, Optional[str]] = {}
    for vm in vms:
        for pool, name in volumes_of(vm):
            volumes[(pool, name)] = virt.volume_info(pool, name) if pools[pool] is not None else None
        if vm.cloud_init is not None:
            info = volumes[(vm.pool, seed_volume_name(vm.name))]
            data = virt.read_volume(vm.pool, info.name, info.capacity) if info is not None else None
            seeds[vm.name] = seed_hash(data) if data is not None else None
    return pools, volumes, seeds


def observe_table(desired: DesiredDMZ) -> TableState:
    live = nft.canonical(nft.list_firewall(desired.table))
    want = nft.kernel_form(apply_batch(desired.dmz, desired.blocks), desired.table) if live is not None else None
    return TableState(live, want)


def observe(virt: Virt, desired: DesiredDMZ, hooks_dir) -> Observed:
    """Everything about the live DMZ, read once. Raises HostError when libvirt cannot answer."""
    dmz = desired.dmz
    configured = {vm.name for vm in dmz.vms}
    pools, volumes, seeds = observe_storage(virt, desired)
    return Observed(
        network=virt.network_info(dmz.name),
        nwfilters={name: virt.nwfilter_xml(name) for name in desired.nwfilters},
        table=observe_table(desired),
        domains={vm.name: virt.domain_info(vm.name) for vm in dmz.vms},
        strays=tuple(name for name in virt.domains_of(dmz.name) if name not in configured),
        hooks_missing=tuple(missing_hooks(hooks_dir)),
        pools=pools, volumes=volumes, seeds=seeds,
    )


# --- differences -----------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    kind: str  # what kind of drift: network-missing, table-flushed, vm-not-running, ... (KINDS)
    object: str  # "network demo", "firewall table inet dmzctl-demo", "VM web", "nwfilter x"
    problem: str  # what is wrong, for the per-line report
    short: str  # a few words for a summary line
    subject: str = ""  # the VM or filter it is about, when it is about one

    def line(self) -> str:
        return f"{self.object}: {self.problem}"

    def to_dict(self) -> dict:
        return asdict(self)


def diff(desired: DesiredDMZ, observed: Observed) -> list[Difference]:
    """Every way the live DMZ is not as configured, in up's order. Pure."""
    found: list[Difference] = []
    network_ours = _network(desired, observed.network, found)
    if network_ours:
        _nwfilters(desired, observed.nwfilters, found)
    _table(desired.table, observed.table, found)
    for vm in desired.dmz.vms:
        _storage(desired, vm, observed, found)
        _domain(desired, vm, observed.domains.get(vm.name), found)
    for name in observed.strays:
        found.append(Difference("vm-not-in-config", f"VM {name}", "belongs to this DMZ but is not in its config "
                                "(check --fix or destroy removes it)", f"VM {name} not in config", name))
    for path in observed.hooks_missing:
        found.append(Difference("hooks-missing", f"libvirt hook {path}", "missing: virsh or virt-manager could "
                                "start a VM of this DMZ without its firewall table", "hooks missing"))
    return _as_down(desired, observed, found) if is_down(desired, observed) else found


# What a halted DMZ shows instead: one "down" difference; differences of its definitions stay. Its
# nwfilters are left out: an upgrade may render them differently while it is down (issue 14 moved
# the host-address block to the backstop table), and `up` re-renders them before any VM starts.
HALTED_KINDS = frozenset({"network-inactive", "table-missing", "vm-not-running", "nwfilter-differs"})


def is_down(desired: DesiredDMZ, observed: Observed) -> bool:
    """Defined but down (`dmzctl down`): its network defined and stopped, no table, none of its VMs running."""
    net = observed.network
    return (net is not None and net.owner == desired.dmz.name and not net.active and not observed.table.exists
            and not any(info is not None and info.running for info in observed.domains.values()))


def _as_down(desired: DesiredDMZ, observed: Observed, found: list[Difference]) -> list[Difference]:
    defined = sum(1 for info in observed.domains.values() if info is not None and info.owner == desired.dmz.name)
    down = Difference("dmz-down", f"DMZ {desired.dmz.name}",
                      f"down: defined ({defined} VM{'s' if defined != 1 else ''} shut off), network inactive, "
                      f"no firewall table (dmzctl up starts it)", "down (defined)")
    return [down] + [d for d in found if d.kind not in HALTED_KINDS]


def _network(desired: DesiredDMZ, net: Optional[NetworkInfo], found: list) -> bool:
    """False when the network is someone else's (nothing of it is dmzctl's to compare)."""
    name = desired.dmz.name
    what = f"network {name}"
    if net is None:
        found.append(Difference("network-missing", what, "missing", "network missing"))
        return True
    if net.owner != name:
        found.append(Difference("network-foreign", what, "exists and is not this DMZ's (dmzctl will not touch "
                                "it)", "network foreign"))
        return False
    want_xml = to_string(desired.network)
    want = digest_of(want_xml)
    # The digest says which config rendered it; the content says whether someone changed it since.
    if net.digest != want or xmlcompare.differs(net.definition, want_xml):
        found.append(Difference("network-definition", what, "definition differs from the config",
                                "network definition differs"))
    if not net.active:
        found.append(Difference("network-inactive", what, "not active", "network inactive"))
        return True
    # What runs: by digest, or by content where a live change (a DHCP host added or removed with
    # net-update, which leaves the metadata as it was) made it what the config says.
    if net.digest == want and net.live_digest != want and xmlcompare.differs(net.live or "", want_xml):
        found.append(Difference("network-older", what, "runs an older definition (dmzctl down, then up)",
                                "network runs an older definition"))
    if not net.autostart:
        found.append(Difference("network-autostart", what, "not marked autostart", "network autostart off"))
    return True


def same_filter(live_xml: str, element) -> bool:
    """Equal as XML: libvirt writes filters back with other quoting and indentation."""
    from lxml import etree

    parser = etree.XMLParser(remove_blank_text=True)
    live = etree.fromstring(live_xml.encode(), parser)
    wanted = etree.fromstring(etree.tostring(element), parser)
    return etree.tostring(live, method="c14n") == etree.tostring(wanted, method="c14n")


def _nwfilters(desired: DesiredDMZ, live: dict, found: list) -> None:
    for name, element in desired.nwfilters.items():
        xml = live.get(name)
        if xml is None:
            found.append(Difference("nwfilter-missing", f"nwfilter {name}", "missing", "nwfilter missing", name))
        elif not same_filter(xml, element):
            found.append(Difference("nwfilter-differs", f"nwfilter {name}", "differs from the config",
                                    "nwfilter differs", name))


def _table(table_name: str, state: TableState, found: list) -> None:
    what = f"firewall table inet {table_name}"
    if state.in_sync:
        return
    if not state.exists:
        found.append(Difference("table-missing", what, "missing", "firewall table missing"))
        return
    for kind, problem, short in table_drift(state.live, state.want):
        found.append(Difference(kind, what, problem, short))


def _table_parts(listing) -> tuple[dict, dict, dict]:
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


def table_drift(live: Any, want: Any) -> list[tuple[str, str, str]]:
    """What differs between two canonical listings, chain by chain: (kind, problem, short)."""
    live_chains, live_rules, live_sets = _table_parts(live)
    want_chains, want_rules, want_sets = _table_parts(want)
    out = []
    for name in want_chains:
        if name not in live_chains:
            out.append(("table-chain-missing", f"chain {name} missing", f"firewall chain {name} missing"))
        elif live_chains[name] != want_chains[name]:
            out.append(("table-chain-differs", f"chain {name} differs (hook, priority or policy)",
                        f"firewall chain {name} differs"))
        elif not live_rules.get(name) and want_rules.get(name):
            out.append(("table-chain-flushed", f"chain {name} flushed (0 of {len(want_rules[name])} rules)",
                        f"firewall chain {name} flushed"))
        elif live_rules.get(name) != want_rules.get(name):
            out.append(("table-rules-altered", f"chain {name} rules differ ({_rule_detail(live_rules, want_rules, name)})",
                        f"firewall chain {name} altered"))
    for name in live_chains:
        if name not in want_chains:
            out.append(("table-chain-added", f"chain {name} is not in the config", f"firewall chain {name} added"))
    for name in want_sets:
        if live_sets.get(name) == want_sets[name]:
            continue
        if name.rstrip("46") in IMPLICIT_SETS and name in live_sets:
            out.append(("table-set-stale", f"set {name} is stale: the host's networks or the other DMZs changed "
                        f"since it was applied (check --fix re-applies)", f"firewall set {name} stale"))
        else:
            out.append(("table-set-differs", f"set {name} differs", f"firewall set {name} differs"))
    return out or [("table-differs", "differs from the config", "firewall table differs")]


def _rule_detail(live_rules: dict, want_rules: dict, name: str) -> str:
    have, need = live_rules.get(name, []), want_rules.get(name, [])
    missing = sum(1 for rule in need if rule not in have)
    extra = sum(1 for rule in have if rule not in need)
    return ", ".join(x for x in (f"{missing} missing" if missing else "",
                                 f"{extra} not in the config" if extra else "") if x) or "order differs"


def _storage(desired: DesiredDMZ, vm, observed: Observed, found: list) -> None:
    """A cloud-image VM's pool, volumes and seed."""
    if not vm.provisioned:
        return
    if observed.pools.get(vm.pool) is None:
        found.append(Difference("pool-missing", f"storage pool {vm.pool}", "missing", f"pool {vm.pool} missing",
                                vm.name))
        return
    seed_name = seed_volume_name(vm.name)
    for pool, name in volumes_of(vm):
        if observed.volumes.get((pool, name)) is None:
            kind = "seed" if name == seed_name else "volume"
            found.append(Difference(f"{kind}-missing", f"volume {pool}/{name}", f"missing (VM {vm.name})",
                                    f"{kind} {name} missing", vm.name))
    seed = observed.seeds.get(vm.name)
    if vm.name in desired.seeds and seed is not None and seed != seed_hash(desired.seeds[vm.name]):
        found.append(Difference("seed-differs", f"volume {vm.pool}/{seed_name}", "cloud-init seed differs from "
                                "the config (dmzctl up regenerates it)", f"seed {seed_name} differs", vm.name))


def _domain(desired: DesiredDMZ, vm, info: Optional[DomainInfo], found: list) -> None:
    what, name = f"VM {vm.name}", vm.name
    if info is None:
        found.append(Difference("vm-missing", what, "not defined", f"VM {name} missing", name))
        return
    if info.owner != desired.dmz.name:
        found.append(Difference("vm-foreign", what, "a domain of this name exists and is not this DMZ's",
                                f"VM {name} foreign", name))
        return
    want_xml = to_string(desired.domains[name])
    want = digest_of(want_xml)
    if info.digest != want or xmlcompare.differs(info.definition, want_xml):
        found.append(Difference("vm-definition", what, "definition differs from the config",
                                f"VM {name} definition differs", name))
    if not info.running:
        found.append(Difference("vm-not-running", what, f"{info.state}, expected running",
                                f"VM {name} {info.state}", name))
    elif info.digest == want and info.live_digest != want:
        found.append(Difference("vm-older", what, "runs an older definition (dmzctl up --restart-changed)",
                                f"VM {name} runs an older definition", name))
    if info.autostart != vm.autostart:
        found.append(Difference("vm-autostart", what, f"autostart {'on' if info.autostart else 'off'}, the config "
                                f"says {'on' if vm.autostart else 'off'}", f"VM {name} autostart", name))


def summary_of(name: str, differences: list[Difference]) -> str:
    """One DMZ in a summary line, from the very list the report prints."""
    if not differences:
        return f"{name} (in sync)"
    more = f", +{len(differences) - 1} more" if len(differences) > 1 else ""
    return f"{name} ({len(differences)} difference{'s' if len(differences) > 1 else ''}: " \
           f"{differences[0].short}{more})"


@dataclass
class Snapshot:
    """A DMZ's desired state, what was observed, and the differences: what commands print from."""

    desired: DesiredDMZ
    observed: Observed
    differences: list[Difference] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not self.differences


def snapshot(virt: Virt, desired: DesiredDMZ, hooks_dir) -> Snapshot:
    observed = observe(virt, desired, hooks_dir)
    return Snapshot(desired, observed, diff(desired, observed))
