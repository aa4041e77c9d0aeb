"""The qcow2 header check: dmzctl reads headers itself, and only of files the config declares qcow2.

Images are made with qemu-img in temporary directories (making them is fine; dmzctl itself
never runs qemu-img on an image). Hand-made headers cover what qemu-img refuses to write.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from dmzctl.config import Disk, Image, parse_dmz
from dmzctl.errors import HostError
from dmzctl.host.images import (
    BadHeader, check_disks, disk_problem, layer_problem, parse_qcow2_header, read_head, resolved_backing,
)

ROOT = Path(__file__).resolve().parents[1]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", *args], check=True, capture_output=True, timeout=60)


def header_of(path: Path):
    return parse_qcow2_header(read_head(path))


def raw_file(path: Path, content: bytes = b"", size: int = 1 << 20) -> Path:
    path.write_bytes(content.ljust(size, b"\0"))
    return path


def handmade(version: int = 3, backing: bytes = b"", cluster_bits: int = 16, extensions: bytes = b"",
             incompatible: int = 0, header_length: int = 104) -> bytes:
    """A qcow2 header as the spec lays it out, extensions after it, the backing name after those."""
    head = bytearray(1 << cluster_bits)
    fixed = header_length if version == 3 else 72
    ext = extensions + struct.pack(">II", 0, 0)
    name_offset = fixed + len(ext) if backing else 0
    struct.pack_into(">4sIQII", head, 0, b"QFI\xfb", version, name_offset, len(backing), cluster_bits)
    if version == 3:
        struct.pack_into(">Q", head, 72, incompatible)
        struct.pack_into(">I", head, 100, header_length)
    head[fixed:fixed + len(ext)] = ext
    head[name_offset:name_offset + len(backing)] = backing
    return bytes(head)


def extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data.ljust((len(data) + 7) // 8 * 8, b"\0")


# --- the parser, on what qemu-img writes -------------------------------------------------------

@pytest.mark.parametrize("compat,version", [("1.1", 3), ("0.10", 2)])
def test_parses_image_without_backing(tmp_path, compat, version):
    qemu_img("-f", "qcow2", "-o", f"compat={compat}", str(tmp_path / "a.qcow2"), "1M")
    header = header_of(tmp_path / "a.qcow2")
    assert (header.version, header.backing_file, header.backing_format, header.data_file) == (version, None, None,
                                                                                               False)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_parses_backing_file_and_format(tmp_path, compat, fmt):
    base = tmp_path / f"base.{fmt}"
    qemu_img("-f", fmt, str(base), "1M")
    qemu_img("-f", "qcow2", "-o", f"compat={compat}", "-b", str(base), "-F", fmt, str(tmp_path / "top.qcow2"))
    header = header_of(tmp_path / "top.qcow2")
    assert (header.backing_file, header.backing_format) == (str(base), fmt)


def test_relative_backing_name_is_kept_as_written_and_resolved_like_qemu(tmp_path):
    (tmp_path / "images").mkdir()
    qemu_img("-f", "qcow2", "-u", "-b", "../base/b.qcow2", "-F", "qcow2", str(tmp_path / "images" / "top.qcow2"),
             "1M")
    header = header_of(tmp_path / "images" / "top.qcow2")
    assert header.backing_file == "../base/b.qcow2"
    assert resolved_backing(tmp_path / "images" / "top.qcow2", header.backing_file) == tmp_path / "base" / "b.qcow2"


def test_external_data_file_is_seen(tmp_path):
    qemu_img("-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(tmp_path / "a.qcow2"), "1M")
    assert header_of(tmp_path / "a.qcow2").data_file


def test_a_raw_file_is_not_qcow2(tmp_path):
    with pytest.raises(BadHeader, match="has no qcow2 header"):
        header_of(raw_file(tmp_path / "disk.img", b"hello"))
    with pytest.raises(BadHeader, match="has no qcow2 header"):
        parse_qcow2_header(b"")


# --- the parser, on headers qemu-img would not write -------------------------------------------

def test_handmade_header_without_backing_format_extension():
    header = parse_qcow2_header(handmade(backing=b"/etc/shadow"))
    assert (header.backing_file, header.backing_format) == ("/etc/shadow", None)
    assert parse_qcow2_header(handmade(version=2, backing=b"/etc/shadow")).backing_file == "/etc/shadow"


def test_handmade_extensions():
    header = parse_qcow2_header(handmade(backing=b"/b", extensions=extension(0xE2792ACA, b"raw")
                                         + extension(0x6803F857, b"x" * 48)))
    assert header.backing_format == "raw"
    assert parse_qcow2_header(handmade(extensions=extension(0x44415441, b"/etc/shadow"))).data_file
    assert parse_qcow2_header(handmade(incompatible=1 << 2)).data_file


@pytest.mark.parametrize("head,reason", [
    (handmade()[:40], "truncated qcow2 header"),
    (handmade()[:80], "truncated qcow2 version 3 header"),
    (handmade(version=1), "version 1"),
    (handmade(version=4), "version 4"),
    (handmade(cluster_bits=16)[:20] + struct.pack(">I", 30) + handmade()[24:], "invalid qcow2 cluster size"),
    (handmade(header_length=101), "invalid qcow2 header length"),
    (handmade(backing=b"/x" * 600), "longer than QEMU allows"),
    (handmade(cluster_bits=9, backing=b"/" + b"x" * 500), "outside its first cluster"),
    (handmade(cluster_bits=9, extensions=extension(0xE2792ACA, b"q" * 500)), "extension beyond its first cluster"),
    (handmade(cluster_bits=9)[:104] + b"\xff" * 408, "beyond its first cluster"),
])
def test_malformed_headers_are_refused(head, reason):
    with pytest.raises(BadHeader, match=reason):
        parse_qcow2_header(head)


def test_extensions_without_end_marker_are_refused():
    head = bytearray(handmade(cluster_bits=9))
    for offset in range(104, 512, 8):
        struct.pack_into(">II", head, offset, 0x6803F857, 0)
    with pytest.raises(BadHeader, match="without an end marker"):
        parse_qcow2_header(bytes(head))


# --- one layer against the config ---------------------------------------------------------------

TOP = Image(Path("/d/top.qcow2"), "qcow2")
BASE = Image(Path("/d/base.qcow2"), "qcow2")


@pytest.mark.parametrize("head,below,problem", [
    (handmade(), None, None),
    (handmade(backing=b"/d/base.qcow2"), BASE, None),
    (handmade(backing=b"base.qcow2"), BASE, None),  # relative to the image's directory, as QEMU reads it
    (handmade(backing=b"/d/base.qcow2", extensions=extension(0xE2792ACA, b"qcow2")), BASE, None),
    (handmade(backing=b"/etc/shadow"), None,
     "names backing file /etc/shadow in its qcow2 header, and the config names none"),
    (handmade(), BASE, "has no backing file in its qcow2 header, but the config names /d/base.qcow2"),
    (handmade(backing=b"/etc/shadow"), BASE,
     "names backing file /etc/shadow in its qcow2 header, but the config names /d/base.qcow2"),
    (handmade(backing=b"../etc/shadow"), BASE,
     "names backing file ../etc/shadow in its qcow2 header, but the config names /d/base.qcow2"),
    (handmade(backing=b"/d/base.qcow2", extensions=extension(0xE2792ACA, b"raw")), BASE,
     "says its backing file /d/base.qcow2 is raw in its qcow2 header, but the config says qcow2"),
    (handmade(backing=b"/x\n/etc/shadow"), None,
     "names backing file '/x\\n/etc/shadow' in its qcow2 header, and the config names none"),
    (handmade(incompatible=1 << 2), None,
     "names an external data file in its qcow2 header, which dmzctl does not support"),
])
def test_layer_problem(head, below, problem):
    assert layer_problem(TOP, below, parse_qcow2_header(head)) == problem


# --- whole disks: files on disk, read as `up` reads them ----------------------------------------

def never_read(path: Path) -> bytes:
    raise AssertionError(f"read {path}, which the config declares raw")


def test_raw_disk_is_never_read_whatever_it_holds(tmp_path):
    qemu_img("-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", str(tmp_path / "evil"), "1M")
    disk = Disk(tmp_path / "evil", "raw")
    assert disk_problem(disk, never_read) is None
    chain = Disk(tmp_path / "top.qcow2", "qcow2", (Image(tmp_path / "evil", "raw"),))
    qemu_img("-f", "qcow2", "-b", str(tmp_path / "evil"), "-F", "raw", "-u", str(chain.path), "1M")
    assert disk_problem(chain) is None  # the raw base is never opened, only the qcow2 top


def test_raw_disk_rewritten_as_qcow2_declared_qcow2_is_refused(tmp_path):
    """The attack as the file looks after the guest wrote it, if the config trusted it to be qcow2."""
    disk = tmp_path / "data.img"
    qemu_img("-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", str(disk), "1M")
    image, problem = disk_problem(Disk(disk, "qcow2"))
    assert image.path == disk
    assert problem == "names backing file /etc/shadow in its qcow2 header, and the config names none"


def test_declared_qcow2_without_magic_is_refused(tmp_path):
    image, problem = disk_problem(Disk(raw_file(tmp_path / "web.qcow2"), "qcow2"))
    assert problem == "is declared qcow2 but has no qcow2 header (magic QFI\\xfb)"


def test_unreadable_qcow2_is_refused(tmp_path):
    (tmp_path / "dir.qcow2").mkdir()
    _image, problem = disk_problem(Disk(tmp_path / "dir.qcow2", "qcow2"))
    assert problem.startswith("cannot be read (")


def two_layer_chain(tmp_path: Path, innermost_backing: str | None = None) -> Disk:
    """top.qcow2 -> mid.qcow2 -> base.raw, as made with qemu-img; optionally mid names another file."""
    base = raw_file(tmp_path / "base.raw")
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("-f", "qcow2", "-u", "-b", innermost_backing or str(base), "-F", "raw", str(mid), "1M")
    qemu_img("-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    return Disk(top, "qcow2", (Image(mid, "qcow2"), Image(base, "raw")))


def test_two_layer_chain_as_configured_passes(tmp_path):
    assert disk_problem(two_layer_chain(tmp_path)) is None


def test_two_layer_chain_whose_inner_layer_names_a_host_file_is_refused(tmp_path):
    disk = two_layer_chain(tmp_path, innermost_backing="/etc/shadow")
    image, problem = disk_problem(disk)
    assert image.path == tmp_path / "mid.qcow2"
    assert problem == f"names backing file /etc/shadow in its qcow2 header, but the config names {tmp_path}/base.raw"


def test_chain_shorter_in_config_than_in_files_is_refused(tmp_path):
    full = two_layer_chain(tmp_path)
    image, problem = disk_problem(Disk(full.path, "qcow2", full.backing[:1]))
    assert image.path == tmp_path / "mid.qcow2" and "and the config names none" in problem


# --- check_disks: the one line `up`, `plan` and `restart` give -----------------------------------

def dmz_with_disks(disks: list, other_disks: list | None = None):
    vms = [{"name": "dka-web", "memory": 128, "disks": disks}]
    if other_disks is not None:
        vms.append({"name": "dka-other", "memory": 128, "disks": other_disks})
    return parse_dmz({"dmz": {"name": "dka", "gateway": "10.241.0.1/24", "protected": ["10.241.128.0/24"]},
                      "vm": vms})


def test_check_disks_names_vm_disk_and_file_in_one_line(tmp_path):
    evil = tmp_path / "data.img"
    qemu_img("-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", str(evil), "1M")
    good = raw_file(tmp_path / "root.img")
    dmz = dmz_with_disks([str(good), {"path": str(evil), "format": "qcow2"}])
    with pytest.raises(HostError) as info:
        check_disks(dmz, ["dka-web"])
    message = str(info.value)
    assert message.startswith(f"VM dka-web: disk vdb: {evil} names backing file /etc/shadow in its qcow2 header, "
                              f"and the config names none; refusing to start it")
    assert "\n" not in message


def test_check_disks_names_the_disk_when_an_inner_layer_is_wrong(tmp_path):
    disk = two_layer_chain(tmp_path, innermost_backing="/etc/shadow")
    dmz = dmz_with_disks([{"path": str(disk.path), "backing": [
        {"path": str(layer.path), "format": layer.format} for layer in disk.backing]}])
    with pytest.raises(HostError, match=rf"^VM dka-web: disk vda \({disk.path}\): {tmp_path}/mid.qcow2 names "):
        check_disks(dmz, ["dka-web"])


def test_check_disks_only_for_the_vms_being_started(tmp_path):
    evil = tmp_path / "evil.qcow2"
    qemu_img("-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", str(evil), "1M")
    dmz = dmz_with_disks([str(raw_file(tmp_path / "root.img"))], other_disks=[str(evil)])
    check_disks(dmz, ["dka-web"])
    with pytest.raises(HostError, match="VM dka-other: disk vda: "):
        check_disks(dmz, ["dka-web", "dka-other"])


def test_dmzctl_never_runs_qemu_img():
    """Probing a guest-writable image is what the check replaces; no code path may come back to it."""
    sources = [p.read_text() for p in (ROOT / "dmzctl").rglob("*.py")] + \
        [p.read_text() for p in (ROOT / "dmzctl" / "hooks").iterdir() if p.is_file()]
    assert not [s for s in sources if '"qemu-img"' in s or "'qemu-img'" in s]
