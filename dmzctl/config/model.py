"""What a valid configuration is: frozen dataclasses the renderers consume, and the defaults
derived from names (bridge, MAC, disk format), which never depend on anything but the config."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

IFNAMSIZ = 15
# Per-VM caps on the conntrack entries a VM can make the host keep (render/nft.py's `caps` chain).
# A busy web server answers flows others open (never capped: replies are established) and opens a
# few hundred of its own per second at most (DNS, a database, an API): 2000 new flows a second with
# a burst of 4000 is far above that. 20000 flows at once is ~6 MB of conntrack, under 8% of a
# 262144-entry table (this host's nf_conntrack_max): one VM alone never fills it, and about a dozen
# VMs at their caps still leave room for the host's and the LAN's own flows.
MAX_NEW_FLOWS = "2000/second"
MAX_FLOWS = 20000


@dataclass(frozen=True)
class Hole:
    """One allowed flow from the DMZ into a protected subnet."""

    to: IPNetwork
    proto: str
    ports: Optional[tuple[int, int]]  # inclusive range; None for icmp and "any port"
    source_vm: Optional[str] = None  # the VM name given in `from`
    source_net: Optional[IPNetwork] = None  # the DMZ address/prefix given in `from`
    origin: str = ""  # "dns" or "allow[N]", for messages and explain

    @property
    def family(self) -> int:
        return self.to.version


@dataclass(frozen=True)
class Publish:
    """One service of a VM opened to the outside ([[dmz.publish]])."""

    to: str  # the VM
    proto: str  # tcp | udp
    ports: tuple[int, int]  # inclusive range on the VM
    listen: Optional[Union[str, ipaddress.IPv4Address]] = None  # None, "host" or a host address (DNAT, IPv4)
    listen_port: Optional[int] = None  # the first port on `listen`; None: the VM's ports
    sources: tuple[IPNetwork, ...] = ()  # empty: from anywhere
    origin: str = ""  # "publish[N]"

    @property
    def listen_ports(self) -> tuple[int, int]:
        if self.listen_port is None:
            return self.ports
        return (self.listen_port, self.listen_port + self.ports[1] - self.ports[0])


@dataclass(frozen=True)
class EgressAllow:
    """One destination beyond the host a DMZ may reach with egress = "allowlist" ([[dmz.egress_allow]])."""

    proto: str  # tcp | udp
    ports: Optional[tuple[int, int]] = None  # a list of ranges is split into one entry per range; None: any
    to_net: Optional[IPNetwork] = None  # a prefix or an address ...
    to_name: Optional[str] = None  # ... or a DNS name, followed through the gateway's dnsmasq
    source_vm: Optional[str] = None  # `from`: one VM
    origin: str = ""  # "egress_allow[N]"


@dataclass(frozen=True)
class Image:
    """One file of a disk's chain and its format, as the config says: never read from the file,
    which the guest may have written (CVE-2010-2237/2238/2239)."""

    path: Path
    format: str  # raw | qcow2


@dataclass(frozen=True)
class Disk:
    path: Path
    format: str  # raw | qcow2
    backing: tuple[Image, ...] = ()  # the backing chain, outermost first; empty: self-contained

    @property
    def chain(self) -> tuple[Image, ...]:
        """Every file of the disk, outermost (the one the guest writes) first."""
        return (Image(self.path, self.format),) + self.backing


@dataclass(frozen=True)
class Volume:
    """An extra data disk: an empty qcow2 volume in the VM's pool, kept across down and destroy."""

    name: str
    size: int  # bytes


@dataclass(frozen=True)
class CloudInit:
    """What the NoCloud seed says ([vm.cloud_init]); the files it names were read when the config was."""

    hostname: str
    ssh_authorized_keys: tuple[str, ...] = ()
    user_data: Optional[Path] = None  # a #cloud-config merged with the above
    user_data_text: Optional[str] = None  # its content, as read


DEFAULT_POOL = "dmzctl"


@dataclass(frozen=True)
class Limits:
    """Optional caps on what one VM may take from the host ([vm.limits]); None is no cap."""

    cpu_per_vcpu: Optional[float] = None  # share of one host CPU for each vCPU, 0.01-1
    memory_max_mib: Optional[int] = None  # the whole QEMU process: guest RAM + QEMU's own
    disk_iops: Optional[int] = None  # per disk, reads + writes
    disk_bytes_per_sec: Optional[int] = None  # per disk, reads + writes
    net_to_vm_bytes_per_sec: Optional[int] = None  # what the VM's NIC receives
    net_from_vm_bytes_per_sec: Optional[int] = None  # what the VM's NIC sends

    def __bool__(self) -> bool:
        return any(value is not None for value in vars(self).values())


@dataclass(frozen=True)
class FlowCaps:
    """How many new flows a VM may open (a rate with a burst) and hold at once, counted per VM."""

    new_rate: str = MAX_NEW_FLOWS  # "N/second" (minute, hour, day)
    new_burst: int = 2 * int(MAX_NEW_FLOWS.split("/")[0])
    flows: int = MAX_FLOWS

    @property
    def rate(self) -> tuple[int, str]:
        number, per = self.new_rate.split("/")
        return int(number), per


@dataclass(frozen=True)
class VM:
    name: str
    memory_mib: int
    vcpus: int
    disks: tuple[Disk, ...]
    cdrom: Optional[Path]
    boot: str
    kernel: Optional[Path]
    initrd: Optional[Path]
    cmdline: Optional[str]
    ip: Optional[ipaddress.IPv4Address]
    ip6: Optional[ipaddress.IPv6Address]
    mac: str
    graphics: str
    shutdown_timeout: float
    autostart: bool
    virt_type: str
    domain_xml: Optional[Path] = None  # an adapted base document instead of xml/domain.xml
    graphics_listen: str = "socket"  # GRAPHICS_LISTEN
    limits: Limits = field(default_factory=Limits)
    flow_caps: Optional[FlowCaps] = None  # caps of its own (all three values); None: the DMZ's
    image: Optional[Image] = None  # a base image, never written: the root volume's backing store
    disk_size: Optional[int] = None  # bytes: the root volume's virtual size
    pool: str = DEFAULT_POOL  # the libvirt storage pool of the VM's volumes
    volumes: tuple[Volume, ...] = ()
    cloud_init: Optional[CloudInit] = None  # a seed is made for every VM with an image

    @property
    def provisioned(self) -> bool:
        """Whether dmzctl makes volumes for this VM in a pool."""
        return self.image is not None or bool(self.volumes) or self.cloud_init is not None


@dataclass(frozen=True)
class DMZ:
    name: str
    bridge: str
    mode: str
    gateway: ipaddress.IPv4Interface
    gateway6: Optional[ipaddress.IPv6Interface]
    protected: tuple[IPNetwork, ...]  # as written, collapsed, v4 first
    dns: Optional[IPAddress]
    dhcp: bool
    egress: str
    isolate_vms: bool
    log_rate: str  # "6/hour"
    log_burst: int
    holes: tuple[Hole, ...]
    vms: tuple[VM, ...]
    # The private and special ranges are blocked unless listed in a hole (dmzctl/implicit.py).
    block_private_ranges: bool = True
    source: Path = field(default=Path("<memory>"), compare=False)
    config_hash: str = ""
    flow_caps: FlowCaps = FlowCaps()  # every VM's, unless the VM has its own
    publish: tuple[Publish, ...] = ()
    egress_allow: tuple[EgressAllow, ...] = ()  # with egress = "allowlist"
    inbound: str = "any"  # "published" | "any"; parse_dmz defaults it to "published" when publish exists
    lan_inbound: bool = True  # with inbound = "published": the protected subnets still reach every port
    dns_forwarders: tuple[IPAddress, ...] = ()  # the gateway's dnsmasq asks these (default: the host's)
    masquerade: bool = False  # route mode: IPv4 leaving for beyond the host takes the host's address

    def caps_of(self, vm: VM) -> FlowCaps:
        return vm.flow_caps or self.flow_caps

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return self.gateway.network

    @property
    def subnet6(self) -> Optional[ipaddress.IPv6Network]:
        return self.gateway6.network if self.gateway6 else None

    @property
    def protected4(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(n for n in self.protected if n.version == 4)

    @property
    def protected6(self) -> tuple[ipaddress.IPv6Network, ...]:
        return tuple(n for n in self.protected if n.version == 6)

    @property
    def egress_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.to_name for e in self.egress_allow if e.to_name))

    def vm(self, name: str) -> VM:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


def default_format(path: str) -> str:
    """The format a disk has when the config names none: from its name, never from its content."""
    return "qcow2" if path.lower().endswith(".qcow2") else "raw"


def root_volume_name(vm_name: str) -> str:
    return f"{vm_name}-root.qcow2"


def seed_volume_name(vm_name: str) -> str:
    return f"{vm_name}-cidata.iso"


def data_volume_name(vm_name: str, volume: str) -> str:
    return f"{vm_name}-{volume}.qcow2"


def volume_names(vm: "VM") -> list[str]:
    """Every volume dmzctl makes for the VM in its pool: root, data volumes, seed."""
    names = [root_volume_name(vm.name)] if vm.image is not None else []
    names += [data_volume_name(vm.name, volume.name) for volume in vm.volumes]
    return names + ([seed_volume_name(vm.name)] if vm.cloud_init is not None else [])


def default_bridge(dmz_name: str) -> str:
    """`dz-<name>`, or a hashed short form when that would exceed IFNAMSIZ."""
    candidate = f"dz-{dmz_name}"
    if len(candidate) <= IFNAMSIZ:
        return candidate
    digest = hashlib.sha256(dmz_name.encode()).hexdigest()[:4]
    return f"dz-{dmz_name[:7]}-{digest}"


def default_mac(dmz_name: str, vm_name: str) -> str:
    """A stable locally administered MAC in QEMU's 52:54:00 range."""
    digest = hashlib.sha256(f"{dmz_name}/{vm_name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
