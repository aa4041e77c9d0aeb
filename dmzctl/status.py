"""`dmzctl status`: what is live for each DMZ compared with its config."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from .config import DMZ
from .desired import build
from .host import nft
from .host.virt import Virt, digest_of, owner_of
from .install import missing_hooks
from .lifecycle import bridge_netfilter_warnings, desired_state, firewall_in_sync
from .render.base import to_string


@dataclass
class VMStatus:
    name: str
    state: str
    as_configured: bool
    uptime_s: Optional[float] = None
    addresses: list[str] = field(default_factory=list)
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

    @property
    def ok(self) -> bool:
        return not self.problems and all(vm.as_configured for vm in self.vms)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def dmz_status(virt: Virt, dmz: DMZ) -> DMZStatus:
    desired = desired_state(virt, dmz)
    problems: list[str] = []
    net = virt.network(dmz.name)
    network_ok = False
    leases = []
    if net is None:
        network = "absent"
        problems.append(f"network {dmz.name} is absent")
    elif owner_of(virt.network_xml(net)) != dmz.name:
        network = "foreign"
        problems.append(f"network {dmz.name} exists but is not this DMZ's")
    else:
        active = virt.network_active(net)
        network = "active" if active else "inactive"
        live = virt.network_xml(net, inactive=False)
        network_ok = active and digest_of(live) == digest_of(to_string(desired.network))
        if not active:
            problems.append(f"network {dmz.name} is not active")
        elif not network_ok:
            problems.append(f"network {dmz.name} differs from the config")
        leases = virt.dhcp_leases(net) if active else []

    if not nft.table_exists(desired.table):
        firewall = "absent"
        problems.append(f"firewall table inet {desired.table} is absent")
    elif firewall_in_sync(desired):
        firewall = "in sync"
    else:
        firewall = "drifted"
        problems.append(f"firewall table inet {desired.table} differs from the config")

    vms = []
    for vm in dmz.vms:
        info = virt.domain_info(vm.name)
        status = VMStatus(name=vm.name, state="absent", as_configured=False)
        if info is None:
            status.problems.append("not defined")
        elif info.owner != dmz.name:
            status.state = "foreign"
            status.problems.append("a domain of this name exists and is not this DMZ's")
        else:
            status.state = info.state
            if not info.running:
                status.problems.append(f"{info.state}, expected running")
            want = digest_of(to_string(desired.domains[vm.name]))
            if info.digest != want or (info.running and info.live_digest != want):
                status.problems.append("definition differs from the config (dmzctl up --restart-changed)")
            if info.started_at:
                status.uptime_s = round(time.time() - info.started_at, 1)
            status.as_configured = not status.problems
        status.addresses = [str(a) for a in (vm.ip, vm.ip6) if a is not None]
        for lease in leases:
            if lease.get("mac", "").lower() == vm.mac and lease.get("ipaddr") not in status.addresses:
                status.addresses.append(lease["ipaddr"])
        vms.append(status)
    missing = missing_hooks()
    if missing:
        problems.append(f"libvirt hooks missing ({', '.join(missing)}): virsh or virt-manager could start a VM "
                        f"of this DMZ without its firewall table; 'dmzctl up' installs them")
    return DMZStatus(name=dmz.name, config=str(dmz.source), network=network, network_as_configured=network_ok,
                     firewall=firewall, vms=vms, problems=problems, warnings=bridge_netfilter_warnings(dmz),
                     hooks="missing" if missing else "installed")


def format_status(status: DMZStatus) -> str:
    lines = [f"DMZ {status.name} ({status.config}): {'OK' if status.ok else 'NOT AS CONFIGURED'}",
             f"  network   {status.network}{'' if status.network_as_configured or status.network != 'active' else ' (differs from config)'}",
             f"  firewall  {status.firewall}",
             f"  hooks     {status.hooks}"]
    for vm in status.vms:
        uptime = f", up {_duration(vm.uptime_s)}" if vm.uptime_s is not None else ""
        addresses = f", {' '.join(vm.addresses)}" if vm.addresses else ""
        lines.append(f"  vm {vm.name:<12} {vm.state}{uptime}{addresses}")
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
