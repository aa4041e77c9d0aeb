"""[vm.limits] on the real libvirtd: accepted as defined, applied live, and enforced.

Each test owns a DMZ whose names start with `cns` (10.242.0.0/24) and removes everything of it
afterwards. Where this host cannot apply a limit (see `host_can_*`), the test proves instead
that `dmzctl up` refuses in one line naming the setting, and leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from lxml import etree

from guest import dmzctl, guest_dir, in_guest, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host]

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = "10.242.0.1/24"
VM_IP = "10.242.0.10"
DMZ = "cnslim"
VM = "cnslim-web"
CAP_SYS_RESOURCE = 24


def dmz_toml(limits: str, disk: Path | None = None) -> str:
    table = kernel_vm_toml(VM, VM_IP, GATEWAY, guest_dir())
    if disk is not None:
        table += f'disks = ["{disk}"]\n'
    return f"""
[dmz]
name = "{DMZ}"
bridge = "{DMZ}0"
gateway = "{GATEWAY}"
protected = ["198.51.100.0/24"]

{table}
[vm.limits]
{limits}"""


@pytest.fixture
def limited_vm(tmp_path, monkeypatch):
    """Write the DMZ's config (with a small raw disk QEMU may open); wipe it all afterwards."""
    monkeypatch.setenv("DMZCTL_EVENT_LOG", str(tmp_path / "events.log"))
    # Not under tmp_path: QEMU runs as libvirt-qemu and needs to traverse the directory.
    directory = Path(tempfile.mkdtemp(prefix="cns-", dir="/var/tmp"))
    directory.chmod(0o755)
    disk = directory / "data.img"
    with open(disk, "wb") as image:
        image.truncate(16 * 1024 * 1024)
    path = tmp_path / f"{DMZ}.toml"
    wipe(DMZ, [VM])

    def write(limits: str, with_disk: bool = False) -> Path:
        path.write_text(dmz_toml(limits, disk if with_disk else None))
        return path

    try:
        yield write
    finally:
        dmzctl("destroy", str(path), "--timeout", "0")
        wipe(DMZ, [VM])
        disk.unlink(missing_ok=True)
        directory.rmdir()


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", *args], capture_output=True, text=True, check=True).stdout


def fields(text: str) -> dict[str, str]:
    """virsh's `name : value` listings as a dict."""
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def qemu_pid() -> int:
    return int(Path(f"/run/libvirt/qemu/{VM}.pid").read_text())


def cgroup_dir(pid: int, controller: str) -> Path:
    """The domain's cgroup for a v1 controller (or the v2 one): libvirt puts QEMU's main
    thread in the domain's `emulator` child; its parent is the whole domain."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return Path("/sys/fs/cgroup", controller, path.lstrip("/")).parent
    path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
    return Path("/sys/fs/cgroup", path.lstrip("/")).parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole QEMU process (every thread)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def libvirtd_pid() -> int:
    return int(subprocess.run(["pgrep", "-xo", "libvirtd"], capture_output=True, text=True, check=True).stdout)


def host_can_raise_memlock(limit_bytes: int) -> bool:
    """libvirt 9.0 sets QEMU's RLIMIT_MEMLOCK to memtune's hard_limit: above libvirtd's own hard
    limit that needs CAP_SYS_RESOURCE (a container may have dropped it)."""
    status = Path(f"/proc/{libvirtd_pid()}/status").read_text()
    capabilities = int(re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    limits = Path(f"/proc/{libvirtd_pid()}/limits").read_text()
    hard = re.search(r"^Max locked memory\s+\S+\s+(\S+)", limits, re.M).group(1)
    return bool(capabilities >> CAP_SYS_RESOURCE & 1) or hard == "unlimited" or int(hard) >= limit_bytes


def host_can_shape() -> tuple[bool, str]:
    """Whether the kernel has what libvirt's <bandwidth> runs (htb + sfq, u32 + police), tried
    with libvirt's own tc commands on a throwaway bridge of ours."""
    bridge = "cnstc0"
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        for command in (f"qdisc add dev {bridge} root handle 1: htb default 1",
                        f"class add dev {bridge} parent 1: classid 1:1 htb rate 1000kbps",
                        f"qdisc add dev {bridge} parent 1:1 handle 2: sfq perturb 10",
                        f"qdisc add dev {bridge} ingress",
                        f"filter add dev {bridge} parent ffff: protocol all u32 match u32 0 0 "
                        f"police rate 1000kbps burst 1000kb mtu 64kb drop flowid :1"):
            result = subprocess.run(["tc", *command.split()], capture_output=True, text=True)
            if result.returncode != 0:
                return False, f"tc {command}: {result.stderr.strip()}"
        return True, ""
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def assert_refused_in_one_line(config: Path, libvirt_says: str, setting: str) -> None:
    result = dmzctl("up", str(config))
    lines = result.stderr.splitlines()
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"dmzctl: starting domain {VM}: "), lines
    assert libvirt_says in lines[0] and f"vm[{VM}].limits.{setting}" in lines[0], lines
    # Undone: what this run created is gone again, the VM included.
    assert subprocess.run(["virsh", "dominfo", VM], capture_output=True).returncode != 0
    assert subprocess.run(["nft", "list", "table", "inet", f"dmzctl-{DMZ}"], capture_output=True).returncode != 0
    print(f"refused here, as expected: {lines[0]}")


def test_libvirt_accepts_every_limit_as_rendered(tmp_path):
    """The golden config's domains, renamed into our prefix, pass libvirt's own define --validate."""
    from dmzctl.config import load_dmz
    from dmzctl.desired import build
    from dmzctl.render.base import to_string

    desired = build(load_dmz(ROOT / "tests" / "configs" / "limits.toml"))
    for name, element in desired.domains.items():
        element.find("name").text = f"cns-{name}"
        element.remove(element.find("uuid"))  # libvirt makes one up
        path = tmp_path / f"{name}.xml"
        path.write_text(to_string(element))
        try:
            virsh("define", "--validate", str(path))
            live = etree.fromstring(virsh("dumpxml", "--inactive", f"cns-{name}").encode())
            want = {tag: element.find(tag) is not None for tag in ("cputune/quota", "memtune/hard_limit",
                                                                     "devices/disk/iotune",
                                                                     "devices/interface/bandwidth")}
            assert {tag: live.find(tag) is not None for tag in want} == want
        finally:
            subprocess.run(["virsh", "undefine", f"cns-{name}"], capture_output=True)


@pytest.mark.guest
def test_cpu_and_disk_limits_apply_live_and_bite(limited_vm):
    config = limited_vm('cpu_per_vcpu = 0.5\ndisk_iops = 100\ndisk_bandwidth = "1MiB/s"\n', with_disk=True)
    dmzctl("up", str(config), check=True)
    wait_for_serial(VM, "DMZGUEST READY")
    pid = qemu_pid()

    schedule = fields(virsh("schedinfo", VM))
    assert (schedule["vcpu_period"], schedule["vcpu_quota"]) == ("100000", "50000")
    assert (schedule["global_period"], schedule["global_quota"]) == ("100000", "50000")
    cpu = cgroup_dir(pid, "cpu")
    if (cpu / "cpu.cfs_quota_us").exists():  # cgroup v1, as on this machine
        assert (cpu / "cpu.cfs_quota_us").read_text().split() == ["50000"]
        assert (cpu / "vcpu0" / "cpu.cfs_quota_us").read_text().split() == ["50000"]
    else:
        assert (cpu / "cpu.max").read_text().split() == ["50000", "100000"]
    tune = fields(virsh("blkdeviotune", VM, "vda"))  # QEMU's live throttle, as libvirt reads it back
    assert (tune["total_bytes_sec"], tune["total_iops_sec"]) == ("1048576", "100")

    # They bite. Lower bounds on time and an upper bound on CPU: a busy host only adds to the first
    # and takes from the second. 3 MiB at 1 MiB/s, 300 requests at 100/s: about 3 s each (QEMU lets
    # the first request through at once and a tenth of a second's worth as a burst; hence small
    # requests). Direct reads of blocks not read before: busybox's dd drops O_DIRECT for 512 bytes.
    for command in ("dd if=/dev/vda of=/dev/null bs=64k count=48 skip=64 iflag=direct",
                    "dd if=/dev/vda of=/dev/null bs=4096 count=300 skip=2048 iflag=direct"):
        began = time.monotonic()
        rc, out = in_guest(VM_IP, command, timeout=60)
        took = time.monotonic() - began
        assert rc == 0, out
        assert took >= 2.0, f"{command}: {took:.2f} s, faster than the limit allows"
        print(f"{command}: {took:.2f} s")
    throttled = int(fields((cpu / "cpu.stat").read_text().replace(" ", ":")).get("nr_throttled", "0"))
    used, began = cpu_seconds(pid), time.monotonic()
    rc, out = in_guest(VM_IP, "timeout 4 sh -c 'while :; do :; done'; true", timeout=60)
    used, took = cpu_seconds(pid) - used, time.monotonic() - began
    assert used <= 0.5 * took + 0.3, f"QEMU used {used:.2f} s of CPU in {took:.2f} s under a 0.5 cap"
    assert int(fields((cpu / "cpu.stat").read_text().replace(" ", ":"))["nr_throttled"]) > throttled
    print(f"busy guest: QEMU used {used:.2f} s of CPU in {took:.2f} s")


@pytest.mark.guest
def test_memory_max_applies_or_is_refused_in_one_line(limited_vm):
    config = limited_vm('memory_max = "512MiB"\n')
    if not host_can_raise_memlock(512 * 1024 * 1024):
        assert_refused_in_one_line(config, "cannot limit locked memory", "memory_max")
        return
    dmzctl("up", str(config), check=True)
    wait_for_serial(VM, "DMZGUEST READY")
    assert fields(virsh("memtune", VM))["hard_limit"] == str(512 * 1024)
    memory = cgroup_dir(qemu_pid(), "memory")
    limit = memory / "memory.limit_in_bytes"
    assert (limit if limit.exists() else memory / "memory.max").read_text().strip() == str(512 * 1024 * 1024)


@pytest.mark.guest
def test_net_limits_apply_or_are_refused_in_one_line(limited_vm):
    config = limited_vm('net_to_vm = "100Mbit/s"\nnet_from_vm = "20Mbit/s"\n')
    can, why = host_can_shape()
    if not can:
        print(f"this kernel cannot shape: {why}")
        assert_refused_in_one_line(config, "(tc ", "net_to_vm/net_from_vm")
        return
    dmzctl("up", str(config), check=True)
    wait_for_serial(VM, "DMZGUEST READY")
    tap = virsh("domiflist", VM).splitlines()[-1].split()[0]
    tune = fields(virsh("domiftune", VM, tap))
    assert (tune["inbound.average"], tune["outbound.average"]) == ("12500", "2500")  # kB/s
    classes = subprocess.run(["tc", "class", "show", "dev", tap], capture_output=True, text=True).stdout
    assert "rate 100Mbit" in classes, classes
