"""Per VM, what an auditor asks: how its consoles are exposed, which files are its disks (with their
declared formats and backing chains), and what it may take from the host. Pure: from the config."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DMZ, VM


@dataclass(frozen=True)
class Line:
    text: str
    warn: bool = False  # worth an auditor's attention


@dataclass(frozen=True)
class VMFacts:
    name: str
    addresses: tuple[str, ...]
    mac: str
    resources: str
    boot: str
    console: tuple[Line, ...]
    disks: tuple[Line, ...]
    limits: tuple[Line, ...]


def console_exposure(vm: VM) -> tuple[Line, ...]:
    lines = [Line("serial console: through libvirt only (dmzctl console, virsh console)")]
    if vm.graphics == "none":
        lines.append(Line("no graphical console"))
    elif vm.graphics_listen == "socket":
        lines.append(Line(f"{vm.graphics.upper()}: a UNIX socket only libvirt hands out (no TCP port)"))
    else:
        lines.append(Line(f"{vm.graphics.upper()}: TCP on 127.0.0.1, which every local user can drive "
                          f"without a password", warn=True))
    return tuple(lines)


def disk_lines(vm: VM) -> tuple[Line, ...]:
    lines = []
    for disk in vm.disks:
        chain = " ← ".join(f"{image.path} ({image.format})" for image in disk.chain)
        lines.append(Line(f"{chain}" + (" ← nothing more" if disk.backing else "")))
    if vm.cdrom is not None:
        lines.append(Line(f"cdrom {vm.cdrom} (raw, read-only)"))
    if vm.kernel is not None:
        lines.append(Line(f"kernel {vm.kernel}" + (f", initrd {vm.initrd}" if vm.initrd else "")))
    return tuple(lines) or (Line("no disk"),)


def _rate(bytes_per_sec: int) -> str:
    for unit, size in (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10)):
        if bytes_per_sec >= size:
            return f"{bytes_per_sec / size:g} {unit}"
    return f"{bytes_per_sec} B/s"


def _bits(bytes_per_sec: int) -> str:
    bits = bytes_per_sec * 8
    for unit, size in (("Gbit/s", 10 ** 9), ("Mbit/s", 10 ** 6), ("kbit/s", 10 ** 3)):
        if bits >= size:
            return f"{bits / size:g} {unit}"
    return f"{bits} bit/s"


def limit_lines(dmz: DMZ, vm: VM) -> tuple[Line, ...]:
    limits = vm.limits
    shown = [
        ("CPU", limits.cpu_per_vcpu, lambda v: f"{v:g} of a host CPU per vCPU ({v * vm.vcpus:g} CPUs in all)"),
        ("memory (whole QEMU process)", limits.memory_max_mib, lambda v: f"{v} MiB"),
        ("disk IOPS (each disk)", limits.disk_iops, str),
        ("disk bandwidth (each disk)", limits.disk_bytes_per_sec, _rate),
        ("network to the VM", limits.net_to_vm_bytes_per_sec, _bits),
        ("network from the VM", limits.net_from_vm_bytes_per_sec, _bits),
    ]
    lines = [Line(f"{what}: {show(value)}" if value is not None else f"{what}: no cap", warn=value is None)
             for what, value, show in shown]
    caps = dmz.caps_of(vm)
    whose = "its own" if vm.flow_caps is not None else "the DMZ's"
    lines.append(Line(f"new flows: {caps.new_rate}, burst {caps.new_burst}; flows at once: {caps.flows} ({whose})"))
    return tuple(lines)


def vm_facts(dmz: DMZ) -> list[VMFacts]:
    facts = []
    for vm in dmz.vms:
        addresses = tuple(str(a) for a in (vm.ip, vm.ip6) if a is not None) or ("by DHCP",)
        facts.append(VMFacts(vm.name, addresses, vm.mac, f"{vm.vcpus} vCPU, {vm.memory_mib} MiB",
                             f"{vm.boot}, {vm.virt_type}", console_exposure(vm), disk_lines(vm),
                             limit_lines(dmz, vm)))
    return facts
