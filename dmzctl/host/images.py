"""Before a VM starts: do its qcow2 files say what the config says about their backing chain?

The config alone decides each disk's format and backing chain, and the domain XML spells
all of it out, so libvirt probes nothing. This check is the second layer: a qcow2 file
whose header names a backing file the config does not name (or none, or another one) is
refused before anything on the host changes, so that QEMU is never pointed at a file the
admin did not choose. Raw files are never read: the guest writes them, and a header found
there means nothing. Headers are read here, in Python: never by qemu-img, which would
itself follow the chain (libvirt's kbase "Disk image chains": reading the header of an
image of known format is safe, probing one is not).

qcow2 layout (QEMU's docs/interop/qcow2.txt), big-endian:
   0  magic "QFI\\xfb"           4  version (2 or 3)
   8  backing_file_offset (u64)  16  backing_file_size (u32)   20  cluster_bits (u32)
  72  (v3) incompatible_features (u64) ... 100 header_length (u32)
  then header extensions (type u32, length u32, data padded to 8) up to type 0;
  everything of the header lies in the first cluster.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import DMZ, VM, Disk, Image
from ..errors import HostError
from ..render.domain import disk_target

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_BACKING_NAME = 1023  # QEMU refuses longer names
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPAT_DATA_FILE = 1 << 2
# The header, its extensions and the backing file name all lie in the first cluster.
HEAD_BYTES = 1 << MAX_CLUSTER_BITS


class BadHeader(ValueError):
    """Not a qcow2 header, or one QEMU would not open either; str() says why."""


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    backing_file: Optional[str]  # as written in the header: may be relative to the image
    backing_format: Optional[str]  # from the backing-format extension, when present
    data_file: bool  # an external data file: QEMU would open another file


def parse_qcow2_header(head: bytes) -> Qcow2Header:
    """The parts of a qcow2 header that name other files, from the file's first bytes."""
    if len(head) < 4 or head[:4] != MAGIC:
        raise BadHeader("has no qcow2 header (magic QFI\\xfb)")
    if len(head) < V2_HEADER_LENGTH:
        raise BadHeader("has a truncated qcow2 header")
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", head, 4)
    if version not in (2, 3):
        raise BadHeader(f"has qcow2 version {version}; only 2 and 3 exist")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise BadHeader(f"has an invalid qcow2 cluster size (2^{cluster_bits})")
    cluster = 1 << cluster_bits
    header_length, incompatible = V2_HEADER_LENGTH, 0
    if version == 3:
        if len(head) < V3_MIN_HEADER_LENGTH:
            raise BadHeader("has a truncated qcow2 version 3 header")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        (header_length,) = struct.unpack_from(">I", head, 100)
        if header_length < V3_MIN_HEADER_LENGTH or header_length % 8 or header_length > cluster:
            raise BadHeader(f"has an invalid qcow2 header length {header_length}")
    backing_file = _backing_name(head, backing_offset, backing_size, cluster)
    extensions = _extensions(head, header_length, cluster)
    backing_format = extensions.get(EXT_BACKING_FORMAT)
    return Qcow2Header(
        version=version,
        backing_file=backing_file,
        backing_format=backing_format.decode("utf-8", "replace") if backing_format is not None else None,
        data_file=bool(incompatible & INCOMPAT_DATA_FILE) or EXT_DATA_FILE in extensions,
    )


def _backing_name(head: bytes, offset: int, size: int, cluster: int) -> Optional[str]:
    if offset == 0 or size == 0:
        return None
    if size > MAX_BACKING_NAME or offset + size > min(cluster, len(head)):
        raise BadHeader("names a backing file outside its first cluster or longer than QEMU allows")
    return head[offset:offset + size].decode("utf-8", "replace")


def _extensions(head: bytes, start: int, cluster: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    end = min(cluster, len(head))
    offset = start
    while offset + 8 <= end:
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == EXT_END:
            return found
        offset += 8
        if offset + length > end:
            raise BadHeader("has a qcow2 header extension beyond its first cluster")
        found[kind] = head[offset:offset + length]
        offset += (length + 7) // 8 * 8
    raise BadHeader("has qcow2 header extensions without an end marker in the first cluster")


def read_head(path: Path) -> bytes:
    """The first bytes of a file the config declares qcow2 (never of a raw one)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)  # a FIFO in its place must not hang up
    with os.fdopen(fd, "rb") as handle:
        return handle.read(HEAD_BYTES) or b""


def resolved_backing(image: Path, backing_file: str) -> Path:
    """Where QEMU would look: a relative name is relative to the image's directory."""
    return Path(os.path.normpath(image.parent / backing_file))


def layer_problem(image: Image, below: Optional[Image], header: Qcow2Header) -> Optional[str]:
    """What is wrong with one qcow2 layer's header, given the layer the config puts below it."""
    if header.data_file:
        return "names an external data file in its qcow2 header, which dmzctl does not support"
    named = resolved_backing(image.path, header.backing_file) if header.backing_file is not None else None
    if named is None and below is None:
        return None
    if below is None:
        return f"names backing file {_shown(header.backing_file)} in its qcow2 header, and the config names none"
    if named is None:
        return f"has no backing file in its qcow2 header, but the config names {below.path}"
    if named != below.path:
        return (f"names backing file {_shown(header.backing_file)} in its qcow2 header, but the config names "
                f"{below.path}")
    if header.backing_format is not None and header.backing_format != below.format:
        return (f"says its backing file {below.path} is {_shown(header.backing_format)} in its qcow2 header, "
                f"but the config says {below.format}")
    return None


def _shown(text: str) -> str:
    """Header text as it can be shown in one line: whoever wrote the file chose it."""
    return text if text.isprintable() else repr(text)


ReadHead = Callable[[Path], bytes]


def disk_problem(disk: Disk, read: ReadHead = read_head) -> Optional[tuple[Image, str]]:
    """The first layer of a disk's chain whose file disagrees with the config, and how; None when all agree."""
    chain = disk.chain
    for index, image in enumerate(chain):
        if image.format != "qcow2":
            continue  # raw: never read, whatever the guest wrote into it
        below = chain[index + 1] if index + 1 < len(chain) else None
        try:
            problem = layer_problem(image, below, parse_qcow2_header(read(image.path)))
        except BadHeader as error:
            problem = f"is declared qcow2 but {error}"
        except OSError as error:
            problem = f"cannot be read ({error.strerror})"
        if problem is not None:
            return image, problem
    return None


def check_disks(dmz: DMZ, vm_names: list[str], read: ReadHead = read_head) -> None:
    """Refuse, before anything changes, to start a VM whose qcow2 files name files the config does not."""
    for vm in dmz.vms:
        if vm.name not in vm_names:
            continue
        check_image(vm, read)
        first = 1 if vm.image is not None else 0  # the root volume is vda
        for index, disk in enumerate(vm.disks, start=first):
            found = disk_problem(disk, read)
            if found is None:
                continue
            image, problem = found
            disk_name = disk_target(index) if image.path == disk.path else f"{disk_target(index)} ({disk.path})"
            raise HostError(f"VM {vm.name}: disk {disk_name}: {image.path} {problem}; refusing to start it "
                            f"(name the backing chain and formats in vm.disks, or fix the file)")


def qcow2_virtual_size(head: bytes) -> int:
    """The guest-visible size a qcow2 header states (offset 24, u64), after the header checks."""
    parse_qcow2_header(head)
    return struct.unpack_from(">Q", head, 24)[0]


def check_image(vm: VM, read: ReadHead = read_head) -> None:
    """A cloud-image VM's base image: self-contained as the config says, readable by QEMU's user
    without relabelling (dmzctl asks libvirt not to chown a shared image), and no larger than
    disk_size (a qcow2 file's size from its header; a raw file's is its length)."""
    if vm.image is None:
        return
    image, where = vm.image, f"VM {vm.name}: image {vm.image.path}"
    found = disk_problem(Disk(image.path, image.format, ()), read)
    if found is not None:
        raise HostError(f"{where} {found[1]}; a base image must be a file of its own (vm.image, vm.image_format)")
    try:
        mode = image.path.stat().st_mode
        size = qcow2_virtual_size(read(image.path)) if image.format == "qcow2" else image.path.stat().st_size
    except OSError as error:
        raise HostError(f"{where} cannot be read ({error.strerror})") from None
    if not mode & 0o004:
        raise HostError(f"{where} is not readable by QEMU's user (mode {mode & 0o777:04o}); make it world-readable "
                        f"(chmod a+r): dmzctl tells libvirt never to chown a shared base image")
    if size > vm.disk_size:
        raise HostError(f"VM {vm.name}: disk_size {vm.disk_size} bytes is smaller than image {image.path} "
                        f"({size} bytes); set vm.disk_size to at least {-(-size // (1 << 30))}GiB")
