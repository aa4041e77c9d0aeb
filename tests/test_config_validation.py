"""Every validation rule of dmzctl.config, one table row each, with the message it gives.

Each row changes a known-good config (or replaces the file outright), writes it to a
file, loads it, and expects exactly `count` problems, one of which names the file and
the field and contains the expected text.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from dmzctl import config
from dmzctl.config import (
    ALLOW_KEYS, DMZ_KEYS, MAC_RE, BRIDGE_RE, VM_KEYS, IFNAMSIZ, default_bridge, default_mac, load_all,
    load_dmz, parse_dmz, parse_memory, parse_rate,
)
from dmzctl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DMZCTL = ROOT / ".venv" / "bin" / "dmzctl"

BASE = {
    "dmz": {
        "name": "pub",
        "bridge": "dmzpub0",
        "mode": "route",
        "gateway": "192.168.100.1/24",
        "gateway6": "fd42:100::1/64",
        "protected": ["192.168.1.0/24", "fd42:1::/64"],
        "dns": "192.168.1.53",
        "dhcp": True,
        "egress": "any",
        "isolate_vms": False,
        "log_rate": "6/hour",
        "log_burst": 5,
        "allow": [
            {"to": "192.168.1.10", "proto": "udp", "port": 123},
            {"to": "192.168.1.25", "proto": "tcp", "port": 25, "from": "mail"},
            {"to": "fd42:1::25", "proto": "tcp", "port": "587-588", "from": "mail"},
        ],
    },
    "vm": [
        {"name": "web", "memory": "1GiB", "vcpus": 2, "disks": ["/var/lib/dmzctl/web.qcow2"],
         "ip": "192.168.100.10", "ip6": "fd42:100::10", "graphics": "vnc", "graphics_listen": "socket",
         "shutdown_timeout": 20, "autostart": True, "virt_type": "auto",
         "limits": {"cpu_per_vcpu": 0.5, "memory_max": "1536MiB", "disk_iops": 500, "disk_bandwidth": "50MiB/s",
                    "net_to_vm": "100Mbit/s", "net_from_vm": "20Mbit/s"}},
        {"name": "mail", "memory": 768, "disks": ["/var/lib/dmzctl/mail.qcow2"], "cdrom": "/srv/iso/debian.iso",
         "boot": "cdrom", "ip": "192.168.100.25", "ip6": "fd42:100::25", "mac": "52:54:00:12:34:56",
         "graphics": "spice"},
        {"name": "tiny", "memory": 128, "kernel": "/var/lib/dmzctl/kernel", "initrd": "/var/lib/dmzctl/initrd.img",
         "cmdline": "console=ttyS0", "ip": "192.168.100.30", "graphics": "none", "virt_type": "qemu",
         "domain_xml": "/etc/dmzctl/tiny.xml"},
    ],
}

# A second DMZ that shares nothing with BASE, for the rules across files.
OTHER = {
    "dmz": {"name": "other", "bridge": "dmzoth0", "gateway": "192.168.200.1/24",
            "gateway6": "fd42:200::1/64", "protected": ["192.168.1.0/24"]},
    "vm": [{"name": "other-web", "disks": ["/var/lib/dmzctl/other.qcow2"]}],
}


# --- building configs -------------------------------------------------------------------------

def _steps(path: str) -> list:
    return [int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]


def S(path: str, value):
    """Set the value at a path such as 'dmz.allow[0].port' (0-based; one past the end appends)."""
    def apply(data):
        *parents, last = _steps(path)
        for step in parents:
            data = data[step]
        if isinstance(data, list) and last == len(data):
            data.append(value)
        else:
            data[last] = value
    return apply


def D(path: str):
    """Delete the key or list item at a path."""
    def apply(data):
        *parents, last = _steps(path)
        for step in parents:
            data = data[step]
        del data[last]
    return apply


def build(*changes, base=BASE) -> dict:
    data = copy.deepcopy(base)
    for change in changes:
        change(data)
    return data


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON strings are TOML basic strings here
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(data: dict) -> str:
    """Top-level keys with inline values: enough TOML to say any config."""
    return "".join(f"{json.dumps(key)} = {toml_value(value)}\n" for key, value in data.items())


def write(path: Path, data) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(to_toml(data))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_dmz(path)
    return info.value.problems


# Changes that leave a DMZ without any IPv6 user, so gateway6 can go without knock-on problems.
NO_V6 = (D("dmz.allow[2]"), D("vm[0].ip6"), D("vm[1].ip6"))
MISSING, DIRECTORY = "<missing>", "<directory>"


def case(case_id, change, field, text, count=1):
    """change: a list of S/D steps, or the whole file as str/bytes, or MISSING/DIRECTORY."""
    return pytest.param(change, field, text, count, id=case_id)


CASES = [
    # --- the file itself
    case("missing-file", MISSING, None, "no such file"),
    case("unreadable-directory", DIRECTORY, None, "cannot read: Is a directory"),
    case("not-utf8", b'[dmz]\nname = "p\xffb"\n', None, "not UTF-8 text"),
    case("toml-syntax-error", "[dmz\nname = 'pub'\n", None, "TOML syntax error"),
    case("toml-huge-integer", "x = " + "9" * 5000 + "\n", None, "TOML syntax error"),
    case("toml-deep-nesting", "x = " + "[" * 2000 + "]" * 2000 + "\n", None, "TOML syntax error"),
    # --- unknown keys (typos)
    case("unknown-top-level-key", [S("vms", [])], "vms", "unknown key; did you mean 'vm'?"),
    case("unknown-dmz-key-typo", [S("dmz.protectd", [])], "dmz.protectd", "unknown key; did you mean 'protected'?"),
    case("unknown-dmz-key-no-hint", [S("dmz.colour", "red")], "dmz.colour",
         "unknown key; known keys: allow, block_private_ranges, bridge, dhcp"),
    case("unknown-key-quoted", [S("dmz.a\nb", 1)], "dmz.'a\\nb'", "unknown key"),
    case("unknown-allow-key", [S("dmz.allow[0].ports", 1)], "dmz.allow[1].ports", "unknown key; did you mean 'port'?"),
    case("unknown-vm-key", [S("vm[0].memroy", 1)], "vm[web].memroy", "unknown key; did you mean 'memory'?"),
    # --- [dmz] table, required fields, types
    case("dmz-missing", [D("dmz")], "dmz", "required table [dmz] is missing"),
    case("dmz-not-a-table", [S("dmz", 5)], "dmz", "must be a table [dmz]"),
    case("dmz-name-missing", [D("dmz.name")], "dmz.name", "required but missing"),
    case("gateway-missing", [D("dmz.gateway")], "dmz.gateway", "required but missing"),
    case("protected-missing", [D("dmz.protected"), D("dmz.allow")], "dmz.protected", "required but missing"),
    case("type-string", [S("dmz.name", 5)], "dmz.name", "must be a string, got 5"),
    case("type-integer", [S("dmz.log_burst", "5")], "dmz.log_burst", "must be an integer, got '5'"),
    case("type-bool-is-not-integer", [S("vm[0].vcpus", True)], "vm[web].vcpus", "must be an integer, got True"),
    case("type-boolean", [S("dmz.isolate_vms", "yes")], "dmz.isolate_vms", "must be true or false, got 'yes'"),
    case("type-list", [S("dmz.protected", "192.168.1.0/24"), D("dmz.allow")], "dmz.protected",
         "must be a list, got '192.168.1.0/24'"),
    case("type-allow-not-list", [S("dmz.allow", {"to": "192.168.1.10", "proto": "udp"})], "dmz.allow",
         "must be a list of [[dmz.allow]] tables"),
    case("type-number-of-seconds", [S("vm[0].shutdown_timeout", "20")], "vm[web].shutdown_timeout",
         "must be a number of seconds, got '20'"),
    case("type-autostart", [S("vm[0].autostart", "yes")], "vm[web].autostart", "must be true or false"),
    # --- choices
    case("mode-choice", [S("dmz.mode", "bridge")], "dmz.mode", "must be one of route, nat, isolated; got 'bridge'"),
    case("isolated-dns-hole", [S("dmz.mode", "isolated")], "dmz.dns",
         "mode 'isolated' forwards nothing out of the DMZ, so this hole cannot work", count=4),
    case("isolated-allow-hole", [S("dmz.mode", "isolated"), D("dmz.dns")], "dmz.allow[1]",
         "use mode 'route' or 'nat'", count=3),
    case("egress-choice", [S("dmz.egress", "some")], "dmz.egress", "must be one of any, none, allowlist; got 'some'"),
    case("proto-choice", [S("dmz.allow[0].proto", "tpc")], "dmz.allow[1].proto",
         "must be one of tcp, udp, icmp, icmpv6, sctp; got 'tpc'"),
    case("boot-choice", [S("vm[0].boot", "net")], "vm[web].boot", "must be one of hd, cdrom, kernel; got 'net'"),
    case("graphics-choice", [S("vm[0].graphics", "rdp")], "vm[web].graphics",
         "must be one of vnc, spice, none; got 'rdp'"),
    case("virt-type-choice", [S("vm[0].virt_type", "xen")], "vm[web].virt_type",
         "must be one of auto, kvm, qemu; got 'xen'"),
    case("graphics-listen-choice", [S("vm[0].graphics_listen", "0.0.0.0")], "vm[web].graphics_listen",
         "must be one of socket, localhost; got '0.0.0.0'"),
    case("graphics-listen-without-graphics", [S("vm[2].graphics_listen", "localhost")], "vm[tiny].graphics_listen",
         "only makes sense with graphics 'vnc' or 'spice'"),
    # --- names
    case("dmz-name-characters", [S("dmz.name", "Pub_1")], "dmz.name", "'Pub_1' must be 1-32 characters of a-z, 0-9"),
    case("dmz-name-too-long", [S("dmz.name", "a" * 33)], "dmz.name", "must be 1-32 characters"),
    case("dmz-name-leading-dash", [S("dmz.name", "-pub")], "dmz.name", "starting with a letter or digit"),
    case("dmz-name-trailing-newline", [S("dmz.name", "pub\n")], "dmz.name", "must be 1-32 characters"),
    case("vm-name-characters", [S("vm[0].name", "Web")], "vm[#1].name", "'Web' must be 1-48 characters of a-z"),
    case("vm-name-trailing-newline", [S("vm[0].name", "web\n")], "vm[#1].name", "must be 1-48 characters"),
    case("bridge-too-long", [S("dmz.bridge", "dmz-bridge-12345")], "dmz.bridge",
         "'dmz-bridge-12345' is 16 characters; Linux interface names are at most 15"),
    case("bridge-characters", [S("dmz.bridge", "dmz br0")], "dmz.bridge",
         "may use only letters, digits, '-', '_' and '.'"),
    # --- gateway and gateway6
    case("gateway-without-prefix", [S("dmz.gateway", "192.168.100.1")], "dmz.gateway",
         "must be an address with its prefix length, like 192.168.100.1/24"),
    case("gateway-malformed", [S("dmz.gateway", "192.168.300.1/24")], "dmz.gateway",
         "'192.168.300.1/24' is not a valid IPv4 address/prefix"),
    case("gateway-is-ipv6", [S("dmz.gateway", "fd00::1/64")], "dmz.gateway", "must be an IPv4 address/prefix"),
    case("gateway-prefix-too-long", [S("dmz.gateway", "192.168.100.1/31")], "dmz.gateway",
         "/31 leaves no room for VMs; use /30 or shorter", count=4),  # + the three VM addresses outside it
    case("gateway-network-address", [S("dmz.gateway", "192.168.100.0/24")], "dmz.gateway",
         "192.168.100.0 is the network address of 192.168.100.0/24"),
    case("gateway-broadcast-address", [S("dmz.gateway", "192.168.100.255/24")], "dmz.gateway",
         "192.168.100.255 is the broadcast address of 192.168.100.0/24; give the host an address inside it, "
         "e.g. 192.168.100.1/24"),
    case("gateway6-without-prefix", [*NO_V6, S("dmz.gateway6", "fd42:100::1")], "dmz.gateway6",
         "must be an address with its prefix length, like fd00:100::1/64"),
    case("gateway6-is-ipv4", [*NO_V6, S("dmz.gateway6", "10.0.0.1/24")], "dmz.gateway6",
         "must be an IPv6 address/prefix"),
    case("gateway6-prefix-too-long", [*NO_V6, S("dmz.gateway6", "fd42:100::1/127")], "dmz.gateway6",
         "/127 leaves no room for VMs; use /126 or shorter"),
    case("gateway6-subnet-router-anycast", [S("dmz.gateway6", "fd42:100::/64")], "dmz.gateway6",
         "fd42:100:: is the network address of fd42:100::/64"),
    # --- protected
    case("protected-empty", [S("dmz.protected", []), D("dmz.allow")], "dmz.protected",
         "needs at least one subnet the DMZ must never reach"),
    case("protected-not-string", [S("dmz.protected[2]", 5)], "dmz.protected[3]",
         "must be a string such as '192.168.1.0/24'; got 5"),
    case("protected-malformed", [S("dmz.protected[2]", "lan")], "dmz.protected[3]",
         "'lan' is not a valid address or prefix"),
    case("protected-host-bits", [S("dmz.protected[2]", "10.0.0.1/8")], "dmz.protected[3]",
         "'10.0.0.1/8' has host bits set; did you mean '10.0.0.0/8'?"),
    case("protected-overlaps-dmz", [S("dmz.protected[2]", "192.168.0.0/16")], "dmz.protected[3]",
         "192.168.0.0/16 overlaps the DMZ subnet 192.168.100.0/24 (dmz.gateway)"),
    case("protected-overlaps-dmz6", [S("dmz.protected[2]", "fd42::/16")], "dmz.protected[3]",
         "fd42::/16 overlaps the DMZ subnet fd42:100::/64 (dmz.gateway6)"),
    # --- dns, logging
    case("dns-malformed", [S("dmz.dns", "dns.example")], "dmz.dns", "'dns.example' is not a valid address"),
    case("dns-ipv6-without-gateway6", [*NO_V6, D("dmz.gateway6"), S("dmz.dns", "fd42:1::53")], "dmz.dns",
         "fd42:1::53 is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)"),
    case("log-rate-format", [S("dmz.log_rate", "6 per hour")], "dmz.log_rate",
         "'6 per hour' must look like N/second, N/minute, N/hour or N/day"),
    case("log-rate-trailing-newline", [S("dmz.log_rate", "6/hour\n")], "dmz.log_rate", "must look like N/second"),
    case("block-private-ranges-not-bool", [S("dmz.block_private_ranges", "no")], "dmz.block_private_ranges",
         "must be true or false, got 'no'"),
    case("log-burst-range", [S("dmz.log_burst", 0)], "dmz.log_burst", "0 must be between 1 and 10000"),
    # --- caps on new and concurrent flows (dmz and per VM)
    case("caps-rate-format", [S("dmz.max_new_flows", "2000 per second")], "dmz.max_new_flows",
         "'2000 per second' must look like N/second, N/minute, N/hour or N/day with N from 1 to 9999999 "
         "(e.g. '2000/second')"),
    case("caps-rate-zero", [S("dmz.max_new_flows", "0/second")], "dmz.max_new_flows", "must look like N/second"),
    case("caps-rate-too-many-digits", [S("dmz.max_new_flows", "10000000/second")], "dmz.max_new_flows",
         "with N from 1 to 9999999"),
    case("caps-rate-huge-digit-string", [S("dmz.max_new_flows", "9" * 5000 + "/second")], "dmz.max_new_flows",
         "must look like N/second"),
    case("caps-rate-not-string", [S("dmz.max_new_flows", 2000)], "dmz.max_new_flows", "must be a string, got 2000"),
    case("caps-burst-range", [S("dmz.max_new_flows_burst", 0)], "dmz.max_new_flows_burst",
         "0 must be between 1 and 10000000"),
    case("caps-flows-range", [S("dmz.max_flows", 0)], "dmz.max_flows", "0 must be between 1 and 10000000"),
    case("caps-flows-too-many", [S("dmz.max_flows", 2**40)], "dmz.max_flows", "must be between 1 and 10000000"),
    case("caps-flows-not-integer", [S("dmz.max_flows", "20000")], "dmz.max_flows", "must be an integer, got '20000'"),
    case("vm-caps-rate-format", [S("vm[0].max_new_flows", "fast")], "vm[web].max_new_flows",
         "'fast' must look like N/second"),
    case("vm-caps-flows-range", [S("vm[1].max_flows", -1)], "vm[mail].max_flows", "-1 must be between 1 and"),
    case("vm-caps-burst-range", [S("vm[2].max_new_flows_burst", 10**8)], "vm[tiny].max_new_flows_burst",
         "100000000 must be between 1 and 10000000"),
    # --- holes
    case("hole-not-a-table", [S("dmz.allow[0]", 5)], "dmz.allow[1]", "must be a table [[dmz.allow]]"),
    case("hole-to-missing", [D("dmz.allow[0].to")], "dmz.allow[1].to", "required but missing"),
    case("hole-proto-missing", [D("dmz.allow[0].proto")], "dmz.allow[1].proto",
         "required but missing; one of tcp, udp, icmp, icmpv6, sctp"),
    case("hole-to-malformed", [S("dmz.allow[0].to", "192.168.1.300")], "dmz.allow[1].to",
         "'192.168.1.300' is not a valid address or prefix"),
    case("hole-to-inside-dmz", [S("dmz.allow[0].to", "192.168.100.10")], "dmz.allow[1].to",
         "192.168.100.10/32 is inside the DMZ itself; traffic between its VMs follows dmz.isolate_vms"),
    case("hole-to-inside-dmz6", [S("dmz.allow[0].to", "fd42:100::/56")], "dmz.allow[1].to",
         "fd42:100::/56 is inside the DMZ itself"),
    case("hole-ipv6-without-gateway6",
         [*NO_V6, D("dmz.gateway6"), S("dmz.allow[0].to", "fd42:1::10")], "dmz.allow[1].to",
         "fd42:1::10/128 is IPv6 but the DMZ has no IPv6 (set dmz.gateway6)"),
    case("hole-icmp-to-ipv6", [S("dmz.allow[2]", {"to": "fd42:1::25", "proto": "icmp"})], "dmz.allow[3].proto",
         "icmp does not go to an IPv6 address; use icmpv6"),
    case("hole-icmpv6-to-ipv4", [S("dmz.allow[0]", {"to": "192.168.1.10", "proto": "icmpv6"})],
         "dmz.allow[1].proto", "icmpv6 does not go to an IPv4 address; use icmp"),
    case("hole-icmp-with-port", [S("dmz.allow[0].proto", "icmp")], "dmz.allow[1].port",
         "icmp has no ports; remove 'port'"),
    case("hole-port-name", [S("dmz.allow[0].port", "ntp")], "dmz.allow[1].port",
         "must be a port number or a range 'a-b'; got 'ntp'"),
    case("hole-port-float", [S("dmz.allow[0].port", 1.5)], "dmz.allow[1].port", "must be a port number"),
    case("hole-port-superscript-digit", [S("dmz.allow[0].port", "\u00b2")], "dmz.allow[1].port",
         "must be a port number"),
    case("hole-port-huge-digit-string", [S("dmz.allow[0].port", "9" * 5000)], "dmz.allow[1].port",
         "must be a port number"),
    case("hole-port-zero", [S("dmz.allow[0].port", 0)], "dmz.allow[1].port",
         "port 0 is out of range; ports are 1-65535"),
    case("hole-port-too-high", [S("dmz.allow[0].port", 65536)], "dmz.allow[1].port", "is out of range"),
    case("hole-port-string-too-high", [S("dmz.allow[0].port", "65536")], "dmz.allow[1].port", "is out of range"),
    case("hole-port-range-out-of-range", [S("dmz.allow[0].port", "100-70000")], "dmz.allow[1].port",
         "port '100-70000' is out of range"),
    case("hole-port-range-backwards", [S("dmz.allow[0].port", "200-100")], "dmz.allow[1].port",
         "range '200-100' runs backwards; write '100-200'"),
    case("hole-from-not-string", [S("dmz.allow[0].from", 5)], "dmz.allow[1].from",
         "must be a VM name or a DMZ address; got 5"),
    case("hole-from-unknown-vm", [S("dmz.allow[0].from", "nosuch")], "dmz.allow[1].from",
         "'nosuch' is neither a VM of this DMZ nor an address"),
    case("hole-from-vm-without-ipv4", [D("vm[0].ip"), S("dmz.allow[0].from", "web")], "dmz.allow[1].from",
         "VM 'web' has no static IPv4 address (vm.ip); a hole from a VM needs one to match on"),
    case("hole-from-vm-without-ipv6", [S("dmz.allow[2].from", "tiny")], "dmz.allow[3].from",
         "VM 'tiny' has no static IPv6 address (vm.ip6)"),
    case("hole-from-address-outside-dmz", [S("dmz.allow[0].from", "10.9.9.9")], "dmz.allow[1].from",
         "10.9.9.9/32 is not inside the DMZ subnet"),
    case("hole-from-ipv6-without-gateway6",
         [*NO_V6, D("dmz.gateway6"), S("dmz.allow[0].from", "fd42:100::10")], "dmz.allow[1].from",
         "fd42:100::10/128 is not inside the DMZ subnet"),
    case("hole-from-other-ip-version", [S("dmz.allow[0].from", "fd42:100::10")], "dmz.allow[1].from",
         "fd42:100::10/128 and 192.168.1.10/32 are of different IP versions"),
    # a hole from a VM that is itself invalid: only the VM's problem, not "no such VM"/"no address"
    case("hole-from-invalid-vm-reported-once", [S("vm[1].memory", 10)], "vm[mail].memory",
         "10 MiB is too little; at least 64 MiB"),
    case("hole-from-vm-with-bad-ip-reported-once", [S("vm[1].ip", "10.0.0.5")], "vm[mail].ip",
         "10.0.0.5 is outside the DMZ subnet 192.168.100.0/24"),
    # --- [[vm]]
    case("vm-not-array", [S("vm", {"name": "web"}), S("dmz.allow", [BASE["dmz"]["allow"][0]])], "vm",
         "must be an array of tables [[vm]]"),
    case("vm-entry-not-table", [S("vm[0]", 5)], "vm[1]", "must be a table [[vm]]"),
    case("vm-name-missing", [D("vm[0].name")], "vm[#1].name", "required but missing"),
    case("memory-malformed", [S("vm[0].memory", "lots")], "vm[web].memory",
         "'lots' must be an integer (MiB) or a size such as '512MiB' or '2GiB'"),
    case("memory-not-whole-mib", [S("vm[0].memory", "1000KiB")], "vm[web].memory", "must be an integer (MiB)"),
    case("memory-float", [S("vm[0].memory", 512.5)], "vm[web].memory", "512.5 must be an integer (MiB)"),
    case("memory-too-little", [S("vm[0].memory", "32MiB")], "vm[web].memory", "32 MiB is too little; at least 64"),
    case("vcpus-zero", [S("vm[0].vcpus", 0)], "vm[web].vcpus", "0 must be between 1 and 256"),
    case("vcpus-too-many", [S("vm[0].vcpus", 257)], "vm[web].vcpus", "257 must be between 1 and 256"),
    case("disk-relative", [S("vm[0].disks", ["/ok.qcow2", "web.qcow2"])], "vm[web].disks[2]",
         "must be an absolute path; got 'web.qcow2'"),
    case("disk-not-string", [S("vm[0].disks", ["/ok.qcow2", 5])], "vm[web].disks[2]",
         'must be an absolute path or a table { path = "/...", format = "raw" }; got 5'),
    case("disk-table-path-missing", [S("vm[0].disks[0]", {"format": "qcow2"})], "vm[web].disks[1].path",
         "required but missing"),
    case("disk-table-path-relative", [S("vm[0].disks[0]", {"path": "web.qcow2"})], "vm[web].disks[1].path",
         "must be an absolute path; got 'web.qcow2'"),
    case("disk-format-choice", [S("vm[0].disks[0]", {"path": "/web.vmdk", "format": "vmdk"})],
         "vm[web].disks[1].format", "must be one of raw, qcow2; got 'vmdk'"),
    case("disk-unknown-key", [S("vm[0].disks[0]", {"path": "/web.qcow2", "fromat": "qcow2"})],
         "vm[web].disks[1].fromat", "unknown key; did you mean 'format'?"),
    case("disk-backing-not-list", [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": "/base.qcow2"})],
         "vm[web].disks[1].backing", "must be a list of files, outermost first, each a path or"),
    case("disk-raw-with-backing", [S("vm[0].disks[0]", {"path": "/web.img", "backing": ["/base.qcow2"]})],
         "vm[web].disks[1].backing", 'a raw disk has no backing file; set format = "qcow2" or remove backing'),
    case("disk-backing-relative", [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": ["base.qcow2"]})],
         "vm[web].disks[1].backing[1]", "must be an absolute path; got 'base.qcow2'"),
    case("disk-backing-layer-not-table", [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": [5]})],
         "vm[web].disks[1].backing[1]", "must be an absolute path or a table"),
    case("disk-backing-path-missing", [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": [{"format": "raw"}]})],
         "vm[web].disks[1].backing[1].path", "required but missing"),
    case("disk-backing-format-choice",
         [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": [{"path": "/base", "format": "vdi"}]})],
         "vm[web].disks[1].backing[1].format", "must be one of raw, qcow2; got 'vdi'"),
    case("disk-backing-nested-backing",
         [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": [{"path": "/base.qcow2", "backing": []}]})],
         "vm[web].disks[1].backing[1].backing", "unknown key; known keys: format, path"),
    case("disk-backing-raw-not-last",
         [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": ["/base.raw", "/debian.qcow2"]})],
         "vm[web].disks[1].backing[1]", "/base.raw is raw, so it has no backing file: a raw layer can only come last"),
    case("disk-backing-loops-to-disk",
         [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": ["/base.qcow2", "/web.qcow2"]})],
         "vm[web].disks[1].backing[2]", "/web.qcow2 is already in this disk's chain; a chain cannot loop"),
    case("disk-backing-loops-inside",
         [S("vm[0].disks[0]", {"path": "/web.qcow2", "backing": ["/base.qcow2", "/base.qcow2"]})],
         "vm[web].disks[1].backing[2]", "is already in this disk's chain"),
    case("cdrom-relative", [S("vm[0].cdrom", "debian.iso")], "vm[web].cdrom",
         "must be an absolute path; got 'debian.iso'"),
    case("kernel-relative", [S("vm[0].kernel", "vmlinuz"), S("vm[0].boot", "hd")], "vm[web].kernel",
         "must be an absolute path; got 'vmlinuz'"),
    case("initrd-relative", [S("vm[2].initrd", "initrd.img")], "vm[tiny].initrd",
         "must be an absolute path; got 'initrd.img'"),
    case("domain-xml-relative", [S("vm[0].domain_xml", "web.xml")], "vm[web].domain_xml",
         "must be an absolute path; got 'web.xml'"),
    case("boot-cdrom-without-cdrom", [S("vm[0].boot", "cdrom")], "vm[web].boot",
         "'cdrom' needs vm.cdrom, the image to boot from"),
    case("boot-kernel-without-kernel", [S("vm[0].boot", "kernel")], "vm[web].boot",
         "'kernel' needs vm.kernel, the kernel image to boot"),
    case("boot-hd-without-disks", [S("vm[2].boot", "hd")], "vm[tiny].boot", "'hd' needs at least one entry in vm.disks"),
    case("nothing-to-boot", [D("vm[0].disks"), D("vm[0].limits")], "vm[web]",
         "nothing to boot: give vm.disks, vm.kernel or vm.cdrom with boot = 'cdrom'"),
    case("initrd-without-kernel", [S("vm[0].initrd", "/boot/initrd.img")], "vm[web].initrd",
         "only makes sense with vm.kernel (direct kernel boot)"),
    case("cmdline-without-kernel", [S("vm[0].cmdline", "quiet")], "vm[web].cmdline",
         "only makes sense with vm.kernel (direct kernel boot)"),
    case("ip-malformed", [S("vm[0].ip", "192.168.100.x")], "vm[web].ip",
         "'192.168.100.x' is not a valid IPv4 address"),
    case("ip-is-ipv6", [S("vm[0].ip", "fd42:100::11")], "vm[web].ip", "must be an IPv4 address; got 'fd42:100::11'"),
    case("ip-outside-dmz", [S("vm[0].ip", "192.168.101.10")], "vm[web].ip",
         "192.168.101.10 is outside the DMZ subnet 192.168.100.0/24"),
    case("ip-is-gateway", [S("vm[0].ip", "192.168.100.1")], "vm[web].ip",
         "192.168.100.1 is the gateway (the host's address); pick another"),
    case("ip-network-address", [S("vm[0].ip", "192.168.100.0")], "vm[web].ip",
         "192.168.100.0 is the network or broadcast address of 192.168.100.0/24"),
    case("ip-broadcast-address", [S("vm[0].ip", "192.168.100.255")], "vm[web].ip",
         "192.168.100.255 is the network or broadcast address"),
    case("ip-required-without-dhcp", [S("dmz.dhcp", False), D("vm[0].ip")], "vm[web].ip",
         "required when dmz.dhcp is false"),
    case("dhcp-wrong-type-reported-once", [S("dmz.dhcp", "yes"), D("vm[0].ip")], "dmz.dhcp",
         "must be true or false, got 'yes'"),
    case("ip6-malformed", [S("vm[0].ip6", "fd42:100::zz")], "vm[web].ip6", "'fd42:100::zz' is not a valid IPv6 address"),
    case("ip6-is-ipv4", [S("vm[0].ip6", "192.168.100.11")], "vm[web].ip6", "must be an IPv6 address"),
    case("ip6-without-gateway6", [D("dmz.allow[2]"), D("vm[1].ip6"), D("dmz.gateway6")], "vm[web].ip6",
         "the DMZ has no IPv6; set dmz.gateway6 first"),
    case("ip6-outside-dmz", [S("vm[0].ip6", "fd42:200::10")], "vm[web].ip6",
         "fd42:200::10 is outside the DMZ subnet fd42:100::/64"),
    case("ip6-is-gateway", [S("vm[0].ip6", "fd42:100::1")], "vm[web].ip6",
         "fd42:100::1 is the gateway or the subnet-router anycast address; pick another"),
    case("ip6-subnet-router-anycast", [S("vm[0].ip6", "fd42:100::")], "vm[web].ip6",
         "is the gateway or the subnet-router anycast address"),
    case("mac-malformed", [S("vm[0].mac", "52:54:00:12:34")], "vm[web].mac",
         "'52:54:00:12:34' is not a MAC address like 52:54:00:12:34:56"),
    case("mac-trailing-newline", [S("vm[0].mac", "52:54:00:12:34:57\n")], "vm[web].mac", "is not a MAC address"),
    case("mac-multicast", [S("vm[0].mac", "01:00:5E:00:00:01")], "vm[web].mac",
         "01:00:5e:00:00:01 is a multicast address; a NIC needs a unicast one"),
    case("shutdown-timeout-negative", [S("vm[0].shutdown_timeout", -1)], "vm[web].shutdown_timeout",
         "-1 must be between 0 and 3600 seconds"),
    case("shutdown-timeout-too-long", [S("vm[0].shutdown_timeout", 3600.5)], "vm[web].shutdown_timeout",
         "3600.5 must be between 0 and 3600 seconds"),
    case("shutdown-timeout-beyond-a-float", [S("vm[0].shutdown_timeout", 10 ** 400)], "vm[web].shutdown_timeout",
         "0 must be between 0 and 3600 seconds"),  # TOML allows it; float() of it overflows
    # --- [vm.limits]
    case("limits-not-a-table", [S("vm[0].limits", 5)], "vm[web].limits", "must be a table [vm.limits], got 5"),
    case("limits-unknown-key", [S("vm[0].limits.memory", "2GiB")], "vm[web].limits.memory",
         "unknown key; did you mean 'memory_max'?"),
    case("limits-cpu-not-a-number", [S("vm[0].limits.cpu_per_vcpu", "50%")], "vm[web].limits.cpu_per_vcpu",
         "must be a number (share of one host CPU), got '50%'"),
    case("limits-cpu-zero", [S("vm[0].limits.cpu_per_vcpu", 0)], "vm[web].limits.cpu_per_vcpu",
         "0 must be between 0.01 and 1 (a share of one host CPU for each vCPU; leave it out for no cap)"),
    case("limits-cpu-more-than-a-cpu", [S("vm[0].limits.cpu_per_vcpu", 1.5)], "vm[web].limits.cpu_per_vcpu",
         "1.5 must be between 0.01 and 1"),
    case("limits-memory-max-malformed", [S("vm[0].limits.memory_max", "lots")], "vm[web].limits.memory_max",
         "'lots' must be a size such as '1GiB' or '768MiB' (an integer is MiB)"),
    case("limits-memory-max-too-small", [S("vm[0].limits.memory_max", "1GiB")], "vm[web].limits.memory_max",
         "1024 MiB leaves QEMU too little above the guest's 1024 MiB (vm.memory); the kernel would kill the VM: "
         "give at least 1152 MiB"),
    case("limits-memory-max-with-bad-memory-reported-once", [S("vm[0].memory", "lots")], "vm[web].memory",
         "'lots' must be an integer (MiB)"),
    case("limits-disk-iops-not-integer", [S("vm[0].limits.disk_iops", "fast")], "vm[web].limits.disk_iops",
         "must be an integer, got 'fast'"),
    case("limits-disk-iops-zero", [S("vm[0].limits.disk_iops", 0)], "vm[web].limits.disk_iops",
         "0 must be between 1 and 1000000000000000"),
    case("limits-rate-without-unit", [S("vm[0].limits.disk_bandwidth", "50M")], "vm[web].limits.disk_bandwidth",
         "'50M' must be a rate with its unit, such as '100Mbit/s', '50MiB/s' or '10MB/s'"),
    case("limits-rate-integer", [S("vm[0].limits.net_to_vm", 100)], "vm[web].limits.net_to_vm",
         "100 must be a rate with its unit"),
    case("limits-rate-unit-case", [S("vm[0].limits.net_from_vm", "20mbit/s")], "vm[web].limits.net_from_vm",
         "'20mbit/s' must be a rate with its unit"),
    case("limits-rate-zero", [S("vm[0].limits.disk_bandwidth", "0MiB/s")], "vm[web].limits.disk_bandwidth",
         "'0MiB/s' is out of range; use between 1B/s and 1000TB/s"),
    case("limits-net-rate-below-libvirts-unit", [S("vm[0].limits.net_from_vm", "4kbit/s")],
         "vm[web].limits.net_from_vm", "'4kbit/s' is out of range; use between 8kbit/s and 1000TB/s"),
    case("limits-rate-too-high", [S("vm[0].limits.net_to_vm", "2000000GB/s")], "vm[web].limits.net_to_vm",
         "is out of range"),
    case("limits-disk-without-disk", [S("vm[2].limits", {"disk_bandwidth": "10MB/s"})],
         "vm[tiny].limits.disk_bandwidth", "the VM has no disk to limit (vm.disks, vm.cdrom)"),
    case("limits-disk-with-bad-disk-not-reported-as-no-disk", [S("vm[0].disks", ["web.qcow2"])],
         "vm[web].disks[1]", "must be an absolute path; got 'web.qcow2'"),
    case("limits-problem-of-a-hole-source-reported-once", [S("vm[1].limits", {"cpu_per_vcpu": 2})],
         "vm[mail].limits.cpu_per_vcpu", "2 must be between 0.01 and 1"),
    # --- duplicates inside one file
    case("duplicate-vm-name", [S("vm[2].name", "web")], "vm[web].name", "web is already used by vm[web]"),
    case("duplicate-vm-ip", [S("vm[2].ip", "192.168.100.10")], "vm[tiny].ip",
         "192.168.100.10 is already used by vm[web]; each VM needs its own"),
    case("duplicate-vm-ip6", [S("vm[2].ip6", "fd42:100::10")], "vm[tiny].ip6", "fd42:100::10 is already used by vm[web]"),
    case("duplicate-vm-mac", [S("vm[0].mac", "52:54:00:12:34:56")], "vm[mail].mac",
         "52:54:00:12:34:56 is already used by vm[web]"),
    case("duplicate-vm-mac-other-case", [S("vm[0].mac", "52:54:00:AB:CD:EF"), S("vm[2].mac", "52:54:00:ab:cd:ef")],
         "vm[tiny].mac", "52:54:00:ab:cd:ef is already used by vm[web]"),
]


def test_base_config_is_valid(tmp_path):
    dmz = load_dmz(write(tmp_path / "pub.toml", BASE))
    assert [vm.name for vm in dmz.vms] == ["web", "mail", "tiny"]
    assert len(dmz.holes) == 5  # dns udp+tcp and three allows
    assert load_all([write(tmp_path / "other.toml", OTHER), tmp_path / "pub.toml"])


@pytest.mark.parametrize("change,field,text,count", CASES)
def test_rule(tmp_path, change, field, text, count):
    path = tmp_path / "dmz.toml"
    if change is DIRECTORY:
        path.mkdir()
    elif change is not MISSING:
        write(path, change if isinstance(change, (str, bytes)) else build(*change))
    problems = problems_of(path)
    assert len(problems) == count, problems
    if field is None:  # the file as a whole: named as given
        prefix = f"{path}: "
    else:  # a field: named by the resolved path
        prefix = f"{path.resolve()}: {field}: "
    matching = [p for p in problems if p.startswith(prefix) and text in p]
    assert matching, f"no problem starts with {prefix!r} and contains {text!r}: {problems}"
    assert all("\n" not in p for p in problems)


def test_caps_defaults_and_overrides(tmp_path):
    from dmzctl.config import FlowCaps

    dmz = load_dmz(write(tmp_path / "pub.toml", BASE))
    assert dmz.flow_caps == FlowCaps("2000/second", 4000, 20000)
    assert all(vm.flow_caps is None for vm in dmz.vms)
    # The burst follows a rate given without one (twice its count); a VM overrides value by value.
    dmz = load_dmz(write(tmp_path / "pub.toml", build(
        S("dmz.max_new_flows", "300/minute"), S("dmz.max_flows", 500),
        S("vm[0].max_flows", 900), S("vm[1].max_new_flows", "50/second"), S("vm[1].max_new_flows_burst", 70),
        S("vm[2].max_new_flows", "300/minute"))))
    assert dmz.flow_caps == FlowCaps("300/minute", 600, 500)
    assert dmz.vm("web").flow_caps == FlowCaps("300/minute", 600, 900)
    assert dmz.vm("mail").flow_caps == FlowCaps("50/second", 70, 500)
    assert dmz.vm("tiny").flow_caps is None  # the same as the DMZ's: no chain of its own
    assert dmz.caps_of(dmz.vm("tiny")) == dmz.flow_caps
    assert load_dmz(write(tmp_path / "big.toml", build(S("dmz.max_new_flows", "9999999/second")))) \
        .flow_caps.new_burst == 10_000_000  # twice the rate, clamped to what nft takes


PROBLEM_SITES = (".problem(", ".parsed(", ".within(", ".absolute_path(", "problems.append(", "raise ConfigError([")


def test_every_problem_site_has_a_case():
    """A crude guard: the table grows with the validator. A site is a call that may report a problem
    (problem() or a checker helper that calls it), in any module of the dmzctl.config package."""
    modules = sorted(Path(config.__file__).parent.rglob("*.py"))
    assert len(modules) > 1, modules  # the package, not one file
    sites = sum(path.read_text().count(site) for path in modules for site in PROBLEM_SITES)
    assert len(CASES) >= sites, (len(CASES), sites)


# --- rules across files (load_all) ------------------------------------------------------------

ACROSS = [  # (changes to BASE in a.toml, changes to OTHER in b.toml, field, text)
    pytest.param([], [S("dmz.name", "pub")], "dmz.name", "'pub' is also used by", id="same-network-name"),
    pytest.param([], [S("dmz.bridge", "dmzpub0")], "dmz.bridge", "'dmzpub0' is also used by", id="same-bridge"),
    pytest.param([D("dmz.bridge")], [D("dmz.bridge"), S("dmz.name", "pub")], "dmz.bridge",
                 "'dz-pub' is also used by", id="same-derived-bridge"),
    pytest.param([], [S("vm[0].name", "web")], "vm[web].name", "'web' is also used by", id="same-domain-name"),
    pytest.param([], [S("dmz.gateway", "192.168.100.129/25")], "dmz.gateway",
                 "subnet 192.168.100.128/25 overlaps 192.168.100.0/24 of", id="overlapping-subnets"),
    pytest.param([], [S("dmz.gateway6", "fd42:100::1:1/112")], "dmz.gateway6",
                 "subnet fd42:100::1:0/112 overlaps fd42:100::/64 of", id="overlapping-subnets6"),
]


@pytest.mark.parametrize("first_change,second_change,field,text", ACROSS)
def test_across_files(tmp_path, first_change, second_change, field, text):
    first = write(tmp_path / "a.toml", build(*first_change))
    second = write(tmp_path / "b.toml", build(*second_change, base=OTHER))
    assert load_dmz(first) and load_dmz(second)  # each is fine alone
    with pytest.raises(ConfigError) as info:
        load_all([first, second])
    problems = info.value.problems
    prefix = f"{second.resolve()}: {field}: "
    assert any(p.startswith(prefix) and text in p and p.endswith(str(first.resolve())) for p in problems), problems


def test_across_files_collects_problems_of_every_file(tmp_path):
    first = write(tmp_path / "a.toml", build(S("dmz.mode", "bridge")))
    second = write(tmp_path / "b.toml", build(S("dmz.egress", "some"), base=OTHER))
    with pytest.raises(ConfigError) as info:
        load_all([first, second, tmp_path / "missing.toml"])
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{first.resolve()}: dmz.mode: ")
    assert problems[1].startswith(f"{second.resolve()}: dmz.egress: ")
    assert problems[2] == f"{tmp_path / 'missing.toml'}: no such file"


# --- all problems together --------------------------------------------------------------------

SEVERAL = build(
    S("dmz.name", "Pub"),
    S("dmz.bridge", "a-very-long-bridge"),
    S("dmz.protected[2]", "fd42:100::/48"),
    S("dmz.allow[0].port", "200-100"),
    S("vm[0].ip", "192.168.100.1"),
    S("vm[2].memory", "lots"),
)


def test_several_problems_are_reported_together(tmp_path):
    path = write(tmp_path / "several.toml", SEVERAL)
    problems = problems_of(path)
    fields = [p.split(": ")[1] for p in problems]
    assert fields == ["dmz.name", "dmz.bridge", "dmz.protected[3]", "vm[web].ip", "vm[tiny].memory",
                      "dmz.allow[1].port"], problems
    assert all(p.startswith(f"{path.resolve()}: ") for p in problems)


def test_cli_validate_reports_problems_one_line_each(tmp_path):
    several = write(tmp_path / "several.toml", SEVERAL)
    broken = write(tmp_path / "broken.toml", "[dmz\n")
    result = subprocess.run([str(DMZCTL), "validate", str(several), str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 7, lines
    for line in lines[:6]:
        assert re.match(rf"dmzctl: {re.escape(str(several.resolve()))}: [a-z0-9_\[\]#.]+: \S", line), line
    assert lines[6].startswith(f"dmzctl: {broken}: TOML syntax error")
    assert result.stdout == ""


def test_cli_validate_good_examples():
    files = [EXAMPLES / "demo.toml", EXAMPLES / "web-and-mail.toml"]
    result = subprocess.run([str(DMZCTL), "validate", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert result.stdout.count(": ok (DMZ ") == 2


def test_examples_validate():
    demo, pub = load_all([EXAMPLES / "demo.toml", EXAMPLES / "web-and-mail.toml"])
    assert (demo.name, pub.name) == ("demo", "pub")
    assert [vm.name for vm in pub.vms] == ["web", "mail"]
    assert len(pub.holes) == 5
    assert pub.vm("mail").mac == "52:54:00:12:34:56"


# --- disks: the format comes from the config, never from the file ------------------------------

@pytest.mark.parametrize("entry,path,fmt", [
    ("/var/lib/dmzctl/web.qcow2", "/var/lib/dmzctl/web.qcow2", "qcow2"),
    ("/var/lib/dmzctl/WEB.QCOW2", "/var/lib/dmzctl/WEB.QCOW2", "qcow2"),
    ("/var/lib/dmzctl/web.img", "/var/lib/dmzctl/web.img", "raw"),
    ("/var/lib/dmzctl/web.qcow", "/var/lib/dmzctl/web.qcow", "raw"),  # only .qcow2 says qcow2
    ("/var/lib/dmzctl/web", "/var/lib/dmzctl/web", "raw"),
    ({"path": "/var/lib/dmzctl/web.img", "format": "qcow2"}, "/var/lib/dmzctl/web.img", "qcow2"),
    ({"path": "/var/lib/dmzctl/web.qcow2", "format": "raw"}, "/var/lib/dmzctl/web.qcow2", "raw"),
    ({"path": "/var/lib/dmzctl/web.qcow2"}, "/var/lib/dmzctl/web.qcow2", "qcow2"),
])
def test_disk_format_from_config_or_extension(entry, path, fmt):
    disk = parse_dmz(build(S("vm[0].disks[0]", entry))).vm("web").disks[0]
    assert (disk.path, disk.format, disk.backing) == (Path(path), fmt, ())


def test_disk_backing_chain_outermost_first():
    entry = {"path": "/d/web.qcow2", "backing": [{"path": "/d/mid.img", "format": "qcow2"}, "/d/base.qcow2",
                                                 {"path": "/d/debian.raw"}]}
    disk = parse_dmz(build(S("vm[0].disks[0]", entry))).vm("web").disks[0]
    assert [(str(i.path), i.format) for i in disk.chain] == [
        ("/d/web.qcow2", "qcow2"), ("/d/mid.img", "qcow2"), ("/d/base.qcow2", "qcow2"), ("/d/debian.raw", "raw")]


@pytest.mark.parametrize("key", ["path", "format", "backing", "backing[0]", "backing[0].path", "backing[0].format"])
def test_wrong_types_in_disk_tables_give_config_error(key):
    for value in WRONG_VALUES:
        disk = {"path": "/d/web.qcow2", "backing": [{"path": "/d/base.qcow2", "format": "qcow2"}]}
        data = build(S("vm[0].disks[0]", disk), S(f"vm[0].disks[0].{key}", value))
        try:
            parse_dmz(data, Path("/x.toml"))
        except ConfigError as exc:
            assert all(p.startswith("/x.toml: vm[web].disks[1]") and "\n" not in p for p in exc.problems), exc.problems
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"disks[0].{key} = {value!r}: {type(exc).__name__}: {exc}")


# --- helpers ----------------------------------------------------------------------------------

def test_limits_and_console_are_parsed(tmp_path):
    dmz = load_dmz(write(tmp_path / "pub.toml", BASE))
    web, mail = dmz.vm("web"), dmz.vm("mail")
    assert web.graphics_listen == mail.graphics_listen == "socket"  # the default too
    assert (web.limits.cpu_per_vcpu, web.limits.memory_max_mib, web.limits.disk_iops) == (0.5, 1536, 500)
    assert (web.limits.disk_bytes_per_sec, web.limits.net_to_vm_bytes_per_sec,
            web.limits.net_from_vm_bytes_per_sec) == (50 * 2 ** 20, 12_500_000, 2_500_000)
    assert web.limits and not mail.limits  # no [vm.limits]: no cap at all


@pytest.mark.parametrize("value, bytes_per_sec", [
    ("100Mbit/s", 12_500_000), ("100Mbit", 12_500_000), ("1Gbit/s", 125_000_000), ("8kbit/s", 1000),
    ("50MiB/s", 50 * 2 ** 20), ("1.5 GiB/s", 1.5 * 2 ** 30), ("10MB/s", 10 ** 7), ("10KB", 10 ** 4),
    ("512B/s", 512), ("800bit/s", 100),
])
def test_parse_rate(value, bytes_per_sec):
    assert parse_rate(value) == bytes_per_sec


@pytest.mark.parametrize("value", ["100", 100, "100 Mbps", "100mbit", "1e3MB/s", "-5MB/s", "5MB/h", "MB/s",
                                   "100Mbit/s\n"])
def test_parse_rate_rejects(value):
    with pytest.raises(ValueError):
        parse_rate(value)


@pytest.mark.parametrize("value,mib", [
    (512, 512), ("512", 512), ("512MiB", 512), ("512M", 512), (" 256 MiB ", 256), ("1GiB", 1024), ("2G", 2048),
    ("2048KiB", 2), ("1024K", 1),
])
def test_parse_memory(value, mib):
    assert parse_memory(value) == mib


@pytest.mark.parametrize("value", ["1000KiB", "1.5GiB", "512MB", "512 mib", "", "-1", "MiB", True, 512.0, None, [512]])
def test_parse_memory_rejects(value):
    with pytest.raises(ValueError):
        parse_memory(value)


def test_default_bridge():
    assert default_bridge("pub") == "dz-pub"
    assert default_bridge("a" * 12) == "dz-" + "a" * 12  # exactly IFNAMSIZ
    for name in ("a" * 13, "a" * 32, "abcdefghij-" * 2 + "x" * 10):
        bridge = default_bridge(name)
        assert len(bridge) <= IFNAMSIZ and BRIDGE_RE.match(bridge)
        assert bridge == default_bridge(name)
    assert default_bridge("b" * 31 + "1") != default_bridge("b" * 31 + "2")


def test_default_mac():
    mac = default_mac("pub", "web")
    assert mac == default_mac("pub", "web")
    assert MAC_RE.match(mac) and mac.startswith("52:54:00:")
    first = int(mac[:2], 16)
    assert not first & 1  # unicast
    assert first & 2  # locally administered
    assert len({default_mac("pub", "web"), default_mac("pub", "mail"), default_mac("dmz", "web")}) == 3


def test_default_mac_and_bridge_used(tmp_path):
    dmz = load_dmz(write(tmp_path / "pub.toml", build(D("dmz.bridge"))))
    assert dmz.bridge == "dz-pub"
    assert dmz.vm("web").mac == default_mac("pub", "web")
    assert dmz.vm("mail").mac == "52:54:00:12:34:56"


# --- fuzz: a wrong type anywhere gives ConfigError, never a crash ------------------------------

WRONG_VALUES = [
    7, -1, 0, 2**63 - 1, 2.5, float("nan"), float("inf"), True, False, "", "zz", "\u00b2", "x\n", "192.168.100.0/24",
    [], [1], ["a"], [{}], [[]], {}, {"a": 1}, {"name": "x"},
    datetime.date(2024, 1, 1), datetime.datetime(2024, 1, 1, 12, 0), datetime.time(12, 0),
]
FUZZ_PATHS = (
    ["dmz", "vm", "dmz.allow[0]", "dmz.protected[0]", "vm[0]", "vm[0].disks[0]"]
    + [f"dmz.{key}" for key in sorted(DMZ_KEYS)]
    + [f"dmz.allow[1].{key}" for key in sorted(ALLOW_KEYS)]
    + [f"vm[0].{key}" for key in sorted(VM_KEYS)]
    + [f"vm[1].{key}" for key in sorted(VM_KEYS)]
)


@pytest.mark.parametrize("path", FUZZ_PATHS)
def test_wrong_types_give_config_error(path):
    for value in WRONG_VALUES:
        data = build(S(path, value))
        try:
            parse_dmz(data, Path("/x.toml"))
        except ConfigError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.startswith("/x.toml: ") and "\n" not in problem, (path, value, problem)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{path} = {value!r}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("value", WRONG_VALUES, ids=repr)
def test_wrong_types_through_toml(tmp_path, value):
    """The same through a file: every DMZ key at once set to the wrong value."""
    data = build(*(S(f"dmz.{key}", value) for key in sorted(DMZ_KEYS)), *(S(f"vm[0].{key}", value) for key in VM_KEYS))
    try:
        load_dmz(write(tmp_path / "fuzz.toml", data))
    except ConfigError as exc:
        assert all("\n" not in p for p in exc.problems)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{value!r}: {type(exc).__name__}: {exc}")
