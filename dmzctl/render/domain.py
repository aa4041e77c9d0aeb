"""A DMZ VM's libvirt domain: resources and their caps, boot, disks, the filtered DMZ NIC, consoles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lxml import etree

from ..config import DMZ, VM, Image, Limits
from .base import load_base, metadata_element, place_before, replace_child, stable_uuid, sub, xml_dir
from .nwfilter import vm_filter_name, vm_filter_parameters
from .seed import seed_digest
from .storage import data_volume_path, root_volume_path, seed_volume_path


@dataclass(frozen=True)
class HostFacts:
    """What rendering needs to know about the host, gathered by the host layer.

    kvm_usable: libvirt offers kvm AND the CPU has vmx/svm (libvirt lists kvm on
    hosts where guests then die with "KVM internal error").
    virt_type_override: "kvm" or "qemu" for the whole host ($DMZCTL_VIRT_TYPE).
    Nothing about disks: their formats come from the config alone (see _disks).
    """

    kvm_usable: bool = False
    virt_type_override: Optional[str] = None
    pool_paths: tuple[tuple[str, str], ...] = ()  # (pool, target directory) of the pools the VMs name

    @property
    def pools(self) -> dict[str, str]:
        return dict(self.pool_paths)


def virt_type(vm: VM, facts: HostFacts) -> str:
    if vm.virt_type != "auto":
        return vm.virt_type
    if facts.virt_type_override:
        return facts.virt_type_override
    return "kvm" if facts.kvm_usable else "qemu"


def render_domain(dmz: DMZ, vm: VM, facts: HostFacts = HostFacts(),
                  base: Optional[etree._Element] = None) -> etree._Element:
    dom = base if base is not None else load_base(xml_dir() / "domain.xml")
    kind = virt_type(vm, facts)
    dom.set("type", kind)
    head = ("metadata", "memory", "currentMemory", "vcpu", "os", "features", "cpu", "clock", "devices")
    for tag in ("name", "uuid"):
        replace_child(dom, tag, before=head)
    dom.find("name").text = vm.name
    dom.find("uuid").text = stable_uuid("domain", dmz.name, vm.name)
    seed = {"seed": seed_digest(dmz, vm)} if vm.cloud_init is not None else {}
    metadata_element(dom, "vm", dmz=dmz.name, config=str(dmz.source), hash=dmz.config_hash, **seed)
    dom.find("uuid").addnext(dom.find("metadata"))

    memory_kib = str(vm.memory_mib * 1024)
    for tag in ("memory", "currentMemory", "vcpu"):
        replace_child(dom, tag, before=("os", "features", "cpu", "clock", "devices"))
    dom.find("memory").set("unit", "KiB")
    dom.find("memory").text = memory_kib
    dom.find("currentMemory").set("unit", "KiB")
    dom.find("currentMemory").text = memory_kib
    dom.find("vcpu").set("placement", "static")
    dom.find("vcpu").text = str(vm.vcpus)

    _render_os(dom, vm)
    for old in dom.findall("cpu"):
        dom.remove(old)
    if kind == "kvm":
        replace_child(dom, "cpu", before=("clock", "devices")).set("mode", "host-passthrough")

    devices = dom.find("devices")
    if devices is None:
        devices = sub(dom, "devices")
    for tag in ("disk", "interface", "graphics", "video"):
        for old in devices.findall(tag):
            devices.remove(old)
    # libvirt keeps devices grouped by kind; insert ours ahead of the base's own.
    ours = _disks(vm, facts.pools) + [_interface(dmz, vm)] + _graphics(vm)
    for element in reversed(ours):
        devices.insert(0, element)
    _render_limits(dom, vm)
    for serial in devices.findall("serial"):
        if serial.find("log") is None:
            # virtlogd keeps what the guest printed, for the admin (and the tests) to read.
            sub(serial, "log", file=serial_log_path(vm), append="off")
    return dom


def serial_log_path(vm: VM) -> str:
    return f"/var/log/libvirt/qemu/{vm.name}-serial.log"


def _render_os(dom: etree._Element, vm: VM) -> None:
    os_el = dom.find("os")
    if os_el is None:
        os_el = replace_child(dom, "os", before=("features", "cpu", "clock", "devices"))
    if os_el.find("type") is None:
        sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    for tag in ("boot", "kernel", "initrd", "cmdline"):
        for old in os_el.findall(tag):
            os_el.remove(old)
    if vm.kernel is not None:
        sub(os_el, "kernel", str(vm.kernel))
        if vm.initrd is not None:
            sub(os_el, "initrd", str(vm.initrd))
        if vm.cmdline is not None:
            sub(os_el, "cmdline", vm.cmdline)
    if vm.boot == "cdrom":
        sub(os_el, "boot", dev="cdrom")
        sub(os_el, "boot", dev="hd")
    elif vm.boot == "hd" or vm.disks:
        sub(os_el, "boot", dev="hd")


def disk_target(index: int) -> str:
    return f"vd{chr(ord('a') + index)}"


def _disks(vm: VM, pools: dict[str, str]) -> list[etree._Element]:
    """Each disk with the format the config gives it and its whole backing chain spelled out:
    the root volume (over the base image) first, then vm.disks, then the data volumes.

    A guest can write anything into its disk, a qcow2 header naming a host file as backing
    file included: so no format is ever read from an image, and libvirt is told every layer
    and where the chain ends, leaving it nothing to probe.
    """
    chains: list[tuple[str, str, tuple[Image, ...]]] = []
    if vm.image is not None:
        chains.append((str(root_volume_path(vm, pools)), "qcow2", (vm.image,)))
    chains += [(str(disk.path), disk.format, disk.backing) for disk in vm.disks]
    chains += [(str(data_volume_path(vm, volume, pools)), "qcow2", ()) for volume in vm.volumes]
    disks = []
    for index, (path, fmt, backing) in enumerate(chains):
        disk = etree.Element("disk", type="file", device="disk")
        sub(disk, "driver", name="qemu", type=fmt)
        sub(disk, "source", file=path)
        # The base image of a root volume is shared by every VM made from it: libvirt must not
        # hand it to QEMU's user (it never gives a shared backing file back).
        _backing_chain(disk, backing, shared=vm.image is not None and index == 0)
        sub(disk, "target", dev=disk_target(index), bus="virtio")
        disks.append(disk)
    cdroms = [str(vm.cdrom)] if vm.cdrom is not None else []
    cdroms += [str(seed_volume_path(vm, pools))] if vm.cloud_init is not None else []
    for path, target in zip(cdroms, ("hdc", "hdd")):
        cdrom = etree.Element("disk", type="file", device="cdrom")
        sub(cdrom, "driver", name="qemu", type="raw")
        sub(cdrom, "source", file=path)
        _backing_chain(cdrom, ())
        sub(cdrom, "target", dev=target, bus="ide")
        sub(cdrom, "readonly")
        disks.append(cdrom)
    return disks


def _backing_chain(parent: etree._Element, layers: tuple[Image, ...], shared: bool = False) -> None:
    """Nested <backingStore> elements, outermost first, each with its format; the innermost
    holds an empty <backingStore/>: the chain ends there, whatever a header says. A shared
    chain's files are left as they are (no DAC relabelling): they must be readable by QEMU."""
    for layer in layers:
        parent = sub(parent, "backingStore", type="file")
        sub(parent, "format", type=layer.format)
        source = sub(parent, "source", file=str(layer.path))
        if shared:
            sub(source, "seclabel", model="dac", relabel="no")
    sub(parent, "backingStore")


def _interface(dmz: DMZ, vm: VM) -> etree._Element:
    nic = etree.Element("interface", type="network")
    sub(nic, "mac", address=vm.mac)
    sub(nic, "source", network=dmz.name)
    sub(nic, "model", type="virtio")
    filterref = sub(nic, "filterref", filter=vm_filter_name(dmz, vm))
    for name, value in vm_filter_parameters(dmz, vm):
        sub(filterref, "parameter", name=name, value=value)
    if dmz.isolate_vms:
        # The bridge forwards nothing between isolated ports: VM to VM is cut at layer 2.
        sub(nic, "port", isolated="yes")
    return nic


def _graphics(vm: VM) -> list[etree._Element]:
    if vm.graphics == "none":
        return []
    if vm.graphics_listen == "socket":
        # A UNIX socket in libvirt's per-domain directory (0750 libvirt-qemu): no TCP port at
        # all, so only who may open the domain through libvirt reaches the console
        # (virt-viewer and virt-manager get it by openGraphicsFD).
        graphics = etree.Element("graphics", type=vm.graphics)
        sub(graphics, "listen", type="socket")
    else:
        # On loopback when asked: any local user can then connect, unauthenticated.
        # Never on other addresses: the original's VNC listened on every interface.
        graphics = etree.Element("graphics", type=vm.graphics, autoport="yes", listen="127.0.0.1")
        sub(graphics, "listen", type="address", address="127.0.0.1")
    video = etree.Element("video")
    sub(video, "model", type="virtio" if vm.graphics == "spice" else "vga")
    return [graphics, video]


# libvirt's order of the domain's top-level elements, for placing the tuning ones.
AFTER_MEMTUNE = ("memoryBacking", "vcpu", "iothreads", "cputune", "numatune", "resource", "sysinfo", "os",
                 "features", "cpu", "clock", "devices")
AFTER_CPUTUNE = AFTER_MEMTUNE[AFTER_MEMTUNE.index("cputune") + 1:]
CPU_PERIOD_US = 100_000  # the CFS default: a cap is enforced within every 100 ms
NET_RATE_UNIT = 1000  # <bandwidth> average is in kB/s: libvirt hands tc "kbps", 1000 bytes/s


def _render_limits(dom: etree._Element, vm: VM) -> None:
    """[vm.limits] as libvirt's tunables. Only what is set is touched: an adapted base
    document's own <cputune> (pinning, shares) or <memtune> stays as it is."""
    limits: Limits = vm.limits
    if limits.memory_max_mib is not None:
        memtune = _tune_element(dom, "memtune", AFTER_MEMTUNE)
        _set_child(memtune, "hard_limit", str(limits.memory_max_mib * 1024), unit="KiB")
    if limits.cpu_per_vcpu is not None:
        cputune = _tune_element(dom, "cputune", AFTER_CPUTUNE)
        quota = round(limits.cpu_per_vcpu * CPU_PERIOD_US)
        # Each vCPU thread gets its share, and the whole domain (QEMU's emulator threads
        # too) the vCPUs' sum, so device emulation cannot take more on the guest's behalf.
        for tag, value in (("global_period", CPU_PERIOD_US), ("global_quota", quota * vm.vcpus),
                           ("period", CPU_PERIOD_US), ("quota", quota)):
            _set_child(cputune, tag, str(value))
    if limits.disk_iops is not None or limits.disk_bytes_per_sec is not None:
        for disk in dom.iterfind("devices/disk"):
            iotune = disk.find("iotune")
            if iotune is None:
                iotune = etree.Element("iotune")
                anchor = disk.find("target")  # libvirt's order: ... target, iotune, ...
                (anchor.addnext if anchor is not None else disk.append)(iotune)
            if limits.disk_bytes_per_sec is not None:
                _set_child(iotune, "total_bytes_sec", str(limits.disk_bytes_per_sec))
            if limits.disk_iops is not None:
                _set_child(iotune, "total_iops_sec", str(limits.disk_iops))
    to_vm, from_vm = limits.net_to_vm_bytes_per_sec, limits.net_from_vm_bytes_per_sec
    if to_vm is not None or from_vm is not None:
        nic = dom.find("devices/interface")
        bandwidth = nic.find("bandwidth")
        if bandwidth is None:
            bandwidth = etree.Element("bandwidth")
            nic.find("model").addnext(bandwidth)
        # libvirt's directions are the VM's: inbound is what the VM receives.
        for tag, rate in (("inbound", to_vm), ("outbound", from_vm)):
            if rate is not None:
                _set_child(bandwidth, tag, None, average=str(max(1, round(rate / NET_RATE_UNIT))))


def _tune_element(dom: etree._Element, tag: str, before: tuple[str, ...]) -> etree._Element:
    """The domain's <tag>, kept with its children if the base has one, placed where libvirt puts it."""
    element = dom.find(tag)
    if element is None:
        element = etree.Element(tag)
    else:
        dom.remove(element)
    return place_before(dom, element, before)


def _set_child(parent: etree._Element, tag: str, text: Optional[str], **attrib: str) -> etree._Element:
    for old in parent.findall(tag):
        parent.remove(old)
    return sub(parent, tag, text, **attrib)
