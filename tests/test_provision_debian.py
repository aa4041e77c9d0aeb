"""A real Debian server from a cloud image, the way the README tells a user to make one.

One guest boots for the module from a config of about 15 lines (examples/server.toml's, plus what
this machine needs: direct kernel boot, a test pool, a hole to probe): base image -> root volume in
a pool -> cloud-init seed volume -> boot. Then, from a "LAN" network namespace, SSH with a key made
for this run; and from inside the guest, the LAN is unreachable but for its hole, and the DMZ
gateway's DNS answers.

Names start with `pv-`; the DMZ is 10.215.0.0/24 + fdd0:215::/64 (dual-stack: an IPv4-only link
costs systemd-networkd 12 s of router solicitations, docs/debian-guest.md), the LAN namespace
`pv-lan` holds 10.216.0.0/24 + fdd0:216::/64. The base image is a copy of the cached Debian guest's
disk, so that its owner is this module's to check (libvirt must never chown it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest import cached_build, dmzctl, serial_log, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

DMZ = "pv-deb"
VM = "pv-deb-web"
POOL = "pv-test"
NS = "pv-lan"
LAN_IP, LAN_HOST = "10.216.0.10", "10.216.0.1"
VM_IP, VM_IP6 = "10.215.0.10", "fdd0:215::10"
GATEWAY = "10.215.0.1"
HOLE_PORT, BLOCKED_PORT = 8053, 9999
USER = "debian"  # the image's cloud-init default user: top-level ssh_authorized_keys are its keys
BOOT_TIMEOUT = 420

LISTENER = r"""
import socket, sys, selectors, time
log = open(sys.argv[1], "a", buffering=1)
sel = selectors.DefaultSelector()
for port in (int(p) for p in sys.argv[3].split(",")):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[2], port)); s.listen(8); sel.register(s, selectors.EVENT_READ, port)
open(sys.argv[1] + ".ready", "w").close()
while True:
    for key, _ in sel.select():
        conn, peer = key.fileobj.accept(); log.write(f"{key.data} {peer[0]}\n"); conn.close()
"""


STORAGE_STEP = re.compile(r"^\s+[+~>] (pool|volume|seed|vm) ", re.M)


def storage_steps(plan: str) -> list[str]:
    """plan's steps about this module's pool, volumes, seed and VM (other agents' networks may make
    the filters and the table stale meanwhile: not this module's business)."""
    return [line.strip() for line in plan.splitlines() if STORAGE_STEP.match(line)]


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def lan_up() -> None:
    run("ip", "netns", "add", NS)
    run("ip", "link", "add", "pv-lan-h", "type", "veth", "peer", "name", "pv-lan-n")
    run("ip", "link", "set", "pv-lan-n", "netns", NS)
    run("ip", "addr", "add", f"{LAN_HOST}/24", "dev", "pv-lan-h")
    run("ip", "-6", "addr", "add", "fdd0:216::1/64", "dev", "pv-lan-h", "nodad")
    run("ip", "link", "set", "pv-lan-h", "up")
    for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{LAN_IP}/24", "dev", "pv-lan-n"],
                 ["ip", "-6", "addr", "add", "fdd0:216::10/64", "dev", "pv-lan-n", "nodad"],
                 ["ip", "link", "set", "pv-lan-n", "up"], ["ip", "route", "add", "default", "via", LAN_HOST],
                 ["ip", "-6", "route", "add", "default", "via", "fdd0:216::1"]):
        run("ip", "netns", "exec", NS, *argv)


def lan_down() -> None:
    run("ip", "link", "del", "pv-lan-h", check=False)
    run("ip", "netns", "del", NS, check=False)


def pool_up(directory: Path) -> None:
    run("virsh", "-q", "pool-define-as", POOL, "dir", "--target", str(directory))
    run("virsh", "-q", "pool-start", POOL)


def pool_down() -> None:
    listing = run("virsh", "-q", "vol-list", POOL, check=False).stdout
    for line in listing.splitlines():
        if line.split() and line.split()[0].startswith(f"{VM}-"):
            run("virsh", "-q", "vol-delete", "--pool", POOL, line.split()[0], check=False)
    run("virsh", "-q", "pool-destroy", POOL, check=False)
    run("virsh", "-q", "pool-undefine", POOL, check=False)


def server_config(directory: Path, image: Path, guest: Path, key: Path) -> Path:
    """examples/server.toml's 15 lines, and what this machine and the probes need (marked +)."""
    path = directory / f"{DMZ}.toml"
    path.write_text(f"""[dmz]
name = "{DMZ}"
gateway = "{GATEWAY}/24"
gateway6 = "fdd0:215::1/64"
protected = ["10.216.0.0/24", "fdd0:216::/64"]
[[dmz.allow]]                                               # +
to = "{LAN_IP}"                                             # +
proto = "tcp"                                               # +
port = {HOLE_PORT}                                          # +

[[vm]]
name = "{VM}"
image = "{image}"
disk_size = "4GiB"
ip = "{VM_IP}"
ip6 = "{VM_IP6}"
pool = "{POOL}"                                             # +
memory = "768MiB"                                           # +
kernel = "{guest / 'vmlinuz'}"                              # + direct kernel boot
initrd = "{guest / 'initrd.img'}"                           # +
cmdline = "{(guest / 'cmdline-base').read_text().strip()}"  # +
graphics = "none"                                           # +
autostart = false                                           # +
shutdown_timeout = 60                                       # +
[[vm.volume]]                                               # +
name = "data"                                               # +
size = "64MiB"                                              # +

[vm.cloud_init]
ssh_authorized_keys = ["{key.read_text().strip()}"]
""")
    return path


@dataclass
class Server:
    directory: Path
    config: Path
    key: Path
    base: Path
    base_stat: tuple
    env: dict
    listener_log: Path

    def ssh_argv(self, command: str) -> list[str]:
        return ["ip", "netns", "exec", NS, "ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self.directory}/ssh-%C", "-o", "ControlPersist=300", f"{USER}@{VM_IP}", command]

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout)

    def run(self, command: str) -> str:
        result = self.ssh(command)
        assert result.returncode == 0, f"ssh {command!r}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        return result.stdout


def stat_of(path: Path) -> tuple:
    st = path.stat()
    return st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)


def report(what: str, seconds: float) -> None:
    print(f"\n[provision debian] {what}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def server():
    guest = cached_build("DMZCTL_DEBIAN_GUEST", "build-debian-guest.sh", "the Debian guest")
    directory = Path(tempfile.mkdtemp(prefix="pv-deb-", dir="/var/tmp"))
    directory.chmod(0o755)
    env = {"DMZCTL_EVENT_LOG": str(directory / "events.log")}
    wipe(DMZ, [VM])
    pool_down()
    lan_down()
    listener = None
    try:
        (directory / "pool").mkdir(mode=0o711)
        pool_up(directory / "pool")
        base = directory / "debian-base.qcow2"
        shutil.copyfile(guest / "disk.qcow2", base)
        base.chmod(0o444)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pv-test", "-f", str(directory / "id_ed25519"))
        config = server_config(directory, base, guest, directory / "id_ed25519.pub")
        lan_up()
        log = directory / "listener.log"
        listener = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", LISTENER, str(log), LAN_IP,
                                     f"{HOLE_PORT},{BLOCKED_PORT}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        srv = Server(directory, config, directory / "id_ed25519", base, stat_of(base), env, log)
        began = time.monotonic()
        result = dmzctl("up", str(config), check=True, env=env, timeout=300)
        started = time.monotonic()
        report("dmzctl up (volumes, seed, network, table, start)", started - began)
        print("\n".join(line for line in result.stdout.splitlines() if "started (" in line))
        while srv.ssh("true", timeout=30).returncode != 0:
            if time.monotonic() - started > BOOT_TIMEOUT:
                text = serial_log(VM).read_text(errors="replace") if serial_log(VM).exists() else ""
                pytest.fail(f"no SSH login as {USER}@{VM_IP} within {BOOT_TIMEOUT} s; serial tail:\n{text[-4000:]}")
            time.sleep(2)
        report("VM started to SSH login from the LAN", time.monotonic() - started)
        yield srv
    finally:
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={directory}/ssh-%C", f"{USER}@{VM_IP}"],
                       capture_output=True, timeout=30)
        if listener is not None:
            listener.terminate()
            listener.wait(10)
        dmzctl("destroy", str(directory / f"{DMZ}.toml"), "--timeout", "0", env=env)
        wipe(DMZ, [VM])
        pool_down()
        lan_down()
        shutil.rmtree(directory, ignore_errors=True)


def test_base_image_overlay_volume_seed_and_boot(server):
    xml = run("virsh", "vol-dumpxml", "--pool", POOL, f"{VM}-root.qcow2").stdout
    assert f"<path>{server.base}</path>" in xml and "<format type='qcow2'/>" in xml.split("<backingStore>")[1], xml
    names = run("virsh", "-q", "vol-list", POOL).stdout
    for name in (f"{VM}-root.qcow2", f"{VM}-data.qcow2", f"{VM}-cidata.iso"):
        assert name in names, names
    domain = run("virsh", "dumpxml", VM).stdout
    seed = domain.split(f"{VM}-cidata.iso")[1].split("</disk>")[0]
    assert "<readonly/>" in seed, domain
    assert "relabel='no'" in domain.split(str(server.base))[1].split("</source>")[0], domain
    # The guest runs from the overlay: its root is /dev/vda, written, while the base is untouched.
    assert server.run("findmnt -n -o SOURCE /").strip() == "/dev/vda"
    assert stat_of(server.base) == server.base_stat  # libvirt did not chown the shared base image


def test_cloud_init_named_the_guest_and_installed_the_key(server):
    assert server.run("hostname").strip() == VM  # the default hostname: the VM's name
    assert server.run("id -un").strip() == USER
    assert "DataSourceNoCloud" in server.run("cat /run/cloud-init/status.json")


def test_static_addresses_from_the_generated_network_config(server):
    v4 = server.run("ip -4 -o addr show dev eth0 scope global")
    assert f"inet {VM_IP}/24" in v4, v4
    assert f"inet6 {VM_IP6}/64" in server.run("ip -6 -o addr show dev eth0 scope global")
    assert server.run("ip -4 route show default").split()[:3] == ["default", "via", GATEWAY]


def test_data_volume_is_present(server):
    disks = server.run("lsblk -b -d -n -o NAME,SIZE").split()
    assert disks[disks.index("vdb") + 1] == str(64 << 20), disks


def test_firewall_was_in_place_before_the_first_boot(server):
    lines = (server.directory / "events.log").read_text().splitlines()

    def first(text: str) -> int:
        return next(index for index, line in enumerate(lines) if text in line)

    table = first(f"firewall table dmzctl-{DMZ} applied")
    root, seed = first(f"root volume {POOL}/{VM}-root.qcow2 created"), first(f"seed {POOL}/{VM}-cidata.iso created")
    assert table < root < first(f"vm={VM} started") and seed < first(f"vm={VM} started"), lines


def test_the_server_cannot_reach_the_lan_but_its_hole_and_dns(server):
    def connect(address: str, port: int) -> int:
        return server.ssh(f"timeout 5 bash -c 'echo > /dev/tcp/{address}/{port}'").returncode

    assert connect(GATEWAY, 53) == 0  # the DMZ gateway's DNS (libvirt's dnsmasq)
    assert connect(LAN_IP, HOLE_PORT) == 0  # the [[dmz.allow]] hole
    assert connect(LAN_IP, BLOCKED_PORT) != 0
    assert connect(LAN_HOST, 22) != 0  # the host's LAN address
    seen = server.listener_log.read_text().split("\n")
    assert f"{HOLE_PORT} {VM_IP}" in seen and not any(line.startswith(f"{BLOCKED_PORT} ") for line in seen), seen


def test_plan_has_no_volume_seed_or_vm_step_after_up(server):
    result = dmzctl("plan", str(server.config), env=server.env)
    assert result.returncode == 0 and storage_steps(result.stdout) == [], result.stdout + result.stderr


def test_down_keeps_the_volumes_and_the_base_image_owner(server):
    subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={server.directory}/ssh-%C", f"{USER}@{VM_IP}"],
                   capture_output=True, timeout=30)
    result = dmzctl("down", str(server.config), check=True, env=server.env, timeout=200)
    # Real ACPI: systemd powers the guest off within its shutdown_timeout, not destroyed after it.
    assert f"VM {VM} powered off" in result.stdout, result.stdout
    log = serial_log(VM).read_text(errors="replace")
    assert "systemd-shutdown[1]: Powering off." in log and "reboot: Power down" in log, log[-3000:]
    names = run("virsh", "-q", "vol-list", POOL).stdout
    assert f"{VM}-root.qcow2" in names and f"{VM}-data.qcow2" in names, names
    assert stat_of(server.base) == server.base_stat
    assert os.path.exists(server.base)
    # Halted, not gone: virt-manager lists it "Shut off".
    assert run("virsh", "domstate", VM).stdout.strip() == "shut off"


def test_destroy_keeps_the_volumes_and_deletes_them_only_when_told(server):
    kept = dmzctl("destroy", str(server.config), check=True, env=server.env)
    assert f"VM {VM} undefined" in kept.stdout and "deleted" not in kept.stdout, kept.stdout
    assert run("virsh", "dominfo", VM, check=False).returncode != 0
    volumes = {f"{VM}-root.qcow2", f"{VM}-data.qcow2", f"{VM}-cidata.iso"}
    assert volumes <= set(run("virsh", "-q", "vol-list", POOL).stdout.split()), "destroy deleted a volume"
    # Data goes only on an explicit word: without a terminal, --yes.
    refused = dmzctl("destroy", str(server.config), "--delete-volumes", env=server.env)
    assert refused.returncode != 0 and "add --yes" in refused.stderr + refused.stdout, refused
    assert volumes <= set(run("virsh", "-q", "vol-list", POOL).stdout.split())
    gone = dmzctl("destroy", str(server.config), "--delete-volumes", "--yes", check=True, env=server.env)
    for name in volumes:
        assert f"volume {POOL}/{name} deleted" in gone.stdout, gone.stdout
    assert not volumes & set(run("virsh", "-q", "vol-list", POOL).stdout.split())
    assert stat_of(server.base) == server.base_stat  # the base image is never one of them
