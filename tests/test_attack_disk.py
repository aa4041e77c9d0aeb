"""The disk-format attack, end to end: a guest rewrites its raw disk as a qcow2 image whose
backing file is a host file, and waits for the host to restart it.

Had dmzctl read the format from the disk (as it did with qemu-img until issue 9), libvirt
would follow the header's backing chain on the next start: chown the host file to
libvirt-qemu and let QEMU open it, and the guest would read the host file through its disk
(libvirt's CVE-2010-2237/2238/2239; libvirt-tck scripts/qemu/200-qcow2-single-backing-file.t).
Here the disk stays raw, whatever the guest wrote; and a config that trusts the file to be
qcow2 is refused before anything changes, as is a backing layer whose header was replaced.
A second disk with a declared two-layer chain shows libvirt takes the chain from the XML as
written, so it has nothing to probe.

Names: DMZ `dka`, VM `dka-web`, bridge `dkabr0`, 10.241.0.0/24, protected 10.241.128.0/24.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from guest import dmzctl, guest_dir, in_guest, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ, VM = "dka", "dka-web"
GATEWAY, VM_IP = "10.241.0.1/24", "10.241.0.10"
CANARY_LINE = b"DKA-CANARY-SECRET\n"
BASE_MARK = b"DKA-BASE-LAYER"


@dataclass
class Attack:
    workdir: Path
    disk: Path  # the guest's raw data disk, /dev/vda inside
    canary: Path  # a root-only host file the guest names as backing file
    chain: list[Path]  # /dev/vdb: top.qcow2 -> mid.qcow2 -> base.raw, declared so in the config
    config: Path  # the data disk as a plain path (raw by its name), the chain spelled out
    payload: bytes  # the qcow2 image the guest wrote over the start of its disk
    env: dict

    def run(self, *args: str, check: bool = False):
        return dmzctl(*args, check=check, env=self.env)


def disks_toml(data_disk: str, chain: list[Path]) -> str:
    top, mid, base = chain
    return (f'[{data_disk}, {{ path = "{top}", backing = [{{ path = "{mid}", format = "qcow2" }}, '
            f'{{ path = "{base}", format = "raw" }}] }}]')


def make_chain(workdir: Path) -> list[Path]:
    base, mid, top = workdir / "base.raw", workdir / "mid.qcow2", workdir / "top.qcow2"
    base.write_bytes(BASE_MARK.ljust(1 << 20, b"\0"))
    for image, below, fmt in ((mid, base, "raw"), (top, mid, "qcow2")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(below), "-F", fmt, str(image)],
                       check=True, timeout=60)
    return [top, mid, base]


def config_text(disks: str) -> str:
    vm = kernel_vm_toml(VM, VM_IP, GATEWAY, guest_dir()) + f"disks = {disks}\n"
    return (f'[dmz]\nname = "{DMZ}"\nbridge = "dkabr0"\ngateway = "{GATEWAY}"\n'
            f'protected = ["10.241.128.0/24"]\n{vm}')


def qcow2_naming(backing: Path, where: Path) -> bytes:
    """What a guest would write: a qcow2 image whose backing file is a host file (-u: not opened here)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(backing), "-F", "raw", str(where),
                    "1M"], check=True, timeout=60)
    return where.read_bytes()


def file_state(path: Path) -> tuple:
    info = path.stat()
    return info.st_uid, info.st_gid, oct(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_pid() -> int:
    return int(Path(f"/run/libvirt/qemu/{VM}.pid").read_text().strip())


def open_by_qemu(path: Path) -> bool:
    fds = Path(f"/proc/{qemu_pid()}/fd")
    return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())


def virsh_xml(*options: str) -> etree._Element:
    text = subprocess.run(["virsh", "dumpxml", *options, VM], capture_output=True, text=True, check=True).stdout
    return etree.fromstring(text.encode())


def data_disk(domain: etree._Element, target: str = "vda") -> etree._Element:
    return next(d for d in domain.iter("disk") if d.find("target").get("dev") == target)


def chain_of(disk: etree._Element) -> list[tuple]:
    """(format, file) of the disk and of each backing layer, as the document says, outermost first."""
    layers = [(disk.find("driver").get("type"), disk.find("source").get("file"))]
    store = disk.find("backingStore")
    while store is not None and store.find("source") is not None:
        layers.append((store.find("format").get("type"), store.find("source").get("file")))
        store = store.find("backingStore")
    return layers + [("end" if store is not None else "open", None)]


@pytest.fixture(scope="module")
def attack():
    """A running guest that has written a qcow2 header naming a root-only host file into its raw disk."""
    workdir = Path(tempfile.mkdtemp(prefix="dka-", dir="/var/tmp"))
    workdir.chmod(0o755)  # QEMU (libvirt-qemu) must reach the disk; libvirt relabels files, not directories
    env = {"DMZCTL_EVENT_LOG": str(workdir / "events.log")}
    canary = workdir / "canary"
    canary.write_bytes(CANARY_LINE * 4096)
    canary.chmod(0o600)
    disk = workdir / "data.img"
    disk.write_bytes(bytes(1 << 20))
    chain = make_chain(workdir)
    config = workdir / "dka.toml"
    config.write_text(config_text(disks_toml(f'"{disk}"', chain)))
    state = Attack(workdir, disk, canary, chain, config, qcow2_naming(canary, workdir / "payload.qcow2"), env)
    wipe(DMZ, [VM])
    try:
        state.run("up", str(config), check=True)
        wait_for_serial(VM, "DMZGUEST READY")
        packed = base64.b64encode(gzip.compress(state.payload)).decode()
        rc, out = in_guest(VM_IP, f"echo {packed} | base64 -d | gunzip | dd of=/dev/vda conv=notrunc,fsync && sync")
        assert rc == 0, out
        assert guest_disk_head(len(state.payload)) == hashlib.sha256(state.payload).hexdigest()
        yield state
    finally:
        state.run("destroy", str(config), "--timeout", "0")
        wipe(DMZ, [VM])
        shutil.rmtree(workdir, ignore_errors=True)


def guest_disk_head(size: int) -> str:
    rc, out = in_guest(VM_IP, f"head -c {size} /dev/vda | sha256sum")
    assert rc == 0, out
    return out.split()[0]


def test_restart_keeps_the_rewritten_disk_raw(attack):
    canary_before = file_state(attack.canary)
    attack.run("restart", str(attack.config), check=True)
    wait_for_serial(VM, "DMZGUEST READY")

    live = virsh_xml()
    assert chain_of(data_disk(live)) == [("raw", str(attack.disk)), ("end", None)]
    assert str(attack.canary) not in etree.tostring(live).decode()
    # What `up` defined is what `render` prints: nothing about the disk came from the host.
    rendered = etree.fromstring(attack.run("render", "--what", f"domain:{VM}", str(attack.config),
                                           check=True).stdout.encode())
    for target in ("vda", "vdb"):
        assert chain_of(data_disk(virsh_xml("--inactive"), target)) == chain_of(data_disk(rendered, target))

    assert file_state(attack.canary) == canary_before, "the host file's owner, mode or content changed"
    assert not open_by_qemu(attack.canary), "QEMU holds the host file open"
    # The guest reads back the bytes it wrote, not the host file through a backing chain.
    assert guest_disk_head(len(attack.payload)) == hashlib.sha256(attack.payload).hexdigest()
    rc, out = in_guest(VM_IP, f"head -c {1 << 20} /dev/vda | grep -c {CANARY_LINE.decode().strip()}")
    assert out.strip() == "0", out


def test_config_trusting_the_header_is_refused_and_nothing_changes(attack):
    """The test can fail: declared qcow2 (what reading the header would have concluded), the
    disk would be opened with the guest's backing chain. dmzctl refuses in one line instead."""
    trusting = attack.workdir / "dka-trusting.toml"
    trusting.write_text(config_text(disks_toml(f'{{ path = "{attack.disk}", format = "qcow2" }}', attack.chain)))
    canary_before = file_state(attack.canary)
    pid, definition = qemu_pid(), etree.tostring(virsh_xml("--inactive"))
    expected = (f"dmzctl: VM {VM}: disk vda: {attack.disk} names backing file {attack.canary} in its qcow2 header, "
                f"and the config names none; refusing to start it")

    for command in ("restart", "up", "plan"):
        result = attack.run(command, str(trusting))
        assert result.returncode == 3, (command, result.stdout, result.stderr)
        assert result.stderr.startswith(expected), (command, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stdout == "", (command, result.stdout)  # refused before any step

    assert qemu_pid() == pid, "the VM was stopped or restarted"
    assert etree.tostring(virsh_xml("--inactive")) == definition, "the domain definition changed"
    assert chain_of(data_disk(virsh_xml())) == [("raw", str(attack.disk)), ("end", None)]
    assert file_state(attack.canary) == canary_before
    assert not open_by_qemu(attack.canary)


def test_declared_chain_is_what_libvirt_runs(attack):
    """Every layer named with its format in the XML: libvirt runs exactly that chain, nothing probed."""
    top, mid, base = attack.chain
    assert chain_of(data_disk(virsh_xml(), "vdb")) == [("qcow2", str(top)), ("qcow2", str(mid)), ("raw", str(base)),
                                                      ("end", None)]
    rc, out = in_guest(VM_IP, f"head -c {len(BASE_MARK)} /dev/vdb; echo")
    assert out == BASE_MARK.decode(), out  # read through both qcow2 layers from the raw base


def rename_backing(image: Path, name: bytes) -> None:
    """Replace the backing file name in a qcow2 header in place, as whoever could write the file would."""
    with image.open("r+b") as handle:
        head = handle.read(24)
        offset = struct.unpack_from(">Q", head, 8)[0]
        handle.seek(16)
        handle.write(struct.pack(">I", len(name)))
        handle.seek(offset)
        handle.write(name)


def test_replaced_header_of_a_backing_layer_is_refused(attack):
    top, mid, base = attack.chain
    original = mid.read_bytes()[:1 << 16]
    pid = qemu_pid()
    canary_before = file_state(attack.canary)
    try:
        rename_backing(mid, str(attack.canary).encode())
        result = attack.run("restart", str(attack.config))
    finally:
        with mid.open("r+b") as handle:
            handle.write(original)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"dmzctl: VM {VM}: disk vdb ({top}): {mid} names backing file {attack.canary} "
                                    f"in its qcow2 header, but the config names {base}; refusing to start it"), \
        result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert qemu_pid() == pid, "the VM was stopped or restarted"
    assert file_state(attack.canary) == canary_before and not open_by_qemu(attack.canary)
