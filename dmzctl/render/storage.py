"""A cloud-image VM's storage in libvirt's terms: the pool, and the volumes dmzctl makes in it.

Volumes are created through libvirt's storage API (virStorageVolCreateXML), so that libvirt runs
qemu-img, never dmzctl, and virt-manager lists them in the pool. The root volume is a qcow2
overlay whose backing store is the base image, with the base image's format written out: nothing
is probed. Data volumes are empty qcow2 volumes; the seed is a raw (ISO 9660) volume.
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from ..config import (
    DEFAULT_POOL, VM, Volume, data_volume_name, root_volume_name, seed_volume_name, volume_names,
)
from .base import sub

DEFAULT_POOL_DIR = Path("/var/lib/dmzctl/pool")
VOLUME_MODE = "0600"  # root's until libvirt hands it to QEMU's user at start (and back at stop)


def volumes_of(vm: VM) -> list[tuple[str, str]]:
    """(pool, volume name) of every volume dmzctl makes for the VM: what `destroy --delete-volumes` removes."""
    return [(vm.pool, name) for name in volume_names(vm)]


def render_pool(name: str, path: Path = DEFAULT_POOL_DIR) -> etree._Element:
    """A directory pool: libvirt's simplest, the one virt-manager makes by default."""
    pool = etree.Element("pool", type="dir")
    sub(pool, "name", name)
    target = sub(pool, "target")
    sub(target, "path", str(path))
    permissions = sub(target, "permissions")
    sub(permissions, "mode", "0711")  # QEMU's user reaches the volumes, lists nothing
    sub(permissions, "owner", "0")
    sub(permissions, "group", "0")
    return pool


def _volume(name: str, capacity: int, fmt: str) -> etree._Element:
    volume = etree.Element("volume", type="file")
    sub(volume, "name", name)
    sub(volume, "capacity", str(capacity), unit="bytes")
    target = sub(volume, "target")
    sub(target, "format", type=fmt)
    permissions = sub(target, "permissions")
    sub(permissions, "mode", VOLUME_MODE)
    return volume


def render_root_volume(vm: VM) -> etree._Element:
    """The VM's root disk: a qcow2 overlay of the base image, of disk_size, the base's format stated."""
    volume = _volume(root_volume_name(vm.name), vm.disk_size, "qcow2")
    backing = sub(volume, "backingStore")
    sub(backing, "path", str(vm.image.path))
    sub(backing, "format", type=vm.image.format)
    return volume


def render_data_volume(vm: VM, data: Volume) -> etree._Element:
    return _volume(data_volume_name(vm.name, data.name), data.size, "qcow2")


def render_seed_volume(vm: VM, size: int) -> etree._Element:
    """Room for the seed ISO, uploaded into it afterwards (virStorageVolUpload)."""
    return _volume(seed_volume_name(vm.name), size, "raw")


def pool_dir(pool: str, pool_paths: dict[str, str]) -> Path:
    """Where a pool keeps its volumes: as the host says, else where dmzctl makes its own pool.

    A pool that is neither on the host nor dmzctl's cannot be used (`up` refuses it before
    anything changes); its volumes are shown under a path that says so.
    """
    if pool in pool_paths:
        return Path(pool_paths[pool])
    return DEFAULT_POOL_DIR if pool == DEFAULT_POOL else Path(f"/nonexistent-pool/{pool}")


def root_volume_path(vm: VM, pool_paths: dict[str, str]) -> Path:
    return pool_dir(vm.pool, pool_paths) / root_volume_name(vm.name)


def seed_volume_path(vm: VM, pool_paths: dict[str, str]) -> Path:
    return pool_dir(vm.pool, pool_paths) / seed_volume_name(vm.name)


def data_volume_path(vm: VM, data: Volume, pool_paths: dict[str, str]) -> Path:
    return pool_dir(vm.pool, pool_paths) / data_volume_name(vm.name, data.name)
