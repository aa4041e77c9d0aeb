"""Cloud-image VMs on the real libvirtd, with the tiny test guest (it boots its own kernel; the
volumes are attached to it all the same): pools and volumes made through libvirt's storage API,
formats written out, the seed attached read-only, the shared base image never chowned, plan and
check, a changed seed made anew while the root volume stays the same file.

Names start with `pv-`; the DMZ is 10.215.0.0/24 + fdd0:215::/64, pool `pv-host` lives in a
temporary directory; the `dmzctl` pool is removed afterwards only when this module created it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import pytest

from guest import dmzctl, guest_dir, kernel_vm_toml, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ = "pv-host"
VM = "pv-host-vm"
POOL = "pv-host"
DEFAULT_POOL_DIR = Path("/var/lib/dmzctl/pool")


STORAGE_STEP = re.compile(r"^\s+[+~>] (pool|volume|seed|vm) ", re.M)


def storage_steps(plan: str) -> list[str]:
    """plan's steps about this module's pool, volumes, seed and VM (other agents' networks may make
    the filters and the table stale meanwhile: not this module's business)."""
    return [line.strip() for line in plan.splitlines() if STORAGE_STEP.match(line)]


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def volumes(pool: str) -> dict[str, str]:
    """name -> path, as `virsh vol-list` (and so virt-manager's storage tab) shows them."""
    listing = run("virsh", "-q", "vol-list", pool, check=False).stdout
    return {line.split()[0]: line.split()[1] for line in listing.splitlines() if len(line.split()) == 2}


def stat_of(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)


def remove_volumes(pool: str, prefix: str) -> None:
    for name in volumes(pool):
        if name.startswith(prefix):
            run("virsh", "-q", "vol-delete", "--pool", pool, name, check=False)


@dataclass
class Host:
    directory: Path
    base: Path
    env: dict

    def config(self, name: str = VM, pool: str = POOL, hostname: str = "first", image: bool = True) -> Path:
        vm = kernel_vm_toml(name, "10.215.0.10", "10.215.0.1/24", guest_dir())
        if image:
            vm += f'image = "{self.base}"\ndisk_size = "128MiB"\n'
        vm += f'pool = "{pool}"\n[[vm.volume]]\nname = "data"\nsize = "8MiB"\n'
        vm += f'[vm.cloud_init]\nhostname = "{hostname}"\nssh_authorized_keys = ["ssh-ed25519 AAAAC3Nz pv@test"]\n'
        path = self.directory / f"{DMZ}.toml"
        path.write_text(f'[dmz]\nname = "{DMZ}"\ngateway = "10.215.0.1/24"\ngateway6 = "fdd0:215::1/64"\n'
                        f'protected = ["10.216.0.0/24"]\n\n{vm}')
        return path

    def dmzctl(self, *args: str, check: bool = True):
        return dmzctl(*args, check=check, env=self.env)


@pytest.fixture(scope="module")
def host():
    directory = Path(tempfile.mkdtemp(prefix="pv-host-", dir="/var/tmp"))
    directory.chmod(0o755)
    wipe(DMZ, [VM, f"{VM}-d"])
    try:
        (directory / "pool").mkdir(mode=0o711)
        run("virsh", "-q", "pool-define-as", POOL, "dir", "--target", str(directory / "pool"))
        run("virsh", "-q", "pool-start", POOL)
        base = directory / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
        base.chmod(0o444)
        yield Host(directory, base, {"DMZCTL_EVENT_LOG": str(directory / "events.log")})
    finally:
        dmzctl("destroy", str(directory / f"{DMZ}.toml"), "--timeout", "0")
        wipe(DMZ, [VM, f"{VM}-d"])
        remove_volumes(POOL, f"{VM}-")
        run("virsh", "-q", "pool-destroy", POOL, check=False)
        run("virsh", "-q", "pool-undefine", POOL, check=False)
        shutil.rmtree(directory, ignore_errors=True)


def test_plan_and_check_show_volumes_and_seed_before_up(host):
    config = str(host.config())
    plan = host.dmzctl("plan", config).stdout
    for line in (f"+ volume {POOL}/{VM}-root.qcow2 created", f"+ volume {POOL}/{VM}-data.qcow2 created",
                 f"+ seed {POOL}/{VM}-cidata.iso created"):
        assert line in plan, plan
    assert plan.index(f"{VM}-root.qcow2") < plan.index(f"vm {VM} defined"), plan
    check = host.dmzctl("check", config, check=False)
    assert check.returncode == 1 and f"volume {POOL}/{VM}-root.qcow2: missing (VM {VM})" in check.stdout, check.stdout


def test_up_makes_pool_volumes_with_explicit_formats_and_a_read_only_seed(host):
    before = stat_of(host.base)
    host.dmzctl("up", str(host.config()))
    found = volumes(POOL)
    assert set(found) == {f"{VM}-root.qcow2", f"{VM}-data.qcow2", f"{VM}-cidata.iso"}, found
    xml = run("virsh", "vol-dumpxml", "--pool", POOL, f"{VM}-root.qcow2").stdout
    backing = xml.split("<backingStore>")[1]
    assert f"<path>{host.base}</path>" in backing and "<format type='qcow2'/>" in backing, xml
    # libvirt wrote the backing format into the overlay's header: nothing will probe it.
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", found[f"{VM}-root.qcow2"]).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == (str(host.base), "qcow2")
    assert info["virtual-size"] == 128 << 20
    domain = run("virsh", "dumpxml", VM).stdout
    seed = domain.split(f"{VM}-cidata.iso")[1].split("</disk>")[0]
    assert "<readonly/>" in seed and "device='cdrom'" in domain.split(f"{VM}-cidata.iso")[0].rsplit("<disk", 1)[1]
    assert run("virsh", "domstate", VM).stdout.strip() == "running"
    assert stat_of(host.base) == before  # QEMU runs; libvirt did not chown the shared base image
    assert storage_steps(host.dmzctl("plan", str(host.config())).stdout) == []


def test_down_keeps_the_volumes_and_the_base_image_owner(host):
    before = stat_of(host.base)
    host.dmzctl("down", str(host.config()), "--timeout", "0")
    assert len(volumes(POOL)) == 3
    assert stat_of(host.base) == before


def test_an_inactive_pool_is_started_and_its_volumes_kept(host):
    root = volumes(POOL)[f"{VM}-root.qcow2"]
    inode = os.stat(root).st_ino
    run("virsh", "-q", "pool-destroy", POOL)
    out = host.dmzctl("up", str(host.config())).stdout
    assert f"storage pool {POOL} started" in out and " created (" not in out, out
    assert os.stat(root).st_ino == inode and len(volumes(POOL)) == 3
    host.dmzctl("down", str(host.config()), "--timeout", "0")


def seed_meta_data(path: str) -> str:
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/meta-data")
        return out.getvalue().decode()
    finally:
        iso.close()


def test_changed_cloud_init_makes_the_seed_anew_and_never_the_root(host):
    root_path = volumes(POOL)[f"{VM}-root.qcow2"]
    root_before = (os.stat(root_path).st_ino, run("virsh", "vol-key", "--pool", POOL, f"{VM}-root.qcow2").stdout)
    config = str(host.config(hostname="second"))
    plan = host.dmzctl("plan", config).stdout
    assert f"~ seed {POOL}/{VM}-cidata.iso updated: cloud-init inputs changed" in plan, plan
    assert f"{VM}-root.qcow2" not in plan and f"{VM}-data.qcow2" not in plan, plan
    out = host.dmzctl("up", config).stdout
    assert f"cloud-init seed volume {POOL}/{VM}-cidata.iso regenerated" in out, out
    root_after = (os.stat(root_path).st_ino, run("virsh", "vol-key", "--pool", POOL, f"{VM}-root.qcow2").stdout)
    assert root_after == root_before
    assert "local-hostname: second" in seed_meta_data(volumes(POOL)[f"{VM}-cidata.iso"])
    assert storage_steps(host.dmzctl("plan", config).stdout) == []


def test_check_reports_a_missing_volume_and_up_makes_it_again(host):
    config = str(host.config(hostname="second"))
    host.dmzctl("down", config, "--timeout", "0")
    run("virsh", "-q", "vol-delete", "--pool", POOL, f"{VM}-data.qcow2")
    host.dmzctl("up", config)
    assert f"{VM}-data.qcow2" in volumes(POOL)
    host.dmzctl("down", config, "--timeout", "0")
    run("virsh", "-q", "vol-delete", "--pool", POOL, f"{VM}-data.qcow2")
    check = host.dmzctl("check", config, check=False)
    assert f"volume {POOL}/{VM}-data.qcow2: missing (VM {VM})" in check.stdout, check.stdout


def test_volumes_of_and_delete_volume_remove_every_volume(host):
    from dmzctl.config import load_dmz
    from dmzctl.host.virt import Virt
    from dmzctl.render.storage import volumes_of

    vm = load_dmz(host.config(hostname="second")).vm(VM)
    assert volumes_of(vm) == [(POOL, f"{VM}-root.qcow2"), (POOL, f"{VM}-data.qcow2"), (POOL, f"{VM}-cidata.iso")]
    with Virt("qemu:///system") as virt:
        for pool, name in volumes_of(vm):
            virt.delete_volume(pool, name)  # the data volume is already gone: nothing to do
    assert volumes(POOL) == {}


def test_dmzctl_pool_is_made_when_absent(host):
    existed = run("virsh", "-q", "pool-info", "dmzctl", check=False).returncode == 0
    parent_existed = DEFAULT_POOL_DIR.parent.exists()
    name = f"{VM}-d"
    config = host.config(name=name, pool="dmzctl", image=False)
    try:
        plan = host.dmzctl("plan", str(config)).stdout
        if not existed:
            assert "+ pool dmzctl created" in plan, plan
        host.dmzctl("up", str(config))
        info = run("virsh", "pool-dumpxml", "dmzctl").stdout
        assert "type='dir'" in info and "autostart" in run("virsh", "pool-info", "dmzctl").stdout.lower()
        assert {f"{name}-data.qcow2", f"{name}-cidata.iso"} <= set(volumes("dmzctl"))
        if not existed:
            assert f"<path>{DEFAULT_POOL_DIR}</path>" in info, info
    finally:
        dmzctl("destroy", str(config), "--timeout", "0")
        remove_volumes("dmzctl", f"{name}-")
        if not existed:
            run("virsh", "-q", "pool-destroy", "dmzctl", check=False)
            run("virsh", "-q", "pool-delete", "dmzctl", check=False)
            run("virsh", "-q", "pool-undefine", "dmzctl", check=False)
            if not parent_existed and DEFAULT_POOL_DIR.parent.is_dir():
                DEFAULT_POOL_DIR.parent.rmdir()  # libvirt made it for the pool; only when empty


def test_an_absent_pool_of_another_name_is_one_line_and_changes_nothing(host):
    result = host.dmzctl("up", str(host.config(pool="pv-nosuchpool")), check=False)
    assert result.returncode != 0
    assert "storage pool 'pv-nosuchpool' does not exist" in result.stderr and "Traceback" not in result.stderr
    assert run("virsh", "-q", "net-info", DMZ, check=False).returncode != 0 or "Active:         no" in \
        run("virsh", "net-info", DMZ).stdout


def test_a_failed_up_removes_the_volumes_it_made_and_keeps_one_that_was_there(host):
    """The domain's start fails (its kernel is not a kernel: no check before can tell): what this
    run created goes again, newest first; a data volume made beforehand stays."""
    config = host.config()
    run("virsh", "-q", "vol-create-as", POOL, f"{VM}-data.qcow2", "8M", "--format", "qcow2")
    kept = run("virsh", "vol-key", "--pool", POOL, f"{VM}-data.qcow2").stdout
    not_a_kernel = host.directory / "not-a-kernel"
    not_a_kernel.write_bytes(b"\0" * 4096)
    not_a_kernel.chmod(0o644)
    config.write_text(config.read_text().replace(f'kernel = "{guest_dir() / "kernel"}"', f'kernel = "{not_a_kernel}"'))
    try:
        result = host.dmzctl("up", str(config), check=False)
        assert result.returncode != 0, result.stdout
        assert f"undone: volume {POOL}/{VM}-root.qcow2" in result.stdout, result.stdout
        assert set(volumes(POOL)) == {f"{VM}-data.qcow2"}
        assert run("virsh", "vol-key", "--pool", POOL, f"{VM}-data.qcow2").stdout == kept
    finally:
        dmzctl("destroy", str(config), "--timeout", "0")
        remove_volumes(POOL, f"{VM}-")
