"""The checking machinery every table shares: a collector of problems with typed getters, and
the parsers of values that are more than a TOML type (addresses, networks, ports, sizes, rates).

A getter reports what is wrong with a value and returns None in its place, so that a caller goes
on checking the rest of the file and the user sees every problem at once.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .model import FlowCaps, IPNetwork

MEMORY_RE = re.compile(r"^\s*([0-9]+)\s*(KiB|MiB|GiB|K|M|G)?\s*$")
PORT_RANGE_RE = re.compile(r"^([0-9]{1,9})-([0-9]{1,9})\Z")  # bounded: int() refuses > 4300 digits
# A rate: a number, a unit of bits or bytes (decimal k/M/G or binary Ki/Mi/Gi for bytes), optional "/s".
BYTE_RATE_RE = re.compile(r"^([0-9]{1,12}(?:\.[0-9]{1,6})?)\s*(bit|kbit|Mbit|Gbit|B|kB|KB|MB|GB|KiB|MiB|GiB)(?:/s)?\Z")
RATE_UNITS = {"bit": 1 / 8, "kbit": 1000 / 8, "Mbit": 1000 ** 2 / 8, "Gbit": 1000 ** 3 / 8, "B": 1,
              "kB": 1000, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
              "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
KIB_PER_UNIT = {"KiB": 1, "K": 1, "MiB": 1024, "M": 1024, "GiB": 1024 * 1024, "G": 1024 * 1024}
KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}


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
    kib = int(match.group(1)) * KIB_PER_UNIT[match.group(2) or "MiB"]
    if kib % 1024:
        raise ValueError
    return kib // 1024


def parse_rate(value: Any) -> float:
    """Bytes per second from a string such as '100Mbit/s', '50MiB/s' or '10MB'."""
    match = BYTE_RATE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


class Checker:
    """Collects the problems of one file, each as "<file>: <field>: <what to do>"."""

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
        """table[key] if it is of `kind` (float: any number; int: never a bool), default if absent."""
        if key not in table:
            if required:
                self.problem(f"{where}.{key}", "required but missing")
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            self.problem(f"{where}.{key}", f"must be {kind_name or KIND_NAMES.get(kind, str(kind))}, got {value!r}")
            return None
        return value

    def choice(self, table: dict, key: str, choices: tuple, where: str, default: Optional[str]):
        value = self.typed(table, key, str, where, default=default)
        if value is not None and value not in choices:
            self.problem(f"{where}.{key}", f"must be one of {', '.join(choices)}; got {value!r}")
            return None
        return value

    def parsed(self, table: dict, key: str, parse, where: str, expected: str):
        """parse(table[key]); None when absent, or when parse raises ValueError (reported)."""
        if key not in table:
            return None
        try:
            return parse(table[key])
        except ValueError:
            self.problem(f"{where}.{key}", f"{table[key]!r} must be {expected}")
            return None

    def within(self, value, low, high, where: str, unit: str = "") -> bool:
        """Whether low <= value <= high; reports it when not."""
        if low <= value <= high:
            return True
        self.problem(where, f"{value} must be between {low} and {high}{unit}")
        return False

    def absolute_path(self, value: Optional[str], where: str) -> Optional[str]:
        if value is not None and not value.startswith("/"):
            self.problem(where, f"must be an absolute path; got {value!r}")
            return None
        return value

    def interface(self, value: Any, where: str, version: int):
        """An address with its prefix length, such as a gateway's."""
        if value is None:
            return None
        if not isinstance(value, str) or "/" not in value:
            self.problem(where, f"must be an address with its prefix length, like "
                                f"{'192.168.100.1/24' if version == 4 else 'fd00:100::1/64'}; got {value!r}")
            return None
        return self._of_version(ipaddress.ip_interface, value, where, version, "address/prefix")

    def network(self, value: Any, where: str) -> Optional[IPNetwork]:
        if not isinstance(value, str):
            self.problem(where, f"must be a string such as '192.168.1.0/24'; got {value!r}")
            return None
        try:
            return ipaddress.ip_network(value, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(value, strict=False)
            except ValueError:
                self.problem(where, f"{value!r} is not a valid address or prefix")
                return None
            self.problem(where, f"{value!r} has host bits set; did you mean '{loose}'?")
            return None

    def address(self, value: Any, where: str, version: Optional[int] = None):
        if value is None:
            return None
        if not isinstance(value, str):
            self.problem(where, f"must be an address string; got {value!r}")
            return None
        return self._of_version(ipaddress.ip_address, value, where, version, "address")

    def _of_version(self, parse, value: str, where: str, version: Optional[int], kind: str):
        """parse(value), of that IP version (any when None); kind names it in messages."""
        try:
            parsed = parse(value)
        except ValueError:
            self.problem(where, f"{value!r} is not a valid {f'IPv{version} ' if version else ''}{kind}")
            return None
        if version and parsed.version != version:
            self.problem(where, f"must be an IPv{version} {kind}; got {value!r}")
            return None
        return parsed

    def ports(self, value: Any, where: str) -> Optional[tuple[int, int]]:
        """An inclusive range from a port number or a string 'a-b'."""
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and PORT_RANGE_RE.match(value):
            low, high = (int(x) for x in PORT_RANGE_RE.match(value).groups())
        elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value):
            low = high = int(value)
        else:
            self.problem(where, f"must be a port number or a range 'a-b'; got {value!r}")
            return None
        if not (1 <= low <= 65535 and 1 <= high <= 65535):
            self.problem(where, f"port {value!r} is out of range; ports are 1-65535")
            return None
        if low > high:
            self.problem(where, f"range {value!r} runs backwards; write '{high}-{low}'")
            return None
        return (low, high)


def _closest(key: str, allowed: set) -> Optional[str]:
    import difflib  # only when there is a typo to name

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None


@dataclass(frozen=True)
class DmzScope:
    """What [dmz] says that the [[vm]] and [[dmz.allow]] tables are checked against;
    None where it is missing or wrong (already reported)."""

    name: Optional[str]
    gateway: Optional[ipaddress.IPv4Interface]
    gateway6: Optional[ipaddress.IPv6Interface]
    dhcp: Optional[bool]
    flow_caps: Optional[FlowCaps]

    def subnet(self, version: int) -> Optional[IPNetwork]:
        """The DMZ's own subnet of that IP version, if it has a valid one."""
        gateway = self.gateway if version == 4 else self.gateway6
        return gateway.network if gateway is not None else None
