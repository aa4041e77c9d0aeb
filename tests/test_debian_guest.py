"""A real Debian 12 cloud guest (scripts/build-debian-guest.sh) under dmzctl.

One guest boots for the whole module: systemd, udev, cloud-init configured by a
NoCloud seed ISO (volume `cidata`: user-data, meta-data, network-config v2),
openssh-server, nginx. Everything is checked from the host: the serial log,
SSH with a key made for this run, the static address from network-config, the
web server, and `dmzctl down` ending in a clean systemd power-off.

Names start with `dbg`; the DMZ is 10.227.0.0/24 and fdd0:227::/64, its
"protected" subnet 10.227.128.0/24 (nothing is sent there). The host reaches
the guest directly: it is the DMZ's gateway (route mode), and dmzctl's table
only restricts flows that the DMZ starts.

The DMZ has IPv6 on purpose: on an IPv4-only link systemd-networkd waits out
its router solicitations (3 x 4 s) before network-online.target, and cloud-init
and sshd wait with it; cloud-init 22.4 renders `accept-ra: false` for networkd
only together with DHCPv6, so the seed cannot turn that off.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest import cached_build, dmzctl, serial_log, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ = "dbgdeb"
VM = "dbgdeb-web"
GATEWAY = "10.227.0.1/24"
GATEWAY6 = "fdd0:227::1/64"
VM_IP = "10.227.0.10"
VM_IP6 = "fdd0:227::10"
MAC = "52:54:00:db:00:10"
HOSTNAME = "dbg-seeded"          # from meta-data only: nothing else names the guest so
USER = "dmz"
SHUTDOWN_TIMEOUT = 90
BOOT_TIMEOUT = 420               # generous: a TCG guest on a shared 2-core machine


def debian_guest_dir() -> Path:
    """The cached Debian guest; built on demand (~2 min) when the suite runs without scripts/test.sh."""
    return cached_build("DMZCTL_DEBIAN_GUEST", "build-debian-guest.sh", "the Debian guest")


def seed_files(instance_id: str, public_key: str) -> dict[str, str]:
    """The NoCloud seed: who may log in, the instance's name, its static address."""
    user_data = f"""#cloud-config
users:
  - name: {USER}
    shell: /bin/bash
    lock_passwd: true
    ssh_authorized_keys:
      - {public_key}
ssh_pwauth: false
# One host key type: RSA key generation alone costs ~10 s of boot under TCG.
ssh_genkeytypes: [ed25519]
"""
    meta_data = f"instance-id: {instance_id}\nlocal-hostname: {HOSTNAME}\n"
    network_config = f"""version: 2
ethernets:
  nic0:
    match:
      macaddress: "{MAC}"
    set-name: eth0
    addresses: [{VM_IP}/24, "{VM_IP6}/64"]
    routes:
      - to: 0.0.0.0/0
        via: {GATEWAY.split('/')[0]}
"""
    return {"user-data": user_data, "meta-data": meta_data, "network-config": network_config}


def make_seed_iso(directory: Path, files: dict[str, str]) -> Path:
    """ISO 9660 with Joliet and Rock Ridge, volume label `cidata`, made by xorriso."""
    content = directory / "seed"
    content.mkdir()
    for name, text in files.items():
        (content / name).write_text(text)
    iso = directory / "seed.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-output", str(iso), "-volid", "cidata",
                    "-joliet", "-rock", str(content)], check=True, capture_output=True)
    iso.chmod(0o644)
    return iso


def vm_config(directory: Path, image: Path, guest: Path, seed: Path) -> Path:
    cmdline = (guest / "cmdline-base").read_text().strip()
    path = directory / f"{DMZ}.toml"
    path.write_text(f"""
[dmz]
name = "{DMZ}"
bridge = "{DMZ}0"
gateway = "{GATEWAY}"
gateway6 = "{GATEWAY6}"
protected = ["10.227.128.0/24"]

[[vm]]
name = "{VM}"
memory = "768MiB"
vcpus = 1
# The overlay's backing file is named, with its format: dmzctl reads no format from a file
disks = [{{ path = "{image}", format = "qcow2", backing = [{{ path = "{guest / 'disk.qcow2'}", format = "qcow2" }}] }}]
cdrom = "{seed}"
boot = "kernel"
kernel = "{guest / 'vmlinuz'}"
initrd = "{guest / 'initrd.img'}"
cmdline = "{cmdline}"
ip = "{VM_IP}"
ip6 = "{VM_IP6}"
mac = "{MAC}"
graphics = "none"
shutdown_timeout = {SHUTDOWN_TIMEOUT}
autostart = false
""")
    return path


def ssh_banner(address: str, timeout: float = 3) -> bytes:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as conn:
            return conn.recv(64)
    except OSError:
        return b""


@dataclass
class Guest:
    directory: Path
    config: Path
    key: Path
    known_hosts: Path
    instance_id: str
    env: dict

    def ssh_args(self) -> list[str]:
        # One connection for all commands (ControlMaster): each new login would cost the guest a key
        # exchange, a PAM session and a systemd user manager, seconds each under TCG.
        return ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.directory}/ssh-%C", "-o", "ControlPersist=300", f"{USER}@{VM_IP}"]

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_args() + [command], capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        subprocess.run(self.ssh_args()[:-1] + ["-O", "exit", f"{USER}@{VM_IP}"], capture_output=True, timeout=30)

    def run(self, command: str) -> str:
        result = self.ssh(command)
        assert result.returncode == 0, f"ssh {command!r}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        return result.stdout


def report(what: str, seconds: float) -> None:
    """A measured duration, shown with pytest -s; never asserted."""
    print(f"\n[debian guest] {what}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def guest():
    """Boot ONE Debian guest for the module; remove every object of it afterwards, whatever happened."""
    base = debian_guest_dir()
    # QEMU runs as libvirt-qemu: the directory must be traversable (mkdtemp makes it 0700).
    directory = Path(tempfile.mkdtemp(prefix="dbgdeb-", dir="/var/tmp"))
    directory.chmod(0o755)
    env = {"DMZCTL_EVENT_LOG": str(directory / "events.log")}
    wipe(DMZ, [VM])
    try:
        key = directory / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dbg-test", "-f", str(key)],
                       check=True, capture_output=True)
        image = directory / f"{VM}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base / "disk.qcow2"),
                        str(image)], check=True, capture_output=True)
        image.chmod(0o644)
        instance_id = f"dbg-{os.getpid()}-{int(time.time())}"
        seed = make_seed_iso(directory, seed_files(instance_id, (directory / "id_ed25519.pub").read_text().strip()))
        config = vm_config(directory, image, base, seed)
        booted = Guest(directory, config, key, directory / "known_hosts", instance_id, env)

        began = time.monotonic()
        dmzctl("up", str(config), check=True, env=env)
        started = time.monotonic()
        report("dmzctl up", started - began)
        deadline = started + BOOT_TIMEOUT
        while not ssh_banner(VM_IP).startswith(b"SSH-"):
            if time.monotonic() > deadline:
                log = serial_log(VM).read_text(errors="replace") if serial_log(VM).exists() else ""
                pytest.fail(f"no sshd on {VM_IP}:22 within {BOOT_TIMEOUT} s; serial log tail:\n{log[-4000:]}")
            time.sleep(1)
        report("VM started to sshd banner", time.monotonic() - started)
        try:
            yield booted
        finally:
            booted.close()
    finally:
        dmzctl("destroy", str(directory / f"{DMZ}.toml"), "--timeout", "0", env=env)
        wipe(DMZ, [VM])
        shutil.rmtree(directory, ignore_errors=True)
        # libvirt gave the shared backing file to libvirt-qemu and does not give it back.
        os.chown(base / "disk.qcow2", 0, 0)


def debugfs(raw: Path, request: str) -> str:
    result = subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True)
    return result.stdout


def names(listing: str) -> set[str]:
    """Entry names from debugfs' `ls -p` (/inode/mode/uid/gid/name/size/ lines)."""
    return {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}


def test_image_is_a_cloud_image_without_secrets_or_identity(tmp_path):
    """Read the cached image itself (no mount): no host keys, empty machine-id, no password, no
    authorized_keys; cloud-init may use NoCloud."""
    raw = tmp_path / "root.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(debian_guest_dir() / "disk.qcow2"),
                    str(raw)], check=True, capture_output=True)
    ssh_dir = debugfs(raw, "ls -l /etc/ssh")
    assert "sshd_config" in ssh_dir, ssh_dir       # the listing works at all
    assert "ssh_host_" not in ssh_dir, ssh_dir
    assert "Type: regular" in debugfs(raw, "stat /etc/machine-id")
    assert debugfs(raw, "cat /etc/machine-id") == ""
    shadow = debugfs(raw, "cat /etc/shadow")
    assert shadow.startswith("root:"), shadow
    assert [line for line in shadow.splitlines() if line.split(":")[1].startswith("$")] == []
    assert "authorized_keys" not in debugfs(raw, "ls -l /root/.ssh") + debugfs(raw, "ls -l /home")
    cloud_cfg = debugfs(raw, "cat /etc/cloud/cloud.cfg.d/99_dmzctl.cfg")
    assert re.search(r"^datasource_list: \[ NoCloud, None \]$", cloud_cfg, re.M), cloud_cfg
    assert names(debugfs(raw, "ls -p /var/lib/cloud")) <= {".", ".."}, "cloud-init state baked in"


def test_systemd_reaches_its_boot_target(guest):
    # The serial console: systemd's status lines up to the serial getty, whose prompt shows the seeded
    # name. (systemd prints no status while a getty owns the console: no "Reached target multi-user".)
    log = wait_for_serial(VM, f"{HOSTNAME} login:", timeout=120)
    assert "Welcome to" in log and "Debian GNU/Linux 12" in log, log[-3000:]
    assert "Reached target" in log and "basic.target" in log, log[-3000:]
    # systemd itself: its default target becomes active, with no unit failed on the way. cloud-init's
    # last two stages (cloud-config, cloud-final) may still run: waiting for them costs ~25 s.
    default = guest.run("systemctl get-default").strip()
    began = time.monotonic()
    while guest.ssh(f"systemctl is-active --quiet {default}").returncode != 0:
        assert time.monotonic() - began < 120, guest.ssh("systemctl list-jobs").stdout
        time.sleep(1)
    report(f"sshd banner to {default} active", time.monotonic() - began)
    assert guest.run("systemctl list-units --failed --plain --no-legend").strip() == ""


def test_ssh_with_the_test_key_runs_a_command_and_cloud_init_named_the_guest(guest):
    assert guest.run("hostname").strip() == HOSTNAME
    assert guest.run("id -un").strip() == USER
    # cloud-init read our seed: its instance-id, from the NoCloud datasource.
    assert guest.run("cat /var/lib/cloud/data/instance-id").strip() == guest.instance_id
    assert "DataSourceNoCloud" in guest.run("cat /run/cloud-init/status.json")


def test_host_key_and_machine_id_were_made_at_first_boot(guest):
    # The key ssh accepted is the one cloud-init generated (ed25519 only, as user-data asked).
    offered = guest.known_hosts.read_text().split()
    on_guest = guest.run("cat /etc/ssh/ssh_host_ed25519_key.pub").split()
    assert offered[1:3] == on_guest[0:2]
    assert guest.run("ls /etc/ssh/ | grep -c '^ssh_host_.*_key$' || true").strip() == "1"
    assert re.fullmatch(r"[0-9a-f]{32}", guest.run("cat /etc/machine-id").strip())


def test_static_addresses_from_network_config(guest):
    addresses = guest.run("ip -4 -o addr show scope global").split("\n")
    addresses = [line.split()[1:4] for line in addresses if line]
    assert addresses == [["eth0", "inet", f"{VM_IP}/24"]]
    # The static IPv6 address; libvirt's router advertisements add a SLAAC one beside it.
    assert f"inet6 {VM_IP6}/64" in guest.run("ip -6 -o addr show dev eth0 scope global")
    assert guest.run("ip -4 route show default").split()[:5] == ["default", "via", GATEWAY.split("/")[0],
                                                                  "dev", "eth0"]
    assert "MACAddress=" + MAC in guest.run("cat /etc/systemd/network/10-cloud-init-eth0.network")


@pytest.mark.parametrize("address", [VM_IP, f"[{VM_IP6}]"])
def test_web_server_answers_on_port_80(guest, address):
    with urllib.request.urlopen(f"http://{address}/", timeout=30) as response:
        body = response.read().decode()
        assert response.status == 200
        assert response.headers["Server"].startswith("nginx")
    assert "Welcome to nginx!" in body


def test_down_ends_with_a_clean_systemd_power_off(guest):
    guest.close()
    began = time.monotonic()
    result = dmzctl("down", str(guest.config), env=guest.env, timeout=SHUTDOWN_TIMEOUT + 60)
    report("dmzctl down", time.monotonic() - began)
    assert result.returncode == 0, result.stdout + result.stderr
    # Powered off by ACPI within shutdown_timeout, not destroyed after it.
    assert f"VM {VM} powered off" in result.stdout, result.stdout
    log = serial_log(VM).read_text(errors="replace")
    assert "systemd-shutdown[1]: Powering off." in log, log[-3000:]
    assert "reboot: Power down" in log, log[-3000:]
