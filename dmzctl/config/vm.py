"""The [[vm]] tables: one function per concern, each returning the VM fields it checked (None where
a value is wrong, already reported), so that every problem of every VM is reported at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .checker import Checker, DmzScope, parse_memory
from .disks import parse_disks
from .limits import FLOW_CAP_KEYS, parse_flow_caps, parse_limits
from .model import VM, FlowCaps, default_mac, volume_names
from .provision import PROVISION_KEYS, parse_provision

VM_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}\Z")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
BOOT = ("hd", "cdrom", "kernel")
GRAPHICS = ("vnc", "spice", "none")
# socket: a UNIX socket in libvirt's per-domain directory, reached through libvirt (virt-viewer,
# virt-manager); localhost: TCP on 127.0.0.1, reachable by every local user without authentication.
GRAPHICS_LISTEN = ("socket", "localhost")
VIRT_TYPES = ("auto", "kvm", "qemu")
MIN_MEMORY_MIB = 64
VM_KEYS = {
    "name", "memory", "vcpus", "disks", "cdrom", "boot", "kernel", "initrd",
    "cmdline", "ip", "ip6", "mac", "graphics", "shutdown_timeout", "autostart",
    "virt_type", "domain_xml", "graphics_listen", "limits",
} | FLOW_CAP_KEYS | PROVISION_KEYS
PATH_KEYS = ("cdrom", "kernel", "initrd", "domain_xml")
# A VM is built only when all of these are valid; the others have valid defaults or are optional.
REQUIRED_FIELDS = ("name", "memory_mib", "vcpus", "boot", "mac", "graphics", "graphics_listen", "limits",
                   "shutdown_timeout", "autostart", "virt_type", "pool")
UNIQUE_FIELDS = ("name", "ip", "ip6", "mac")


def parse_vms(check: Checker, raw_vms: Any, scope: DmzScope) -> list[VM]:
    """The valid VMs; each problem of each [[vm]] is reported."""
    if not isinstance(raw_vms, list):
        check.problem("vm", "must be an array of tables [[vm]]")
        return []
    vms: list[VM] = []
    owners: dict[str, dict] = {key: {} for key in UNIQUE_FIELDS}
    for index, table in enumerate(raw_vms):
        if not isinstance(table, dict):
            check.problem(f"vm[{index + 1}]", "must be a table [[vm]]")
            continue
        raw_name = table.get("name")
        where = f"vm[{raw_name}]" if isinstance(raw_name, str) and VM_NAME_RE.match(raw_name) else f"vm[#{index + 1}]"
        fields = _vm_fields(check, table, where, scope)
        _check_unique(check, table, where, fields, owners)
        if any(fields[key] is None for key in REQUIRED_FIELDS):
            continue
        if ("ip" in table and fields["ip"] is None) or ("ip6" in table and fields["ip6"] is None):
            continue  # already reported; holes `from` it must not claim it has no address
        if ("image" in table and fields["image"] is None) or \
                (("cloud_init" in table or "image" in table) and fields["cloud_init"] is None):
            continue  # already reported
        vms.append(VM(**fields))
    _check_volume_names(check, vms)
    return vms


def _check_volume_names(check: Checker, vms: list[VM]) -> None:
    """Two VMs of a DMZ must not name the same volume of a pool (VM a's volume b-root is VM a-b's root)."""
    owners: dict[tuple[str, str], str] = {}
    for vm in vms:
        for name in volume_names(vm):
            key = (vm.pool, name)
            if key in owners and owners[key] != vm.name:
                check.problem(f"vm[{vm.name}].volume", f"volume {name} in pool {vm.pool} is also VM "
                                                      f"{owners[key]}'s; rename the volume")
            owners.setdefault(key, vm.name)


def _vm_fields(check: Checker, table: dict, where: str, scope: DmzScope) -> dict:
    """Every field of the VM in one [[vm]] table, in the order its problems are reported."""
    check.unknown_keys(table, VM_KEYS, where)
    fields = {"name": _name(check, table, where)}
    fields.update(_resources(check, table, where))
    fields["disks"] = parse_disks(check, table, where)
    fields.update(parse_provision(check, table, where, fields["name"]))
    fields.update(_boot(check, table, where, _paths(check, table, where)))
    fields["ip"] = _ip(check, table, where, scope)
    fields["ip6"] = _ip6(check, table, where, scope)
    fields["mac"] = _mac(check, table, where, scope.name, fields["name"])
    fields.update(_console(check, table, where))
    # A disk given but invalid is reported as such, not as "no disk to limit".
    has_disk = bool(table.get("disks")) or "cdrom" in table or "image" in table or "volume" in table
    fields["limits"] = parse_limits(check, table, where, fields["memory_mib"], has_disk)
    fields.update(_running(check, table, where))
    # Caps the same as the DMZ's are the DMZ's: the VM gets no nft chain of its own.
    dmz_caps = scope.flow_caps or FlowCaps()
    caps = parse_flow_caps(check, table, where, dmz_caps)
    fields["flow_caps"] = caps if caps != dmz_caps else None
    return fields


def _name(check: Checker, table: dict, where: str) -> Optional[str]:
    name = check.typed(table, "name", str, where, required=True)
    if name is not None and not VM_NAME_RE.match(name):
        check.problem(f"{where}.name", f"{name!r} must be 1-48 characters of a-z, 0-9 and '-', "
                                       f"starting with a letter or digit")
        return None
    return name


def _resources(check: Checker, table: dict, where: str) -> dict:
    memory = check.parsed(table, "memory", parse_memory, where, "an integer (MiB) or a size such as '512MiB' "
                                                                "or '2GiB'") if "memory" in table else 512
    if memory is not None and memory < MIN_MEMORY_MIB:
        check.problem(f"{where}.memory", f"{memory} MiB is too little; at least {MIN_MEMORY_MIB} MiB")
        memory = None
    vcpus = check.typed(table, "vcpus", int, where, default=1)
    if vcpus is not None:
        check.within(vcpus, 1, 256, f"{where}.vcpus")
    return {"memory_mib": memory, "vcpus": vcpus}


def _paths(check: Checker, table: dict, where: str) -> dict:
    """The files named outright: absolute paths, never resolved against the working directory."""
    paths = {}
    for key in PATH_KEYS:
        value = check.absolute_path(check.typed(table, key, str, where), f"{where}.{key}")
        paths[key] = Path(value) if value else None
    return paths


def _boot(check: Checker, table: dict, where: str, paths: dict) -> dict:
    cmdline = check.typed(table, "cmdline", str, where)
    boot = check.choice(table, "boot", BOOT, where, "kernel" if paths["kernel"] else "hd")
    if boot == "cdrom" and paths["cdrom"] is None:
        check.problem(f"{where}.boot", "'cdrom' needs vm.cdrom, the image to boot from")
    if boot == "kernel" and paths["kernel"] is None:
        check.problem(f"{where}.boot", "'kernel' needs vm.kernel, the kernel image to boot")
    # Disks given but wrong are reported on their own, not also as "nothing to boot".
    raw_disks = table.get("disks", [])
    no_disks = isinstance(raw_disks, list) and not raw_disks and "image" not in table
    if boot == "hd" and no_disks and "boot" in table:
        check.problem(f"{where}.boot", "'hd' needs at least one entry in vm.disks")
    if boot == "hd" and no_disks and "boot" not in table:
        check.problem(where, "nothing to boot: give vm.disks, vm.kernel or vm.cdrom with boot = 'cdrom'")
    for key, value in (("initrd", paths["initrd"]), ("cmdline", cmdline)):
        if value is not None and paths["kernel"] is None:
            check.problem(f"{where}.{key}", "only makes sense with vm.kernel (direct kernel boot)")
    return {**paths, "cmdline": cmdline, "boot": boot}


def _ip(check: Checker, table: dict, where: str, scope: DmzScope):
    ip = check.address(check.typed(table, "ip", str, where), f"{where}.ip", 4)
    gateway = scope.gateway
    if ip is not None and gateway is not None:
        net = gateway.network
        if ip not in net:
            check.problem(f"{where}.ip", f"{ip} is outside the DMZ subnet {net}")
            ip = None
        elif ip == gateway.ip:
            check.problem(f"{where}.ip", f"{ip} is the gateway (the host's address); pick another")
            ip = None
        elif ip in (net.network_address, net.broadcast_address):
            check.problem(f"{where}.ip", f"{ip} is the network or broadcast address of {net}")
            ip = None
    if "ip" not in table and scope.dhcp is False:
        check.problem(f"{where}.ip", "required when dmz.dhcp is false (the anti-spoofing filter binds the "
                                     "VM to its address)")
    return ip


def _ip6(check: Checker, table: dict, where: str, scope: DmzScope):
    ip6 = check.address(check.typed(table, "ip6", str, where), f"{where}.ip6", 6)
    gateway6 = scope.gateway6
    if ip6 is None:
        return None
    if gateway6 is None:
        check.problem(f"{where}.ip6", "the DMZ has no IPv6; set dmz.gateway6 first")
        return None
    if ip6 not in gateway6.network:
        check.problem(f"{where}.ip6", f"{ip6} is outside the DMZ subnet {gateway6.network}")
        return None
    if ip6 == gateway6.ip or ip6 == gateway6.network.network_address:
        check.problem(f"{where}.ip6", f"{ip6} is the gateway or the subnet-router anycast address; "
                                      f"pick another")
        return None
    return ip6


def _mac(check: Checker, table: dict, where: str, dmz_name: Optional[str], name: Optional[str]) -> Optional[str]:
    """The MAC as given (a unicast one), else derived from the DMZ's and the VM's names."""
    mac = check.typed(table, "mac", str, where)
    if mac is None:
        return default_mac(dmz_name, name) if name is not None and dmz_name is not None else None
    mac = mac.lower()
    if not MAC_RE.match(mac):
        check.problem(f"{where}.mac", f"{table['mac']!r} is not a MAC address like 52:54:00:12:34:56")
        return None
    if int(mac[:2], 16) & 1:
        check.problem(f"{where}.mac", f"{mac} is a multicast address; a NIC needs a unicast one")
        return None
    return mac


def _console(check: Checker, table: dict, where: str) -> dict:
    graphics = check.choice(table, "graphics", GRAPHICS, where, "vnc")
    graphics_listen = check.choice(table, "graphics_listen", GRAPHICS_LISTEN, where, "socket")
    if "graphics_listen" in table and graphics == "none":
        check.problem(f"{where}.graphics_listen", "only makes sense with graphics 'vnc' or 'spice'")
    return {"graphics": graphics, "graphics_listen": graphics_listen}


def _running(check: Checker, table: dict, where: str) -> dict:
    """How the host runs the VM: its accelerator, whether it starts with the host, how long it may
    take to shut down."""
    timeout = check.typed(table, "shutdown_timeout", float, where, default=20, kind_name="a number of seconds")
    # Only a valid timeout becomes a float: float() of a TOML integer of 309 digits or more overflows.
    # A wrong one stays as it is, reported, so that the VM still counts for the checks of holes.
    if timeout is not None and check.within(timeout, 0, 3600, f"{where}.shutdown_timeout", " seconds"):
        timeout = float(timeout)
    return {
        "shutdown_timeout": timeout,
        "autostart": check.typed(table, "autostart", bool, where, default=True),
        "virt_type": check.choice(table, "virt_type", VIRT_TYPES, where, "auto"),
    }


def _check_unique(check: Checker, table: dict, where: str, fields: dict, owners: dict[str, dict]) -> None:
    """Name, addresses and MAC must differ between the VMs of a DMZ; `owners` remembers who has what."""
    duplicate_name = fields["name"] in owners["name"]
    for key in UNIQUE_FIELDS:
        value = fields[key]
        if value is None:
            continue
        if key == "mac" and "mac" not in table and duplicate_name:
            continue  # derived from the duplicate name, which is already reported
        if value in owners[key]:
            check.problem(f"{where}.{key}", f"{value} is already used by {owners[key][value]}; each VM needs "
                                            f"its own")
        else:
            owners[key][value] = where
