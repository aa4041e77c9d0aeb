"""Reading and validating DMZ configuration files (TOML, one DMZ per file).

Everything is checked before anything is rendered; every problem found is
reported, one line each, naming the file, the field and what to do.
The result is a tree of frozen dataclasses that the renderers consume.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

DEFAULT_CONFIG_DIR = Path("/etc/dmzctl")

DMZ_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}\Z")
VM_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}\Z")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
RATE_RE = re.compile(r"^([1-9][0-9]*)/(second|minute|hour|day)\Z")
FLOW_RATE_RE = re.compile(r"^([1-9][0-9]{0,6})/(second|minute|hour|day)\Z")  # bounded: at most 7 digits
MEMORY_RE = re.compile(r"^\s*([0-9]+)\s*(KiB|MiB|GiB|K|M|G)?\s*$")
PORT_RANGE_RE = re.compile(r"^([0-9]{1,9})-([0-9]{1,9})\Z")  # bounded: int() refuses > 4300 digits

MODES = ("route", "nat", "isolated")
EGRESS = ("any", "none")
PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6", "sctp")
BOOT = ("hd", "cdrom", "kernel")
GRAPHICS = ("vnc", "spice", "none")
# socket: a UNIX socket in libvirt's per-domain directory, reached through libvirt (virt-viewer,
# virt-manager); localhost: TCP on 127.0.0.1, reachable by every local user without authentication.
GRAPHICS_LISTEN = ("socket", "localhost")
VIRT_TYPES = ("auto", "kvm", "qemu")
DISK_FORMATS = ("raw", "qcow2")
IFNAMSIZ = 15
MIN_MEMORY_MIB = 64
# Per-VM caps on the conntrack entries a VM can make the host keep (render/nft.py's `caps` chain).
# A busy web server answers flows others open (never capped: replies are established) and opens a
# few hundred of its own per second at most (DNS, a database, an API): 2000 new flows a second with
# a burst of 4000 is far above that. 20000 flows at once is ~6 MB of conntrack, under 8% of a
# 262144-entry table (this host's nf_conntrack_max): one VM alone never fills it, and about a dozen
# VMs at their caps still leave room for the host's and the LAN's own flows.
MAX_NEW_FLOWS = "2000/second"
MAX_FLOWS = 20000
MAX_CAP = 10_000_000  # nft takes 32-bit values; beyond this a cap caps nothing

DMZ_KEYS = {
    "name", "bridge", "mode", "gateway", "gateway6", "protected", "dns", "dhcp",
    "egress", "isolate_vms", "log_rate", "log_burst", "allow", "block_private_ranges",
    "max_new_flows", "max_new_flows_burst", "max_flows",
}
ALLOW_KEYS = {"to", "proto", "port", "from"}
IMAGE_KEYS = {"path", "format"}
DISK_KEYS = IMAGE_KEYS | {"backing"}
VM_KEYS = {
    "name", "memory", "vcpus", "disks", "cdrom", "boot", "kernel", "initrd",
    "cmdline", "ip", "ip6", "mac", "graphics", "shutdown_timeout", "autostart",
    "virt_type", "domain_xml", "graphics_listen", "limits", "max_new_flows", "max_new_flows_burst", "max_flows",
}
LIMIT_KEYS = {"cpu_per_vcpu", "memory_max", "disk_iops", "disk_bandwidth", "net_to_vm", "net_from_vm"}
# A rate: a number, a unit of bits or bytes (decimal k/M/G or binary Ki/Mi/Gi for bytes), optional "/s".
BYTE_RATE_RE = re.compile(r"^([0-9]{1,12}(?:\.[0-9]{1,6})?)\s*(bit|kbit|Mbit|Gbit|B|kB|KB|MB|GB|KiB|MiB|GiB)(?:/s)?\Z")
RATE_UNITS = {"bit": 1 / 8, "kbit": 1000 / 8, "Mbit": 1000 ** 2 / 8, "Gbit": 1000 ** 3 / 8, "B": 1,
              "kB": 1000, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
              "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
MIN_CPU_SHARE = 0.01  # libvirt's smallest quota, 1 ms, of the 100 ms period dmzctl uses
QEMU_OVERHEAD_MIB = 128  # memory_max must leave QEMU this much above the guest's RAM
MIN_NET_RATE = 1000  # bytes/s: libvirt's <bandwidth> counts in kB/s (tc's kbps, 1000 bytes)
MAX_DISK_LIMIT = 10 ** 15  # QEMU's throttle refuses more


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


def default_format(path: str) -> str:
    """The format a disk has when the config names none: from its name, never from its content."""
    return "qcow2" if path.lower().endswith(".qcow2") else "raw"


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

    def vm(self, name: str) -> VM:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


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


def parse_memory(value: Any) -> int:
    """MiB from an int (MiB) or a string such as '512MiB', '1GiB', '1G'."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ValueError
    match = MEMORY_RE.match(value)
    if not match:
        raise ValueError
    number, unit = int(match.group(1)), match.group(2) or "MiB"
    factor_kib = {"KiB": 1, "K": 1, "MiB": 1024, "M": 1024, "GiB": 1024 * 1024, "G": 1024 * 1024}[unit]
    kib = number * factor_kib
    if kib % 1024:
        raise ValueError
    return kib // 1024


class _Checker:
    """Collects problems for one file; each helper returns None on a bad value."""

    def __init__(self, source: Path):
        self.source = source
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}: {message}")

    def unknown_keys(self, table: dict, allowed: set, where: str) -> None:
        for key in sorted(set(table) - allowed):
            hint = _closest(key, allowed)
            suggestion = f"; did you mean '{hint}'?" if hint else f"; known keys: {', '.join(sorted(allowed))}"
            shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else repr(key)
            self.problem(f"{where}.{shown}" if where else shown, f"unknown key{suggestion}")

    def typed(self, table: dict, key: str, kind, where: str, default=None, required=False, kind_name=None):
        if key not in table:
            if required:
                self.problem(f"{where}.{key}", "required but missing")
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            self.problem(f"{where}.{key}", f"must be {kind_name or _kind_name(kind)}, got {value!r}")
            return None
        return value

    def choice(self, table: dict, key: str, choices: tuple, where: str, default: str):
        value = self.typed(table, key, str, where, default=default)
        if value is not None and value not in choices:
            self.problem(f"{where}.{key}", f"must be one of {', '.join(choices)}; got {value!r}")
            return None
        return value


def _kind_name(kind) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}.get(kind, str(kind))


def _closest(key: str, allowed: set) -> Optional[str]:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _parse_interface(check: _Checker, value: Any, where: str, version: int):
    if value is None:
        return None
    if not isinstance(value, str) or "/" not in value:
        check.problem(where, f"must be an address with its prefix length, like "
                             f"{'192.168.100.1/24' if version == 4 else 'fd00:100::1/64'}; got {value!r}")
        return None
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        check.problem(where, f"{value!r} is not a valid IPv{version} address/prefix")
        return None
    if iface.version != version:
        check.problem(where, f"must be an IPv{version} address/prefix; got {value!r}")
        return None
    return iface


def _parse_network(check: _Checker, value: Any, where: str) -> Optional[IPNetwork]:
    if not isinstance(value, str):
        check.problem(where, f"must be a string such as '192.168.1.0/24'; got {value!r}")
        return None
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            check.problem(where, f"{value!r} is not a valid address or prefix")
            return None
        check.problem(where, f"{value!r} has host bits set; did you mean '{loose}'?")
        return None


def _parse_address(check: _Checker, value: Any, where: str, version: Optional[int] = None):
    if value is None:
        return None
    if not isinstance(value, str):
        check.problem(where, f"must be an address string; got {value!r}")
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        check.problem(where, f"{value!r} is not a valid {'IPv%d ' % version if version else ''}address")
        return None
    if version and addr.version != version:
        check.problem(where, f"must be an IPv{version} address; got {value!r}")
        return None
    return addr


def _parse_ports(check: _Checker, value: Any, where: str) -> Optional[tuple[int, int]]:
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and PORT_RANGE_RE.match(value):
        low, high = (int(x) for x in PORT_RANGE_RE.match(value).groups())
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value):
        low = high = int(value)
    else:
        check.problem(where, f"must be a port number or a range 'a-b'; got {value!r}")
        return None
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        check.problem(where, f"port {value!r} is out of range; ports are 1-65535")
        return None
    if low > high:
        check.problem(where, f"range {value!r} runs backwards; write '{high}-{low}'")
        return None
    return (low, high)


def _check_gateway(check: _Checker, iface: IPInterface, where: str) -> None:
    net = iface.network
    min_prefix = 30 if iface.version == 4 else 126
    if net.prefixlen > min_prefix:
        check.problem(where, f"/{net.prefixlen} leaves no room for VMs; use /{min_prefix} or shorter")
        return
    if iface.ip == net.network_address:
        check.problem(where, f"{iface.ip} is the network address of {net}; give the host an address "
                             f"inside it, e.g. {net.network_address + 1}/{net.prefixlen}")
    elif iface.version == 4 and iface.ip == net.broadcast_address:
        check.problem(where, f"{iface.ip} is the broadcast address of {net}; give the host an address "
                             f"inside it, e.g. {net.network_address + 1}/{net.prefixlen}")


def _parse_caps(check: _Checker, table: dict, where: str, inherited: Optional[FlowCaps]) -> Optional[FlowCaps]:
    """max_new_flows / max_new_flows_burst / max_flows of [dmz] (inherited None) or of a [[vm]], which
    overrides the DMZ's value by value. None when a value is bad, or when a VM sets none of them."""
    base = inherited or FlowCaps()
    if inherited is not None and not {"max_new_flows", "max_new_flows_burst", "max_flows"} & set(table):
        return None
    ok = True
    rate = check.typed(table, "max_new_flows", str, where, default=base.new_rate)
    if rate is not None and not FLOW_RATE_RE.match(rate):
        check.problem(f"{where}.max_new_flows", f"{rate!r} must look like N/second, N/minute, N/hour or N/day "
                                                f"with N from 1 to 9999999 (e.g. '{MAX_NEW_FLOWS}')")
        rate = None
    # The burst follows the rate when only the rate is given: twice its count.
    default_burst = 2 * int(rate.split("/")[0]) if rate is not None and "max_new_flows" in table else base.new_burst
    burst = check.typed(table, "max_new_flows_burst", int, where, default=default_burst)
    flows = check.typed(table, "max_flows", int, where, default=base.flows)
    for key, value in (("max_new_flows_burst", burst), ("max_flows", flows)):
        if value is not None and key in table and not 1 <= value <= MAX_CAP:
            check.problem(f"{where}.{key}", f"{value} must be between 1 and {MAX_CAP}")
            ok = False
    if None in (rate, burst, flows) or not ok:
        return None
    return FlowCaps(new_rate=rate, new_burst=min(burst, MAX_CAP), flows=flows)


def load_dmz(path: Path) -> DMZ:
    """Read and validate one file; raise ConfigError with every problem found."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    except (ValueError, RecursionError) as exc:  # tomllib lets int()'s digit limit and deep nesting through
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    config_hash = hashlib.sha256(raw_bytes).hexdigest()
    return parse_dmz(data, path.resolve(), config_hash)


def parse_dmz(data: dict, source: Path = Path("<memory>"), config_hash: str = "") -> DMZ:
    check = _Checker(source)
    check.unknown_keys(data, {"dmz", "vm"}, "")
    dmz_table = data.get("dmz")
    if not isinstance(dmz_table, dict):
        check.problem("dmz", "required table [dmz] is missing" if dmz_table is None else "must be a table [dmz]")
        raise ConfigError(check.problems)
    check.unknown_keys(dmz_table, DMZ_KEYS, "dmz")

    name = check.typed(dmz_table, "name", str, "dmz", required=True)
    if name is not None and not DMZ_NAME_RE.match(name):
        check.problem("dmz.name", f"{name!r} must be 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit")
        name = None

    bridge = check.typed(dmz_table, "bridge", str, "dmz")
    if bridge is not None:
        if len(bridge) > IFNAMSIZ:
            check.problem("dmz.bridge", f"{bridge!r} is {len(bridge)} characters; Linux interface names "
                                        f"are at most {IFNAMSIZ}")
            bridge = None
        elif not BRIDGE_RE.match(bridge):
            check.problem("dmz.bridge", f"{bridge!r} may use only letters, digits, '-', '_' and '.'")
            bridge = None
    elif name is not None:
        bridge = default_bridge(name)

    mode = check.choice(dmz_table, "mode", MODES, "dmz", "route")
    gateway = _parse_interface(check, check.typed(dmz_table, "gateway", str, "dmz", required=True),
                               "dmz.gateway", 4)
    if gateway is not None:
        _check_gateway(check, gateway, "dmz.gateway")
    gateway6 = _parse_interface(check, check.typed(dmz_table, "gateway6", str, "dmz"), "dmz.gateway6", 6)
    if gateway6 is not None:
        _check_gateway(check, gateway6, "dmz.gateway6")

    protected: list[IPNetwork] = []
    raw_protected = check.typed(dmz_table, "protected", list, "dmz", required=True)
    if raw_protected is not None:
        if not raw_protected:
            check.problem("dmz.protected", "needs at least one subnet the DMZ must never reach, "
                                           "e.g. ['192.168.1.0/24']")
        for index, value in enumerate(raw_protected):
            net = _parse_network(check, value, f"dmz.protected[{index + 1}]")
            if net is None:
                continue
            for dmz_net, label in ((gateway and gateway.network, "dmz.gateway"),
                                   (gateway6 and gateway6.network, "dmz.gateway6")):
                if dmz_net is not None and dmz_net.version == net.version and dmz_net.overlaps(net):
                    check.problem(f"dmz.protected[{index + 1}]",
                                  f"{net} overlaps the DMZ subnet {dmz_net} ({label}); the DMZ would be "
                                  f"blocked from itself and the protection silently defeated: pick "
                                  f"non-overlapping subnets")
                    net = None
                    break
            if net is not None:
                protected.append(net)
    collapsed = tuple(ipaddress.collapse_addresses(n for n in protected if n.version == 4)) + \
        tuple(ipaddress.collapse_addresses(n for n in protected if n.version == 6))

    dns = _parse_address(check, check.typed(dmz_table, "dns", str, "dmz"), "dmz.dns")
    if dns is not None and dns.version == 6 and gateway6 is None:
        check.problem("dmz.dns", f"{dns} is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)")
    dhcp = check.typed(dmz_table, "dhcp", bool, "dmz", default=True)
    egress = check.choice(dmz_table, "egress", EGRESS, "dmz", "any")
    isolate_vms = check.typed(dmz_table, "isolate_vms", bool, "dmz", default=False)
    block_private = check.typed(dmz_table, "block_private_ranges", bool, "dmz", default=True)
    log_rate = check.typed(dmz_table, "log_rate", str, "dmz", default="6/hour")
    if log_rate is not None and not RATE_RE.match(log_rate):
        check.problem("dmz.log_rate", f"{log_rate!r} must look like N/second, N/minute, N/hour or N/day (e.g. '6/hour')")
    log_burst = check.typed(dmz_table, "log_burst", int, "dmz", default=5)
    if log_burst is not None and not 1 <= log_burst <= 10000:
        check.problem("dmz.log_burst", f"{log_burst} must be between 1 and 10000")

    flow_caps = _parse_caps(check, dmz_table, "dmz", None)
    vms = _parse_vms(check, data.get("vm", []), name, gateway, gateway6, dhcp, flow_caps)
    declared = {t["name"] for t in data.get("vm", []) if isinstance(t, dict) and isinstance(t.get("name"), str)} \
        if isinstance(data.get("vm", []), list) else set()

    holes: list[Hole] = []
    if dns is not None:
        for proto in ("udp", "tcp"):
            holes.append(Hole(to=ipaddress.ip_network(dns), proto=proto, ports=(53, 53), origin="dns"))
    raw_allow = check.typed(dmz_table, "allow", list, "dmz", default=[], kind_name="a list of [[dmz.allow]] tables")
    for index, entry in enumerate(raw_allow or []):
        hole = _parse_hole(check, entry, f"dmz.allow[{index + 1}]", collapsed, gateway, gateway6, vms, declared)
        if hole is not None:
            holes.append(hole)
    if mode == "isolated":
        # libvirt's isolated network rejects every packet forwarded out of the DMZ,
        # after dmzctl's table: a hole would be accepted by one and dropped by the other.
        for where in dict.fromkeys("dmz.dns" if hole.origin == "dns" else f"dmz.{hole.origin}" for hole in holes):
            check.problem(where, "mode 'isolated' forwards nothing out of the DMZ, so this hole cannot work; "
                                 "use mode 'route' or 'nat' (the gateway's own DNS needs no hole)")

    if check.problems:
        raise ConfigError(check.problems)
    return DMZ(
        name=name, bridge=bridge, mode=mode, gateway=gateway, gateway6=gateway6,
        protected=collapsed, dns=dns, dhcp=dhcp, egress=egress, isolate_vms=isolate_vms,
        log_rate=log_rate, log_burst=log_burst, holes=tuple(holes), vms=tuple(vms),
        block_private_ranges=block_private, source=source, config_hash=config_hash, flow_caps=flow_caps,
    )


def _parse_hole(check, entry, where, protected, gateway, gateway6, vms, declared=frozenset()) -> Optional[Hole]:
    if not isinstance(entry, dict):
        check.problem(where, "must be a table [[dmz.allow]]")
        return None
    check.unknown_keys(entry, ALLOW_KEYS, where)
    to = check.typed(entry, "to", str, where, required=True)
    proto = check.choice(entry, "proto", PROTOCOLS, where, default=None) if "proto" in entry else None
    if "proto" not in entry:
        check.problem(f"{where}.proto", f"required but missing; one of {', '.join(PROTOCOLS)}")
    target = None
    if to is not None:
        try:
            target = ipaddress.ip_network(to, strict=True)
        except ValueError:
            check.problem(f"{where}.to", f"{to!r} is not a valid address or prefix")
    own = [net for net in (gateway and gateway.network, gateway6 and gateway6.network) if net is not None]
    if target is not None and any(target.version == net.version and target.overlaps(net) for net in own):
        check.problem(f"{where}.to", f"{target} is inside the DMZ itself; traffic between its VMs follows "
                                     f"dmz.isolate_vms, not holes")
        target = None
    if target is not None and target.version == 6 and gateway6 is None:
        check.problem(f"{where}.to", f"{target} is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)")
        target = None
    if target is not None and proto in ("icmp", "icmpv6"):
        wanted = "icmp" if target.version == 4 else "icmpv6"
        if proto != wanted:
            check.problem(f"{where}.proto", f"{proto} does not go to an IPv{target.version} address; use {wanted}")
            proto = None
    ports = None
    if "port" in entry:
        if proto in ("icmp", "icmpv6"):
            check.problem(f"{where}.port", f"{proto} has no ports; remove 'port'")
            proto = None
        else:
            ports = _parse_ports(check, entry["port"], f"{where}.port")
            if ports is None:
                proto = None
    source_vm = source_net = None
    if "from" in entry:
        source = entry["from"]
        by_name = {vm.name: vm for vm in vms}
        if not isinstance(source, str):
            check.problem(f"{where}.from", f"must be a VM name or a DMZ address; got {source!r}")
            return None
        if source in by_name:
            source_vm = source
            vm = by_name[source]
            if target is not None:
                addr = vm.ip if target.version == 4 else vm.ip6
                if addr is None:
                    check.problem(f"{where}.from", f"VM {source!r} has no static IPv{target.version} address "
                                                   f"(vm.{'ip' if target.version == 4 else 'ip6'}); a hole from a VM "
                                                   f"needs one to match on")
                    return None
        elif source in declared:
            return None  # a VM of this DMZ whose own problems are already reported
        else:
            try:
                source_net = ipaddress.ip_network(source, strict=True)
            except ValueError:
                check.problem(f"{where}.from", f"{source!r} is neither a VM of this DMZ nor an address")
                return None
            dmz_net = gateway.network if source_net.version == 4 and gateway else (
                gateway6.network if source_net.version == 6 and gateway6 else None)
            if dmz_net is None or not source_net.subnet_of(dmz_net):
                check.problem(f"{where}.from", f"{source_net} is not inside the DMZ subnet")
                return None
            if target is not None and source_net.version != target.version:
                check.problem(f"{where}.from", f"{source_net} and {target} are of different IP versions")
                return None
    if target is None or proto is None:
        return None
    return Hole(to=target, proto=proto, ports=ports, source_vm=source_vm, source_net=source_net,
                origin=where.removeprefix("dmz."))


def _parse_vms(check, raw_vms, dmz_name, gateway, gateway6, dhcp, dmz_caps=None) -> list[VM]:
    if not isinstance(raw_vms, list):
        check.problem("vm", "must be an array of tables [[vm]]")
        return []
    vms: list[VM] = []
    seen: dict[str, dict] = {"name": {}, "ip": {}, "ip6": {}, "mac": {}}
    for index, table in enumerate(raw_vms):
        if not isinstance(table, dict):
            check.problem(f"vm[{index + 1}]", "must be a table [[vm]]")
            continue
        raw_name = table.get("name")
        where = f"vm[{raw_name}]" if isinstance(raw_name, str) and VM_NAME_RE.match(raw_name) else f"vm[#{index + 1}]"
        check.unknown_keys(table, VM_KEYS, where)
        name = check.typed(table, "name", str, where, required=True)
        if name is not None and not VM_NAME_RE.match(name):
            check.problem(f"{where}.name", f"{name!r} must be 1-48 characters of a-z, 0-9 and '-', "
                                           f"starting with a letter or digit")
            name = None

        memory = None
        if "memory" in table:
            try:
                memory = parse_memory(table["memory"])
            except ValueError:
                check.problem(f"{where}.memory", f"{table['memory']!r} must be an integer (MiB) or a size "
                                                 f"such as '512MiB' or '2GiB'")
        else:
            memory = 512
        if memory is not None and memory < MIN_MEMORY_MIB:
            check.problem(f"{where}.memory", f"{memory} MiB is too little; at least {MIN_MEMORY_MIB} MiB")
            memory = None
        vcpus = check.typed(table, "vcpus", int, where, default=1)
        if vcpus is not None and not 1 <= vcpus <= 256:
            check.problem(f"{where}.vcpus", f"{vcpus} must be between 1 and 256")

        disks: list[Disk] = []
        raw_disks = check.typed(table, "disks", list, where, default=[])
        for disk_index, entry in enumerate(raw_disks or []):
            disk = _parse_disk(check, entry, f"{where}.disks[{disk_index + 1}]")
            if disk is not None:
                disks.append(disk)
        paths = {}
        for key in ("cdrom", "kernel", "initrd", "domain_xml"):
            value = check.typed(table, key, str, where)
            if value is not None and not value.startswith("/"):
                check.problem(f"{where}.{key}", f"must be an absolute path; got {value!r}")
                value = None
            paths[key] = Path(value) if value else None
        cmdline = check.typed(table, "cmdline", str, where)
        default_boot = "kernel" if paths["kernel"] else "hd"
        boot = check.choice(table, "boot", BOOT, where, default_boot)
        if boot == "cdrom" and paths["cdrom"] is None:
            check.problem(f"{where}.boot", "'cdrom' needs vm.cdrom, the image to boot from")
        if boot == "kernel" and paths["kernel"] is None:
            check.problem(f"{where}.boot", "'kernel' needs vm.kernel, the kernel image to boot")
        # Disks given but wrong are reported on their own, not also as "nothing to boot".
        no_disks = raw_disks is not None and not raw_disks
        if boot == "hd" and no_disks and "boot" in table:
            check.problem(f"{where}.boot", "'hd' needs at least one entry in vm.disks")
        if boot == "hd" and no_disks and "boot" not in table:
            check.problem(where, "nothing to boot: give vm.disks, vm.kernel or vm.cdrom with boot = 'cdrom'")
        for key in ("initrd",):
            if paths[key] is not None and paths["kernel"] is None:
                check.problem(f"{where}.{key}", "only makes sense with vm.kernel (direct kernel boot)")
        if cmdline is not None and paths["kernel"] is None:
            check.problem(f"{where}.cmdline", "only makes sense with vm.kernel (direct kernel boot)")

        ip = _parse_address(check, check.typed(table, "ip", str, where), f"{where}.ip", 4)
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
        if ip is None and "ip" not in table and dhcp is False:
            check.problem(f"{where}.ip", "required when dmz.dhcp is false (the anti-spoofing filter binds the "
                                         "VM to its address)")
        ip6 = _parse_address(check, check.typed(table, "ip6", str, where), f"{where}.ip6", 6)
        if ip6 is not None:
            if gateway6 is None:
                check.problem(f"{where}.ip6", "the DMZ has no IPv6; set dmz.gateway6 first")
                ip6 = None
            elif ip6 not in gateway6.network:
                check.problem(f"{where}.ip6", f"{ip6} is outside the DMZ subnet {gateway6.network}")
                ip6 = None
            elif ip6 == gateway6.ip or ip6 == gateway6.network.network_address:
                check.problem(f"{where}.ip6", f"{ip6} is the gateway or the subnet-router anycast address; "
                                              f"pick another")
                ip6 = None

        mac = check.typed(table, "mac", str, where)
        if mac is not None:
            mac = mac.lower()
            if not MAC_RE.match(mac):
                check.problem(f"{where}.mac", f"{table['mac']!r} is not a MAC address like 52:54:00:12:34:56")
                mac = None
            elif int(mac[:2], 16) & 1:
                check.problem(f"{where}.mac", f"{mac} is a multicast address; a NIC needs a unicast one")
                mac = None
        elif name is not None and dmz_name is not None:
            mac = default_mac(dmz_name, name)

        graphics = check.choice(table, "graphics", GRAPHICS, where, "vnc")
        graphics_listen = check.choice(table, "graphics_listen", GRAPHICS_LISTEN, where, "socket")
        if "graphics_listen" in table and graphics == "none":
            check.problem(f"{where}.graphics_listen", "only makes sense with graphics 'vnc' or 'spice'")
        # A disk given but invalid is reported as such, not as "no disk to limit".
        limits = _parse_limits(check, table, where, memory, bool(table.get("disks")) or "cdrom" in table)
        timeout = check.typed(table, "shutdown_timeout", float, where, default=20, kind_name="a number of seconds")
        if timeout is not None and not 0 <= timeout <= 3600:
            check.problem(f"{where}.shutdown_timeout", f"{timeout} must be between 0 and 3600 seconds")
        autostart = check.typed(table, "autostart", bool, where, default=True)
        virt_type = check.choice(table, "virt_type", VIRT_TYPES, where, "auto")
        flow_caps = _parse_caps(check, table, where, dmz_caps or FlowCaps())

        duplicate_name = name in seen["name"]
        for key, value in (("name", name), ("ip", ip), ("ip6", ip6), ("mac", mac)):
            if value is None:
                continue
            if key == "mac" and "mac" not in table and duplicate_name:
                continue  # derived from the duplicate name, which is already reported
            if value in seen[key]:
                check.problem(f"{where}.{key}", f"{value} is already used by {seen[key][value]}; each VM needs "
                                                f"its own")
            else:
                seen[key][value] = where
        if None in (name, memory, vcpus, boot, mac, graphics, graphics_listen, limits, timeout, autostart,
                    virt_type):
            continue
        if ("ip" in table and ip is None) or ("ip6" in table and ip6 is None):
            continue  # already reported; holes `from` it must not claim it has no address
        vms.append(VM(
            name=name, memory_mib=memory, vcpus=vcpus, disks=tuple(disks), cdrom=paths["cdrom"],
            boot=boot, kernel=paths["kernel"], initrd=paths["initrd"], cmdline=cmdline, ip=ip, ip6=ip6,
            mac=mac, graphics=graphics, shutdown_timeout=float(timeout), autostart=autostart,
            virt_type=virt_type, domain_xml=paths["domain_xml"], graphics_listen=graphics_listen,
            limits=limits, flow_caps=flow_caps if flow_caps != (dmz_caps or FlowCaps()) else None,
        ))
    return vms


def _parse_image(check: _Checker, entry: Any, where: str, keys: set) -> Optional[Image]:
    """A path string (format from its extension) or a table { path = ..., format = ... }."""
    if isinstance(entry, str):
        path, chosen = entry, default_format(entry)
        if not path.startswith("/"):
            check.problem(where, f"must be an absolute path; got {path!r}")
            return None
        return Image(Path(path), chosen)
    if not isinstance(entry, dict):
        check.problem(where, f"must be an absolute path or a table {{ path = \"/...\", format = \"raw\" }}; "
                             f"got {entry!r}")
        return None
    check.unknown_keys(entry, keys, where)
    path = check.typed(entry, "path", str, where, required=True)
    if path is not None and not path.startswith("/"):
        check.problem(f"{where}.path", f"must be an absolute path; got {path!r}")
        path = None
    chosen = check.choice(entry, "format", DISK_FORMATS, where, default_format(path or ""))
    if path is None or chosen is None:
        return None
    return Image(Path(path), chosen)


def _parse_disk(check: _Checker, entry: Any, where: str) -> Optional[Disk]:
    top = _parse_image(check, entry, where, DISK_KEYS)
    raw_backing = entry.get("backing", []) if isinstance(entry, dict) else []
    if not isinstance(raw_backing, list):
        check.problem(f"{where}.backing", f"must be a list of files, outermost first, each a path or "
                                          f"{{ path = ..., format = ... }}; got {raw_backing!r}")
        return None
    layers = [_parse_image(check, layer, f"{where}.backing[{index + 1}]", IMAGE_KEYS)
              for index, layer in enumerate(raw_backing)]
    if top is not None and top.format == "raw" and raw_backing:
        check.problem(f"{where}.backing", "a raw disk has no backing file; set format = \"qcow2\" or "
                                          "remove backing")
        return None
    seen = {top.path} if top is not None else set()
    for index, layer in enumerate(layers):
        if layer is None:
            continue
        if layer.format == "raw" and index < len(layers) - 1:
            check.problem(f"{where}.backing[{index + 1}]", f"{layer.path} is raw, so it has no backing file: "
                                                           f"a raw layer can only come last")
        if layer.path in seen:
            check.problem(f"{where}.backing[{index + 1}]", f"{layer.path} is already in this disk's chain; "
                                                           f"a chain cannot loop")
        seen.add(layer.path)
    if top is None or None in layers:
        return None
    return Disk(top.path, top.format, tuple(layers))


def parse_rate(value: Any) -> float:
    """Bytes per second from a string such as '100Mbit/s', '50MiB/s' or '10MB'."""
    match = BYTE_RATE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


def _parse_limits(check: _Checker, table: dict, where: str, memory: Optional[int],
                  has_disk: bool) -> Optional[Limits]:
    """[vm.limits]; None when it has a problem (already reported)."""
    raw = check.typed(table, "limits", dict, where, default={}, kind_name="a table [vm.limits]")
    if raw is None:
        return None
    where = f"{where}.limits"
    check.unknown_keys(raw, LIMIT_KEYS, where)
    ok = not (set(raw) - LIMIT_KEYS)

    cpu = check.typed(raw, "cpu_per_vcpu", float, where, kind_name="a number (share of one host CPU)")
    if cpu is not None and not MIN_CPU_SHARE <= cpu <= 1:
        check.problem(f"{where}.cpu_per_vcpu", f"{cpu} must be between {MIN_CPU_SHARE} and 1 (a share of one "
                                               f"host CPU for each vCPU; leave it out for no cap)")
        cpu = None
    ok &= cpu is not None or "cpu_per_vcpu" not in raw

    memory_max = None
    if "memory_max" in raw:
        try:
            memory_max = parse_memory(raw["memory_max"])
        except ValueError:
            check.problem(f"{where}.memory_max", f"{raw['memory_max']!r} must be a size such as '1GiB' or "
                                                 f"'768MiB' (an integer is MiB)")
        if memory_max is not None and memory is not None and memory_max < memory + QEMU_OVERHEAD_MIB:
            check.problem(f"{where}.memory_max", f"{memory_max} MiB leaves QEMU too little above the guest's "
                                                 f"{memory} MiB (vm.memory); the kernel would kill the VM: give "
                                                 f"at least {memory + QEMU_OVERHEAD_MIB} MiB")
            memory_max = None
        ok &= memory_max is not None

    iops = check.typed(raw, "disk_iops", int, where)
    if iops is not None and not 1 <= iops <= MAX_DISK_LIMIT:
        check.problem(f"{where}.disk_iops", f"{iops} must be between 1 and {MAX_DISK_LIMIT}")
        iops = None
    ok &= iops is not None or "disk_iops" not in raw

    rates = {}
    for key in ("disk_bandwidth", "net_to_vm", "net_from_vm"):
        if key not in raw:
            continue
        try:
            rate = parse_rate(raw[key])
        except ValueError:
            check.problem(f"{where}.{key}", f"{raw[key]!r} must be a rate with its unit, such as '100Mbit/s', "
                                            f"'50MiB/s' or '10MB/s'")
            ok = False
            continue
        minimum = MIN_NET_RATE if key.startswith("net") else 1
        if not minimum <= rate <= MAX_DISK_LIMIT:
            check.problem(f"{where}.{key}", f"{raw[key]!r} is out of range; use between "
                                            f"{'8kbit/s' if minimum > 1 else '1B/s'} and 1000TB/s")
            ok = False
            continue
        rates[key] = round(rate)

    for key in ("disk_iops", "disk_bandwidth"):
        if key in raw and not has_disk:
            check.problem(f"{where}.{key}", "the VM has no disk to limit (vm.disks, vm.cdrom)")
            ok = False
    if not ok:
        return None
    return Limits(cpu_per_vcpu=cpu, memory_max_mib=memory_max, disk_iops=iops,
                  disk_bytes_per_sec=rates.get("disk_bandwidth"), net_to_vm_bytes_per_sec=rates.get("net_to_vm"),
                  net_from_vm_bytes_per_sec=rates.get("net_from_vm"))


def load_all(paths: list[Path]) -> list[DMZ]:
    """Load several files and check what must be unique across DMZs on one host."""
    problems: list[str] = []
    dmzs: list[DMZ] = []
    for path in paths:
        try:
            dmzs.append(load_dmz(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    owners: dict[tuple, str] = {}
    for dmz in dmzs:
        keys = [(("network", dmz.name), "dmz.name"), (("bridge", dmz.bridge), "dmz.bridge")]
        keys += [(("domain", vm.name), f"vm[{vm.name}].name") for vm in dmz.vms]
        for key, where in keys:
            if key in owners:
                problems.append(f"{dmz.source}: {where}: {key[1]!r} is also used by {owners[key]}")
            else:
                owners[key] = str(dmz.source)
    for i, first in enumerate(dmzs):
        for second in dmzs[i + 1:]:
            for a, b, label in ((first.subnet, second.subnet, "dmz.gateway"),
                                (first.subnet6, second.subnet6, "dmz.gateway6")):
                if a is not None and b is not None and a.overlaps(b):
                    problems.append(f"{second.source}: {label}: subnet {b} overlaps {a} of {first.source}")
    if problems:
        raise ConfigError(problems)
    return dmzs


def default_config_paths(directory: Path = DEFAULT_CONFIG_DIR) -> list[Path]:
    return sorted(directory.glob("*.toml"))
