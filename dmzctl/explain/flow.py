"""The flow `dmzctl explain` judges: its first packet, read from the command line."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Optional, Union

from ..config import DMZ
from ..errors import DmzctlError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58, "sctp": 132}
PROTO_NAMES = {number: name for name, number in PROTO_NUMBERS.items()}
PORT_PROTOS = ("tcp", "udp", "sctp")

class ExplainError(DmzctlError):
    """A flow explain cannot read (bad address, port, protocol, unknown VM)."""

    exit_code = 2


@dataclass(frozen=True)
class Flow:
    """A new flow (its first packet) to judge.

    src None means "the VM's DHCP address": some address inside the DMZ subnet.
    from_dmz False means the packet does not enter from the DMZ bridge (a LAN
    host, the internet): dmzctl's from-DMZ rules do not apply to it.
    via_host True means a VM-to-VM packet sent to the gateway's MAC (routed by
    the host) rather than switched on the bridge.
    flood True means the sending VM is over its caps (it opens new flows faster than
    max_new_flows allows, or holds max_flows already): every new flow it starts is dropped.
    """

    dst: IPAddress
    proto: str
    src: Optional[IPAddress] = None
    port: Optional[int] = None
    icmp_type: Optional[int] = None
    vm: Optional[str] = None
    from_dmz: bool = True
    via_host: bool = False
    flood: bool = False
    learned: tuple[str, ...] = ()  # DNS names the VM looked up through the gateway whose answer held dst

    @property
    def family(self) -> int:
        return self.dst.version

    def describe(self) -> str:
        source = str(self.src) if self.src is not None else "a DHCP address"
        if self.vm:
            source = f"{self.vm} ({source})"
        target = f"[{self.dst}]" if self.family == 6 and self.port is not None else str(self.dst)
        if self.port is not None:
            target += f":{self.port}"
        proto = self.proto
        if self.icmp_type is not None:
            proto += f" type {self.icmp_type}"
        learned = f" (learned from {', '.join(self.learned)})" if self.learned else ""
        return f"{source} -> {target} {proto}" + (" (while flooding)" if self.flood else "") + learned


# --- reading a flow from the command line -----------------------------------

def parse_proto(text: str) -> str:
    """A protocol name nft knows, or a number 0-255 (named when it has a name here)."""
    value = text.strip().lower()
    if value in ("ipv6-icmp", "icmp6"):
        value = "icmpv6"
    if value in PROTO_NUMBERS:
        return value
    if re.fullmatch(r"[0-9]{1,3}", value) and int(value) <= 255:
        return PROTO_NAMES.get(int(value), value)
    raise ExplainError(f"--proto: {text!r} is not a protocol; use tcp, udp, sctp, icmp, icmpv6, gre, esp, ah "
                       f"or a number 0-255")


def parse_target(text: str) -> tuple[IPAddress, Optional[int]]:
    """ADDR, ADDR:PORT (IPv4), [ADDR]:PORT or a bare ADDR (IPv6)."""
    value = text.strip()
    port_text = None
    match = re.fullmatch(r"\[([^\]]+)\](?::([0-9]+))?", value)
    if match:
        address_text, port_text = match.groups()
    elif value.count(":") == 1:
        address_text, port_text = value.split(":")
    else:
        address_text = value
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise ExplainError(f"--to: {text!r} is not ADDR, ADDR:PORT or [IPv6]:PORT") from None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ExplainError(f"--to: port {port_text!r} is not 1-65535")
        port = int(port_text)
    return address, port


def make_flow(dmz: DMZ, source: str, target: str, proto: Optional[str] = None,
              icmp_type: Optional[int] = None, outside: bool = False, flood: bool = False,
              resolved: tuple[str, ...] = ()) -> Flow:
    """The flow `--from SOURCE --to TARGET --proto P` describes.

    SOURCE is a VM of the DMZ or an address. An address outside the DMZ subnet is
    taken as a forged source sent from inside the DMZ, unless `outside` says the
    packet comes from elsewhere (a LAN host, the internet). `flood`: the sender is over
    its caps.
    """
    if flood and outside:
        raise ExplainError("--flood is about a sender in the DMZ (its caps); flows from --outside are not capped")
    dst, port = parse_target(target)
    name = parse_proto(proto) if proto else ("tcp" if port is not None else None)
    if name is None:
        raise ExplainError("--proto is needed when --to has no port (tcp, udp, icmp, ...)")
    if name == "icmp" and dst.version == 6:
        name = "icmpv6"
    if name == "icmpv6" and dst.version == 4:
        raise ExplainError(f"--proto icmpv6 does not go to the IPv4 address {dst}; use icmp")
    if port is not None and name not in PORT_PROTOS:
        raise ExplainError(f"--to: {name} has no ports; drop ':{port}'")
    if icmp_type is not None and name not in ("icmp", "icmpv6"):
        raise ExplainError("--icmp-type goes with --proto icmp or icmpv6")
    if icmp_type is not None and not 0 <= icmp_type <= 255:
        raise ExplainError(f"--icmp-type {icmp_type} is not 0-255")
    vm_names = {vm.name: vm for vm in dmz.vms}
    if source in vm_names:
        if outside:
            raise ExplainError(f"--from {source} is a VM of the DMZ; --outside is for sources beyond it")
        vm = vm_names[source]
        src = vm.ip if dst.version == 4 else vm.ip6
        if src is None and dst.version == 6 and dmz.gateway6 is None:
            raise ExplainError(f"DMZ {dmz.name} has no IPv6; {source} cannot send to {dst}")
        return Flow(dst=dst, proto=name, src=src, port=port, icmp_type=icmp_type, vm=source, flood=flood,
                    learned=tuple(n.lower().rstrip(".") for n in resolved))
    try:
        src = ipaddress.ip_address(source.strip())
    except ValueError:
        names = ", ".join(vm_names) or "none"
        raise ExplainError(f"--from: {source!r} is neither a VM of DMZ {dmz.name} (its VMs: {names}) "
                           f"nor an address") from None
    if src.version != dst.version:
        raise ExplainError(f"--from {src} and --to {dst} are of different IP versions")
    return Flow(dst=dst, proto=name, src=src, port=port, icmp_type=icmp_type, from_dmz=not outside, flood=flood,
                learned=tuple(n.lower().rstrip(".") for n in resolved))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    decided_by: str   # hole | protected | host | egress | egress-any | spoofed | vm-to-vm | dhcp | dns | nd |
    #                   flood | not-from-dmz | libvirt-isolated | libvirt-nat | port-isolation | layer2 |
    #                   other-dmz | host-net | private (implicit blocks)
    rule: str         # the nft rule comment (grep `nft list table`), or what else decides
    chain: Optional[str]
    hook: Optional[str]  # forward | input | None (never reaches dmzctl's table)
    reason: str
    origin: Optional[str] = None       # the hole's origin (dns, allow[N]) when a hole decides
    log_prefix: Optional[str] = None   # the kernel log prefix of a logged drop
    trace: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return "allowed" if self.allowed else "blocked"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verdict"] = self.verdict
        data["trace"] = list(self.trace)
        data["notes"] = list(self.notes)
        return data


def format_decision(dmz: DMZ, flow: Flow, decision: Decision) -> str:
    lines = [f"{dmz.name}: {flow.describe()}",
             f"  {decision.verdict.upper()}: {decision.reason}",
             f"  decided by: {decision.rule}" + (f" (chain {decision.chain})" if decision.chain else "")]
    if decision.log_prefix:
        lines.append(f"  logged (rate-limited) with the prefix {decision.log_prefix!r}")
    if decision.trace:
        lines.append("  rules, in order:")
        lines += [f"    {step}" for step in decision.trace]
    for note in decision.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"
