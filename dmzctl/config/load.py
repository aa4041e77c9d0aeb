"""Reading configuration files: one DMZ a file, and what must be unique across the DMZs of a host."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

from ..errors import ConfigError
from .dmz import parse_dmz
from .model import DMZ

DEFAULT_CONFIG_DIR = Path("/etc/dmzctl")


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


def load_all(paths: list[Path]) -> list[DMZ]:
    """Load several files and check what must be unique across DMZs on one host."""
    problems: list[str] = []
    dmzs: list[DMZ] = []
    for path in paths:
        try:
            dmzs.append(load_dmz(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    problems += _shared_names(dmzs) + _overlapping_subnets(dmzs)
    if problems:
        raise ConfigError(problems)
    return dmzs


def _shared_names(dmzs: list[DMZ]) -> list[str]:
    """libvirt's networks and domains, and Linux's bridges, are one namespace on the host."""
    problems = []
    owners: dict[tuple, str] = {}
    for dmz in dmzs:
        keys = [(("network", dmz.name), "dmz.name"), (("bridge", dmz.bridge), "dmz.bridge")]
        keys += [(("domain", vm.name), f"vm[{vm.name}].name") for vm in dmz.vms]
        for key, where in keys:
            if key in owners:
                problems.append(f"{dmz.source}: {where}: {key[1]!r} is also used by {owners[key]}")
            else:
                owners[key] = str(dmz.source)
    return problems


def _overlapping_subnets(dmzs: list[DMZ]) -> list[str]:
    problems = []
    for i, first in enumerate(dmzs):
        for second in dmzs[i + 1:]:
            for a, b, label in ((first.subnet, second.subnet, "dmz.gateway"),
                                (first.subnet6, second.subnet6, "dmz.gateway6")):
                if a is not None and b is not None and a.overlaps(b):
                    problems.append(f"{second.source}: {label}: subnet {b} overlaps {a} of {first.source}")
    return problems


def default_config_paths(directory: Path = DEFAULT_CONFIG_DIR) -> list[Path]:
    return sorted(directory.glob("*.toml"))
