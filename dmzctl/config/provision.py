"""A VM made from a cloud image: `image`, `image_format`, `disk_size`, `pool`, [[vm.volume]] and
[vm.cloud_init]. The files the seed is made of (a file of keys, user_data) are read here, with the
config, so that a problem in them is reported as one, naming the field.

The image's format comes from the config (default: from its name), never from its content; its
virtual size is checked against disk_size on the host, before anything changes (host/images.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from .checker import Checker
from .model import DEFAULT_POOL, CloudInit, Image, Volume, default_format

PROVISION_KEYS = {"image", "image_format", "disk_size", "pool", "volume", "cloud_init"}
VOLUME_KEYS = {"name", "size"}
CLOUD_INIT_KEYS = {"hostname", "ssh_authorized_keys", "user_data"}
IMAGE_FORMATS = ("raw", "qcow2")
SIZE_RE = re.compile(r"^\s*([0-9]{1,15})\s*(B|KiB|MiB|GiB|TiB|K|M|G|T)\s*$")
SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "K": 1 << 10, "MiB": 1 << 20, "M": 1 << 20, "GiB": 1 << 30, "G": 1 << 30,
              "TiB": 1 << 40, "T": 1 << 40}
MIN_VOLUME = 1 << 20
POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
VOLUME_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
RESERVED_VOLUMES = ("root", "cidata")  # <vm>-root.qcow2 and <vm>-cidata.iso are the VM's own
HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z")
# An OpenSSH public key line: [options] type base64 [comment]; the type is what is checked.
KEY_TYPE_RE = re.compile(r"^(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+)\Z")
MAX_SEED_FILE = 64 * 1024


def parse_size(value: Any) -> int:
    """Bytes from a string such as '20GiB', '512MiB' or '10G' (binary units)."""
    match = SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def parse_provision(check: Checker, table: dict, where: str, name: Optional[str]) -> dict:
    """The VM fields of a cloud-image VM; None where a value is wrong (reported)."""
    image = _image(check, table, where)
    disk_size = check.parsed(table, "disk_size", parse_size, where, "a size such as '20GiB'")
    if disk_size is not None and disk_size < MIN_VOLUME:
        check.problem(f"{where}.disk_size", f"{table['disk_size']!r} is too small; at least 1MiB")
        disk_size = None
    if "image" in table and "disk_size" not in table:
        check.problem(f"{where}.disk_size", "required with vm.image: the root volume's size, e.g. '20GiB'")
    if "disk_size" in table and "image" not in table:
        check.problem(f"{where}.disk_size", "only makes sense with vm.image (the root volume's size)")
    pool = check.typed(table, "pool", str, where, default=DEFAULT_POOL)
    if pool is not None and not POOL_RE.match(pool):
        check.problem(f"{where}.pool", f"{pool!r} must be 1-64 characters of A-Z a-z 0-9 '_' '.' '-'")
        pool = None
    volumes = _volumes(check, table, where)
    cloud_init = _cloud_init(check, table, where, name) if "cloud_init" in table or "image" in table else None
    return {"image": image, "disk_size": disk_size, "pool": pool, "volumes": volumes, "cloud_init": cloud_init}


def _image(check: Checker, table: dict, where: str) -> Optional[Image]:
    path = check.absolute_path(check.typed(table, "image", str, where), f"{where}.image")
    chosen = check.choice(table, "image_format", IMAGE_FORMATS, where, default_format(path or ""))
    if "image_format" in table and "image" not in table:
        check.problem(f"{where}.image_format", "only makes sense with vm.image")
    if path is None or chosen is None:
        return None
    return Image(Path(path), chosen)


def _volumes(check: Checker, table: dict, where: str) -> tuple[Volume, ...]:
    raw = check.typed(table, "volume", list, where, default=[], kind_name="an array of tables [[vm.volume]]")
    volumes, seen = [], set()
    for index, entry in enumerate(raw or []):
        here = f"{where}.volume[{index + 1}]"
        if not isinstance(entry, dict):
            check.problem(here, "must be a table [[vm.volume]] with name and size")
            continue
        check.unknown_keys(entry, VOLUME_KEYS, here)
        name = check.typed(entry, "name", str, here, required=True)
        if name is not None and (not VOLUME_NAME_RE.match(name) or name in RESERVED_VOLUMES):
            check.problem(f"{here}.name", f"{name!r} must be 1-32 characters of a-z 0-9 '_' '-', and not "
                                          f"{' or '.join(RESERVED_VOLUMES)} (the VM's own volumes)")
            name = None
        elif name in seen:
            check.problem(f"{here}.name", f"{name!r} is already a volume of this VM")
            name = None
        size = check.parsed(entry, "size", parse_size, here, "a size such as '10GiB'")
        if "size" not in entry:
            check.problem(f"{here}.size", "required but missing")
        elif size is not None and size < MIN_VOLUME:
            check.problem(f"{here}.size", f"{entry['size']!r} is too small; at least 1MiB")
            size = None
        if name is not None and size is not None:
            seen.add(name)
            volumes.append(Volume(name, size))
    return tuple(volumes)


def _cloud_init(check: Checker, table: dict, where: str, name: Optional[str]) -> Optional[CloudInit]:
    raw = table.get("cloud_init", {})
    here = f"{where}.cloud_init"
    if not isinstance(raw, dict):
        check.problem(here, "must be a table [vm.cloud_init]")
        return None
    check.unknown_keys(raw, CLOUD_INIT_KEYS, here)
    hostname = check.typed(raw, "hostname", str, here, default=name)
    if "hostname" in raw and hostname is not None and not HOSTNAME_RE.match(hostname):
        check.problem(f"{here}.hostname", f"{hostname!r} must be a host name: labels of a-z 0-9 '-', dot-separated")
        hostname = None
    keys = _keys(check, raw, here)
    user_data = check.absolute_path(check.typed(raw, "user_data", str, here), f"{here}.user_data")
    text = _user_data(check, Path(user_data), f"{here}.user_data") if user_data else None
    if hostname is None or keys is None or (user_data is not None and text is None):
        return None
    return CloudInit(hostname, keys, Path(user_data) if user_data else None, text)


def _read(check: Checker, path: Path, where: str) -> Optional[str]:
    try:
        data = path.read_bytes()[:MAX_SEED_FILE + 1]
    except OSError as error:
        check.problem(where, f"cannot read {path}: {error.strerror}")
        return None
    if len(data) > MAX_SEED_FILE:
        check.problem(where, f"{path} is larger than {MAX_SEED_FILE // 1024} KiB")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        check.problem(where, f"{path} is not UTF-8 text")
        return None


def _keys(check: Checker, raw: dict, where: str) -> Optional[tuple[str, ...]]:
    """A list of public keys, or the absolute path of a file of them (one a line, # comments)."""
    value = raw.get("ssh_authorized_keys", [])
    field = f"{where}.ssh_authorized_keys"
    if isinstance(value, str):
        if check.absolute_path(value, field) is None:
            return None
        text = _read(check, Path(value), field)
        if text is None:
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not lines:
            check.problem(field, f"{value} holds no key")
            return None
        origin = f"{value}: line"
    elif isinstance(value, list) and all(isinstance(key, str) for key in value):
        lines, origin = [key.strip() for key in value], "key"
    else:
        check.problem(field, f"must be a list of public keys or the absolute path of a file of keys; got {value!r}")
        return None
    bad = [f"{origin} {index + 1}" for index, key in enumerate(lines) if not _is_key(key)]
    if bad:
        check.problem(field, f"{', '.join(bad)}: not an OpenSSH public key ('ssh-ed25519 AAAA... comment')")
        return None
    return tuple(lines)


def _is_key(line: str) -> bool:
    words = line.split()
    return "\n" not in line and any(KEY_TYPE_RE.match(word) and index + 1 < len(words)
                                    for index, word in enumerate(words[:2]))


def _user_data(check: Checker, path: Path, where: str) -> Optional[str]:
    text = _read(check, path, where)
    if text is None:
        return None
    if not text.startswith("#cloud-config"):
        check.problem(where, f"{path} must start with '#cloud-config' (only cloud-config is merged)")
        return None
    import yaml  # only when there is user data to check

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        check.problem(where, f"{path} is not valid YAML{at}")
        return None
    if data is not None and not isinstance(data, dict):
        check.problem(where, f"{path} must hold a mapping (keys such as packages:, runcmd:)")
        return None
    return text
