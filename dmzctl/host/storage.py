"""libvirt's storage API: pools and volumes, by name (part of Virt, as a mixin).

Volumes are made by libvirt (virStorageVolCreateXML: libvirt runs qemu-img), filled through
its upload stream (virStorageVolUpload), and so are listed by `virsh vol-list` and virt-manager.
dmzctl never writes into a pool's directory itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lxml import etree

from ..errors import HostError
from .objects import describe

try:
    import libvirt
except ImportError:  # reported when a connection is needed, not at import
    libvirt = None

MAX_SEED_READ = 16 << 20  # a seed is some KiB; never read more than this back


@dataclass(frozen=True)
class PoolInfo:
    name: str
    path: Optional[str]  # its target directory (dir pools)
    active: bool
    autostart: bool


@dataclass(frozen=True)
class VolumeInfo:
    pool: str
    name: str
    path: str
    key: str  # libvirt's stable identity of the volume (the file's path for dir pools)
    capacity: int
    format: Optional[str]
    backing: Optional[str]  # the backing store's path, as libvirt records it
    backing_format: Optional[str]


class StorageMixin:
    conn: "libvirt.virConnect"

    def _pool(self, name: str):
        try:
            return self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                return None
            raise HostError(f"looking up storage pool {name}: {describe(error)}") from None

    def pool_info(self, name: str) -> Optional[PoolInfo]:
        pool = self._pool(name)
        if pool is None:
            return None
        try:
            xml = etree.fromstring(pool.XMLDesc(0).encode())
            return PoolInfo(name, xml.findtext("target/path"), bool(pool.isActive()), bool(pool.autostart()))
        except libvirt.libvirtError as error:
            raise HostError(f"reading storage pool {name}: {describe(error)}") from None

    def create_pool(self, xml: str) -> None:
        """Define, build (make its directory), start and autostart a pool."""
        name = etree.fromstring(xml.encode()).findtext("name")
        try:
            pool = self.conn.storagePoolDefineXML(xml, 0)
            pool.build(0)
            pool.create(0)
            pool.setAutostart(1)
        except libvirt.libvirtError as error:
            raise HostError(f"creating storage pool {name}: {describe(error)}") from None

    def start_pool(self, name: str) -> None:
        pool = self._must_pool(name)
        try:
            if not pool.isActive():
                pool.create(0)
        except libvirt.libvirtError as error:
            raise HostError(f"starting storage pool {name}: {describe(error)}") from None

    def remove_pool(self, name: str) -> None:
        """Stop and undefine a pool (its directory stays when it holds anything)."""
        pool = self._pool(name)
        if pool is None:
            return
        try:
            if pool.isActive():
                pool.destroy()
            try:
                pool.delete(0)
            except libvirt.libvirtError:
                pass  # not empty: the directory and what is in it stay
            pool.undefine()
        except libvirt.libvirtError as error:
            raise HostError(f"removing storage pool {name}: {describe(error)}") from None

    def _must_pool(self, name: str):
        pool = self._pool(name)
        if pool is None:
            raise HostError(f"storage pool {name} does not exist")
        return pool

    def _volume(self, pool_name: str, name: str):
        pool = self._pool(pool_name)
        if pool is None or not pool.isActive():
            return None
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise HostError(f"looking up volume {name} in pool {pool_name}: {describe(error)}") from None

    def volume_info(self, pool: str, name: str) -> Optional[VolumeInfo]:
        volume = self._volume(pool, name)
        if volume is None:
            return None
        try:
            xml = etree.fromstring(volume.XMLDesc(0).encode())
        except libvirt.libvirtError as error:
            raise HostError(f"reading volume {name} in pool {pool}: {describe(error)}") from None
        fmt = xml.find("target/format")
        backing_fmt = xml.find("backingStore/format")
        return VolumeInfo(pool=pool, name=name, path=xml.findtext("target/path"), key=xml.findtext("key"),
                          capacity=int(xml.findtext("capacity") or 0),
                          format=fmt.get("type") if fmt is not None else None,
                          backing=xml.findtext("backingStore/path"),
                          backing_format=backing_fmt.get("type") if backing_fmt is not None else None)

    def create_volume(self, pool_name: str, xml: str) -> str:
        """Create a volume from its XML (libvirt runs qemu-img); its path."""
        name = etree.fromstring(xml.encode()).findtext("name")
        pool = self._must_pool(pool_name)
        try:
            return pool.createXML(xml, 0).path()
        except libvirt.libvirtError as error:
            raise HostError(f"creating volume {name} in pool {pool_name}: {describe(error)}") from None

    def upload_volume(self, pool: str, name: str, data: bytes) -> None:
        """Write data at the start of the volume through libvirt's upload stream."""
        volume = self._volume(pool, name)
        if volume is None:
            raise HostError(f"volume {name} in pool {pool} is gone")
        stream = self.conn.newStream(0)
        try:
            volume.upload(stream, 0, len(data), 0)
            sent = 0
            while sent < len(data):
                sent += stream.send(data[sent:sent + (1 << 20)])
            stream.finish()
        except libvirt.libvirtError as error:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            raise HostError(f"uploading into volume {name} in pool {pool}: {describe(error)}") from None

    def read_volume(self, pool: str, name: str, length: int = MAX_SEED_READ) -> Optional[bytes]:
        """The first `length` bytes of a volume, through libvirt's download stream; None when absent."""
        volume = self._volume(pool, name)
        if volume is None:
            return None
        stream = self.conn.newStream(0)
        chunks: list[bytes] = []
        try:
            volume.download(stream, 0, length, 0)
            while True:
                chunk = stream.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            stream.finish()
        except libvirt.libvirtError as error:
            raise HostError(f"reading volume {name} in pool {pool}: {describe(error)}") from None
        return b"".join(chunks)

    def delete_volume(self, pool: str, name: str) -> None:
        """Delete a volume and its file; nothing when it is absent."""
        volume = self._volume(pool, name)
        if volume is None:
            return
        try:
            volume.delete(0)
        except libvirt.libvirtError as error:
            raise HostError(f"deleting volume {name} in pool {pool}: {describe(error)}") from None


def pool_path(info: Optional[PoolInfo]) -> Optional[Path]:
    return Path(info.path) if info is not None and info.path else None
