"""What one VM may take from the host: [vm.limits] (CPU, memory, disk and NIC rates) and the
flow caps (new flows a second, flows at once) of [dmz] and of each [[vm]]."""

from __future__ import annotations

import re
from typing import Optional

from .checker import Checker, parse_memory, parse_rate
from .model import MAX_NEW_FLOWS, FlowCaps, Limits

LIMIT_KEYS = {"cpu_per_vcpu", "memory_max", "disk_iops", "disk_bandwidth", "net_to_vm", "net_from_vm"}
RATE_KEYS = ("disk_bandwidth", "net_to_vm", "net_from_vm")
MIN_CPU_SHARE = 0.01  # libvirt's smallest quota, 1 ms, of the 100 ms period dmzctl uses
QEMU_OVERHEAD_MIB = 128  # memory_max must leave QEMU this much above the guest's RAM
MIN_NET_RATE = 1000  # bytes/s: libvirt's <bandwidth> counts in kB/s (tc's kbps, 1000 bytes)
MAX_DISK_LIMIT = 10 ** 15  # QEMU's throttle refuses more

FLOW_CAP_KEYS = {"max_new_flows", "max_new_flows_burst", "max_flows"}
FLOW_RATE_RE = re.compile(r"^([1-9][0-9]{0,6})/(second|minute|hour|day)\Z")  # bounded: at most 7 digits
MAX_CAP = 10_000_000  # nft takes 32-bit values; beyond this a cap caps nothing


def parse_limits(check: Checker, table: dict, where: str, memory: Optional[int],
                 has_disk: bool) -> Optional[Limits]:
    """[vm.limits]; None when it has a problem (already reported)."""
    raw = check.typed(table, "limits", dict, where, default={}, kind_name="a table [vm.limits]")
    if raw is None:
        return None
    where = f"{where}.limits"
    check.unknown_keys(raw, LIMIT_KEYS, where)
    values = {
        "cpu_per_vcpu": _cpu_share(check, raw, where),
        "memory_max": _memory_max(check, raw, where, memory),
        "disk_iops": _disk_iops(check, raw, where),
        **{key: _rate(check, raw, key, where) for key in RATE_KEYS},
    }
    without_disk = _limits_without_disk(check, raw, where, has_disk)
    if set(raw) - LIMIT_KEYS or without_disk or any(values[key] is None for key in raw if key in values):
        return None
    return Limits(cpu_per_vcpu=values["cpu_per_vcpu"], memory_max_mib=values["memory_max"],
                  disk_iops=values["disk_iops"], disk_bytes_per_sec=values["disk_bandwidth"],
                  net_to_vm_bytes_per_sec=values["net_to_vm"], net_from_vm_bytes_per_sec=values["net_from_vm"])


def _cpu_share(check: Checker, raw: dict, where: str) -> Optional[float]:
    cpu = check.typed(raw, "cpu_per_vcpu", float, where, kind_name="a number (share of one host CPU)")
    if cpu is not None and not MIN_CPU_SHARE <= cpu <= 1:
        check.problem(f"{where}.cpu_per_vcpu", f"{cpu} must be between {MIN_CPU_SHARE} and 1 (a share of one "
                                               f"host CPU for each vCPU; leave it out for no cap)")
        return None
    return cpu


def _memory_max(check: Checker, raw: dict, where: str, memory: Optional[int]) -> Optional[int]:
    memory_max = check.parsed(raw, "memory_max", parse_memory, where, "a size such as '1GiB' or '768MiB' "
                                                                       "(an integer is MiB)")
    if memory_max is not None and memory is not None and memory_max < memory + QEMU_OVERHEAD_MIB:
        check.problem(f"{where}.memory_max", f"{memory_max} MiB leaves QEMU too little above the guest's "
                                             f"{memory} MiB (vm.memory); the kernel would kill the VM: give "
                                             f"at least {memory + QEMU_OVERHEAD_MIB} MiB")
        return None
    return memory_max


def _disk_iops(check: Checker, raw: dict, where: str) -> Optional[int]:
    iops = check.typed(raw, "disk_iops", int, where)
    if iops is not None and not check.within(iops, 1, MAX_DISK_LIMIT, f"{where}.disk_iops"):
        return None
    return iops


def _rate(check: Checker, raw: dict, key: str, where: str) -> Optional[int]:
    """Bytes per second of a disk or NIC rate."""
    rate = check.parsed(raw, key, parse_rate, where, "a rate with its unit, such as '100Mbit/s', '50MiB/s' "
                                                     "or '10MB/s'")
    if rate is None:
        return None
    minimum = MIN_NET_RATE if key.startswith("net") else 1
    if not minimum <= rate <= MAX_DISK_LIMIT:
        check.problem(f"{where}.{key}", f"{raw[key]!r} is out of range; use between "
                                        f"{'8kbit/s' if minimum > 1 else '1B/s'} and 1000TB/s")
        return None
    return round(rate)


def _limits_without_disk(check: Checker, raw: dict, where: str, has_disk: bool) -> bool:
    """Whether a disk limit is given to a VM without a disk (reported)."""
    found = False
    for key in ("disk_iops", "disk_bandwidth"):
        if key in raw and not has_disk:
            check.problem(f"{where}.{key}", "the VM has no disk to limit (vm.disks, vm.cdrom)")
            found = True
    return found


def parse_flow_caps(check: Checker, table: dict, where: str, inherited: Optional[FlowCaps]) -> Optional[FlowCaps]:
    """max_new_flows / max_new_flows_burst / max_flows of [dmz] (inherited None) or of a [[vm]], which
    overrides the DMZ's value by value. None when a value is bad, or when a VM sets none of them."""
    base = inherited or FlowCaps()
    if inherited is not None and not FLOW_CAP_KEYS & set(table):
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
        if value is not None and key in table and not check.within(value, 1, MAX_CAP, f"{where}.{key}"):
            ok = False
    if None in (rate, burst, flows) or not ok:
        return None
    # A burst derived from a large rate may exceed what nft takes.
    return FlowCaps(new_rate=rate, new_burst=min(burst, MAX_CAP), flows=flows)
