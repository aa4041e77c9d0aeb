"""Fail closed however a VM is started: `dmzctl up` installs libvirt's hooks itself.

Against the real /etc/libvirt/hooks and the running libvirtd (told by SIGHUP to read
them, as `up` does the first time): with its table deleted, a dmzctl VM started
from virsh is refused by the hook; status and check report missing hooks as a
problem, and check --fix puts them back. The hook files are removed afterwards:
libvirtd re-reads the .d directories at every call, so that needs no restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from guest import dmzctl, guest_dir, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ, VM, BRIDGE = "hkd", "hkd-web", "hkdbr0"
GATEWAY, VM_IP = "10.249.0.1/24", "10.249.0.10"
HOOKS = Path("/etc/libvirt/hooks")
OURS = [HOOKS / "qemu.d" / "dmzctl", HOOKS / "network.d" / "dmzctl"]
REAL = {"DMZCTL_HOOKS_DIR": str(HOOKS)}


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          timeout=120)


def remove_ours() -> None:
    for path in OURS:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass


@pytest.fixture(scope="module")
def dmz(tmp_path_factory):
    # dmzctl's own hooks may be installed already (an earlier `dmzctl up`, the demo): they are put
    # back as they were afterwards. Anyone else's file of that name is not touched.
    present = {p: p.read_text() for p in OURS if p.exists()}
    foreign = [p for p, text in present.items() if "# dmzctl libvirt hook" not in text]
    assert not foreign, f"hook files that are not dmzctl's, not touching them: {foreign}"
    remove_ours()
    config = tmp_path_factory.mktemp("hooks") / "hkd.toml"
    config.write_text(f'[dmz]\nname = "{DMZ}"\nbridge = "{BRIDGE}"\ngateway = "{GATEWAY}"\n'
                      f'protected = ["10.249.128.0/24"]\n' + kernel_vm_toml(VM, VM_IP, GATEWAY, guest_dir()))
    wipe(DMZ, [VM])
    try:
        up = dmzctl("up", str(config), env=REAL, check=True)
        wait_for_serial(VM, "DMZGUEST READY")
        yield {"config": config, "up": up}
    finally:
        dmzctl("destroy", str(config), "--timeout", "0", env=REAL)
        wipe(DMZ, [VM])
        remove_ours()
        for path, text in present.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)


def test_up_installs_the_hooks_and_tells_libvirtd(dmz):
    out = dmz["up"].stdout
    for path in OURS:
        assert f"hooks: installed {path}" in out, out
        assert path.read_text().splitlines()[1].startswith("# dmzctl libvirt hook")
    assert "to read them (SIGHUP)" in out, out
    again = dmzctl("up", str(dmz["config"]), env=REAL, check=True)
    assert "hooks:" not in again.stdout, "installed once, then left alone"
    status = dmzctl("status", str(dmz["config"]), env=REAL)
    assert status.returncode == 0 and "hooks     installed" in status.stdout, status.stdout


def test_virsh_start_without_the_table_is_refused(dmz):
    assert virsh("destroy", VM).returncode == 0
    subprocess.run(["nft", "delete", "table", "inet", f"dmzctl-{DMZ}"], check=True)
    try:
        started = virsh("start", VM)
        assert started.returncode != 0, "a dmzctl VM started from virsh without its firewall table"
        assert f"refusing to start {VM} of DMZ {DMZ}" in started.stderr, started.stderr
        assert "firewall table inet dmzctl-hkd is absent" in started.stderr, started.stderr
        assert virsh("domstate", VM).stdout.strip() == "shut off"
    finally:
        dmzctl("firewall", "up", str(dmz["config"]), env=REAL, check=True)
    # With its table back, the same start passes the hook.
    assert virsh("start", VM).returncode == 0
    wait_for_serial(VM, "DMZGUEST READY")


def test_missing_hooks_are_a_problem_and_check_fix_restores_them(dmz):
    OURS[0].unlink()
    try:
        status = dmzctl("status", str(dmz["config"]), env=REAL)
        assert status.returncode != 0, status.stdout
        assert "hooks     missing" in status.stdout, status.stdout
        assert f"libvirt hook {OURS[0]}: missing" in status.stdout, status.stdout
        check = dmzctl("check", str(dmz["config"]), "--json", env=REAL)
        assert check.returncode == 1
        shorts = {d["short"] for d in json.loads(check.stdout)["dmzs"][0]["differences"]}
        assert shorts == {"hooks missing"}, shorts
        fixed = dmzctl("check", str(dmz["config"]), "--fix", env=REAL)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert OURS[0].exists()
    finally:
        if not OURS[0].exists():
            dmzctl("up", str(dmz["config"]), env=REAL)


def test_no_hooks_is_an_explicit_opt_out(dmz, tmp_path):
    elsewhere = {"DMZCTL_HOOKS_DIR": str(tmp_path / "hooks")}
    result = dmzctl("up", str(dmz["config"]), "--no-hooks", env=elsewhere, check=True)
    assert "hooks:" not in result.stdout
    assert not (tmp_path / "hooks").exists()
    status = dmzctl("status", str(dmz["config"]), env=elsewhere)
    assert status.returncode != 0 and "hooks     missing" in status.stdout


def test_a_halted_dmz_stays_listed_and_its_vms_start_only_with_their_table(dmz):
    """`down` keeps the definitions (virt-manager shows "Shut off"); the hooks still hold the line."""
    config = dmz["config"]
    dmzctl("down", str(config), "--timeout", "0", env=REAL, check=True)
    try:
        assert virsh("domstate", VM).stdout.strip() == "shut off"
        assert virsh("net-info", DMZ).returncode == 0 and "Active:         no" in virsh("net-info", DMZ).stdout
        assert subprocess.run(["nft", "list", "table", "inet", f"dmzctl-{DMZ}"],
                              capture_output=True).returncode != 0, "down leaves no table"
        status = dmzctl("status", str(config), env=REAL)
        assert status.returncode == 1 and "DOWN (defined, not running)" in status.stdout, status.stdout
        # virt-manager's "start network": the network hook puts the DMZ's table in place first.
        assert virsh("net-start", DMZ).returncode == 0
        assert subprocess.run(["nft", "list", "table", "inet", f"dmzctl-{DMZ}"],
                              capture_output=True).returncode == 0, "network started without its table"
        # Someone deletes the table; virt-manager's "Run" of the halted VM is refused.
        subprocess.run(["nft", "delete", "table", "inet", f"dmzctl-{DMZ}"], check=True)
        started = virsh("start", VM)
        assert started.returncode != 0 and f"refusing to start {VM} of DMZ {DMZ}" in started.stderr, started.stderr
    finally:
        dmzctl("up", str(config), env=REAL, check=True)
    assert virsh("domstate", VM).stdout.strip() == "running"
