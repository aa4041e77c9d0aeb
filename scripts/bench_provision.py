#!/usr/bin/env python3
"""From nothing to "SSH answers": `dmzctl up` against virt-install + the same firewall by hand (issue 11).

Run as root with the project's venv, from anywhere:

    /work/main/.venv/bin/python scripts/bench_provision.py                        # 3 runs of each way
    /work/main/.venv/bin/python scripts/bench_provision.py --only virt-install --runs 3

It prints one Markdown report (also written to --output, default docs/benchmarks-provision.md).
Both ways start the same real Debian 12 cloud guest (scripts/build-debian-guest.sh: cloud-init
NoCloud, sshd, nginx; direct kernel boot) from the same base image, with the same SSH key (made by
this run), the same static address 10.221.0.10 / fdd0:221::10, 768 MiB and 1 vCPU, in a routed,
dual-stack DMZ 10.221.0.0/24 + fdd0:221::/64 whose protected LAN is 10.222.0.0/24:

- "virt-install": what an admin does by hand today. The files are written first (untimed, they are
  the admin's work: network XML, user-data, meta-data, network-config, and the nft table dmzctl
  renders for the same DMZ, as `dmzctl render --what nft` prints it). Then, timed: `virsh
  net-define` + `net-start`, `qemu-img create` of an overlay, `virt-install --import --cloud-init
  ...`, and `nft -f` of the table: the firewall lands right after virt-install returns, which is
  the order the usual way implies (the VM is already booting by then).
- "dmzctl": one TOML file with `image`, `disk_size`, `pool`, `[vm.cloud_init]`, `ip`, kernel/initrd/
  cmdline, then `dmzctl up` (a cold process). Needs the provisioning fields of issue 11.

Each run starts from nothing of the way's names and ends when `ssh -i key debian@10.221.0.10 true`
succeeds from the host (the DMZ's gateway; dmzctl's table restricts only flows the DMZ starts).
Figures: total (nothing -> SSH), command (until the last command returns), boot to SSH (from the
moment libvirt started QEMU, read from the "starting up" line of its QEMU log, to SSH), and for the
by-hand way how long after that the firewall was in place. Teardown between runs is untimed.
No timing is asserted anywhere.

Safety: names `bvi-...` (virt-install way: network bvi-dmz, bridge bvi0, VM bvi-web, table inet
bvi-fw) and `bdz...` (dmzctl way: DMZ bdz, bridge bdz0, VM bdz-web, table inet dmzctl-bdz, pool
bdz-bench in a temporary directory). Only objects of these names are created or removed. Nothing
is sent beyond the DMZ bridges this run creates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchlib import (REPO, Interrupted, Report, cpu_model, duration, hardware_virtualization, interrupt_on_signals,
                      kernel, load1, load_average, log, memory, os_name, publish, ratio, revision, summary,
                      tool_version)

WAYS = ("virt-install", "dmzctl")
DEFAULT_RUNS = 3
URI = "qemu:///system"
GATEWAY4, GATEWAY6 = "10.221.0.1", "fdd0:221::1"
VM_IP, VM_IP6 = "10.221.0.10", "fdd0:221::10"
PROTECTED = "10.222.0.0/24"
MEMORY_MIB, VCPUS, DISK_SIZE = 768, 1, "4GiB"
DEFAULT_USER = "debian"  # the cloud image's default user (Debian's cloud.cfg); keys from top-level ssh_authorized_keys
SSH_TIMEOUT = 600.0      # a TCG guest on a shared 2-core machine: 90-185 s at load 2, over 400 s at load 8
BENCH_LOCK = Path("/run/dmzctl-bench-provision.lock")
NOT_MEASURED = "to be measured after the provisioning branch merges"
SCRATCH = "/var/lib/libvirt/boot"   # virtinst's scratch directory (as root) for the cloud-init seed ISO


@dataclass(frozen=True)
class Names:
    """Every host object one way creates."""
    vm: str
    network: str
    bridge: str
    table: str
    mac: str = ""
    pool: str = ""
    dmz: str = ""


VI = Names(vm="bvi-web", network="bvi-dmz", bridge="bvi0", table="bvi-fw", mac="52:54:00:dd:21:10")
DZ = Names(vm="bdz-web", network="bdz", bridge="bdz0", table="dmzctl-bdz", pool="bdz-bench", dmz="bdz")


@dataclass(frozen=True)
class Guest:
    """The Debian guest: base disk, kernel, initrd, kernel command line."""
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str

    @classmethod
    def from_dir(cls, directory: Path) -> "Guest":
        return cls(directory / "disk.qcow2", directory / "vmlinuz", directory / "initrd.img",
                   (directory / "cmdline-base").read_text().strip())


# --- what each way needs from the user (pure) ------------------------------------------------

def network_xml(names: Names = VI) -> str:
    """The routed, dual-stack DMZ network an admin defines by hand (no DHCP: the address is static)."""
    return f"""<network>
  <name>{names.network}</name>
  <forward mode='route'/>
  <bridge name='{names.bridge}' stp='on' delay='0'/>
  <ip address='{GATEWAY4}' netmask='255.255.255.0'/>
  <ip family='ipv6' address='{GATEWAY6}' prefix='64'/>
</network>
"""


def user_data(public_key: str, hostname: str = VI.vm) -> str:
    return f"""#cloud-config
hostname: {hostname}
ssh_authorized_keys:
  - {public_key}
"""


def meta_data(instance_id: str, hostname: str = VI.vm) -> str:
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def network_config(mac: str = VI.mac) -> str:
    """cloud-init network-config v2: the static addresses, routes and DNS (the gateway's dnsmasq), matched by the
    MAC given to virt-install; the same content dmzctl generates for its seed."""
    return f"""version: 2
ethernets:
  eth0:
    match:
      macaddress: "{mac}"
    set-name: eth0
    addresses: [{VM_IP}/24, "{VM_IP6}/64"]
    routes:
      - to: 0.0.0.0/0
        via: {GATEWAY4}
      - to: "::/0"
        via: "{GATEWAY6}"
    nameservers:
      addresses: [{GATEWAY4}, "{GATEWAY6}"]
"""


def firewall_source_config(guest: Guest) -> str:
    """A dmzctl config of the by-hand DMZ (today's fields only): its only use is `dmzctl render --what nft`,
    the table dmzctl would apply for that DMZ, which the admin then loads with `nft -f`."""
    return f"""[dmz]
name = "bvi"
bridge = "{VI.bridge}"
gateway = "{GATEWAY4}/24"
gateway6 = "{GATEWAY6}/64"
protected = ["{PROTECTED}"]

[[vm]]
name = "{VI.vm}"
memory = "{MEMORY_MIB}MiB"
boot = "kernel"
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
cmdline = "{guest.cmdline}"
ip = "{VM_IP}"
ip6 = "{VM_IP6}"
mac = "{VI.mac}"
graphics = "none"
"""


def rename_table(batch: Any, old: str, new: str) -> Any:
    """The nft JSON batch with the table `old` called `new` (every string value equal to `old`)."""
    if isinstance(batch, dict):
        return {key: rename_table(value, old, new) for key, value in batch.items()}
    if isinstance(batch, list):
        return [rename_table(value, old, new) for value in batch]
    return new if batch == old else batch


def without_backstop(batch: dict) -> dict:
    """The batch without dmzctl's second table (render/nft_backstop.py): by hand, one table."""
    def backstop(command: dict) -> bool:
        body = next(iter(next(iter(command.values())).values()), {}) if isinstance(command, dict) else {}
        return isinstance(body, dict) and str(body.get("table", body.get("name", ""))).endswith(".backstop")
    return {"nftables": [c for c in batch["nftables"] if "metainfo" in c or not backstop(c)]}


def dmzctl_config(guest: Guest, public_key: str) -> str:
    """The whole dmzctl way: one file, with issue 11's provisioning fields."""
    return f"""[dmz]
name = "{DZ.dmz}"
bridge = "{DZ.bridge}"
gateway = "{GATEWAY4}/24"
gateway6 = "{GATEWAY6}/64"
protected = ["{PROTECTED}"]

[[vm]]
name = "{DZ.vm}"
memory = "{MEMORY_MIB}MiB"
image = "{guest.disk}"
disk_size = "{DISK_SIZE}"
pool = "{DZ.pool}"
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
cmdline = "{guest.cmdline}"
ip = "{VM_IP}"
ip6 = "{VM_IP6}"
graphics = "none"

[vm.cloud_init]
ssh_authorized_keys = ["{public_key}"]
"""


def qemu_img_argv(guest: Guest, overlay: Path) -> list[str]:
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(guest.disk), "-F", "qcow2", str(overlay),
            DISK_SIZE.replace("GiB", "G")]


def virt_install_argv(guest: Guest, overlay: Path, files: dict[str, Path]) -> list[str]:
    return ["virt-install", "--connect", URI, "--import", "--name", VI.vm, "--memory", str(MEMORY_MIB),
            "--vcpus", str(VCPUS),
            "--disk", f"path={overlay},format=qcow2,bus=virtio",
            "--network", f"network={VI.network},model=virtio,mac={VI.mac}",
            "--boot", f'kernel={guest.kernel},initrd={guest.initrd},kernel_args="{guest.cmdline}"',
            "--cloud-init", (f"user-data={files['user-data']},meta-data={files['meta-data']},"
                             f"network-config={files['network-config']}"),
            "--graphics", "none", "--noautoconsole", "--virt-type", "qemu", "--osinfo", "detect=on,require=off"]


def nft_syntax(nft_json: str, workdir: Path) -> str:
    """The JSON table in nft syntax, as an admin would write it: loaded and listed in a throwaway network
    namespace (`unshare --net`), then checked to load again from that text; "" when it does not."""
    source, listing = workdir / "render.json", workdir / "listing.nft"
    source.write_text(nft_json)
    script = (f"nft -j -f {source} && nft list table inet {VI.table} > {listing} && "
              f"nft delete table inet {VI.table} && nft -f {listing}")
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        log(f"the table in nft syntax does not load again ({result.stderr.strip()[:200]}); loading JSON instead")
        return ""
    return listing.read_text()


def significant_lines(text: str) -> int:
    """Lines a user writes: not empty, not a comment."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#!")
               and not (line.lstrip().startswith("#") and not line.startswith("#cloud-config")))


def shell_words(argv: list[str]) -> str:
    """The command as an admin types it (quoted where needed)."""
    import shlex
    return " ".join(shlex.quote(word) for word in argv)


@dataclass
class Burden:
    """What a way needs from the user: files (name -> text) and commands, in the order they must run."""
    files: dict[str, str]
    commands: list[tuple[str, list[str]]]   # (label, argv)
    notes: list[str] = field(default_factory=list)
    reference: dict[str, str] = field(default_factory=dict)   # shown, not counted: machine-made files


def virt_install_burden(guest: Guest, public_key: str, nft_json: str, nft_listing: str, workdir: Path) -> Burden:
    paths = {name: workdir / name for name in ("user-data", "meta-data", "network-config")}
    overlay = workdir / f"{VI.vm}.qcow2"
    files = {"network XML": network_xml(), "user-data": user_data(public_key),
             "meta-data": meta_data("iid-bvi-web"), "network-config": network_config(),
             "nft table (nft syntax, as `nft list table` prints it)": nft_listing}
    commands = [("virsh net-define", ["virsh", "net-define", "bvi-dmz.xml"]),
                ("virsh net-start", ["virsh", "net-start", VI.network]),
                ("qemu-img create", qemu_img_argv(guest, overlay)),
                ("virt-install", virt_install_argv(guest, overlay, paths)),
                ("nft -f", ["nft", "-f", "bvi-fw.nft"])]
    notes = ["the MAC in network-config must match the one given to virt-install",
             "the bridge name in the network XML must match the one in the nft table",
             "the firewall must be loaded before the VM starts, which virt-install does not do for you",
             "no per-NIC anti-spoofing (libvirt nwfilter) unless the admin also writes one and a filterref"]
    return Burden(files, commands, notes, {"nft table as JSON (what this benchmark loads, from `dmzctl render`)":
                                           nft_json})


def dmzctl_burden(guest: Guest, public_key: str) -> Burden:
    return Burden({"dmzctl TOML": dmzctl_config(guest, public_key)}, [("dmzctl up", ["dmzctl", "up", "bdz.toml"])])


# --- measuring -------------------------------------------------------------------------------

@dataclass
class Run:
    """One run of one way; times in seconds from the run's start (t0)."""
    way: str
    index: int
    load: float
    command: float = 0.0      # the last command returned
    returned: float = 0.0     # the command that starts the VM returned
    vm_started: float = 0.0   # libvirt started QEMU (its log's "starting up" line; else `returned`)
    firewall: Optional[float] = None   # the firewall table was in place (None: before the VM started)
    banner: Optional[float] = None     # sshd's banner first seen
    ssh: Optional[float] = None        # `ssh ... true` succeeded
    steps: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def boot_to_ssh(self) -> Optional[float]:
        return None if self.ssh is None else self.ssh - self.vm_started

    @property
    def firewall_lag(self) -> Optional[float]:
        return None if self.firewall is None else self.firewall - self.vm_started


def sh(argv: list[str], check: bool = True, timeout: float = 300, env: Optional[dict] = None
       ) -> subprocess.CompletedProcess:
    """Run a command (from this working tree, so that `python -m dmzctl.cli` is this tree's dmzctl)."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-1500:]}")
    return result


def quiet(*argv: str) -> None:
    subprocess.run(list(argv), capture_output=True, timeout=120)


def ssh_banner(address: str, bridge: str) -> bool:
    """sshd's banner, asked for through the DMZ bridge only (SO_BINDTODEVICE): were the bridge gone, the
    probe fails here instead of following the host's default route off the machine."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
            conn.settimeout(1)
            conn.connect((address, 22))
            conn.settimeout(3)
            return conn.recv(16).startswith(b"SSH-")
    except OSError:
        return False


def ssh_argv(key: Path, user: str, bridge: str) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=3",
            "-o", f"BindInterface={bridge}", "-o", "LogLevel=ERROR", f"{user}@{VM_IP}", "true"]


def wait_for_ssh(run: Run, t0: float, key: Path, user: str, bridge: str, timeout: float = SSH_TIMEOUT) -> None:
    """Banner first (a cheap TCP probe every 0.5 s), then `ssh ... true` every 0.5 s until it succeeds; both only
    through the DMZ's bridge."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/sys/class/net/{bridge}").exists():
            raise RuntimeError(f"bridge {bridge} is gone: not probing {VM_IP} (it would leave the machine)")
        if run.banner is None:
            if ssh_banner(VM_IP, bridge):
                run.banner = time.monotonic() - t0
            else:
                time.sleep(0.5)
                continue
        try:
            ok = subprocess.run(ssh_argv(key, user, bridge), capture_output=True, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if ok:
            run.ssh = time.monotonic() - t0
            return
        time.sleep(0.5)
    raise RuntimeError(f"no SSH login as {user}@{VM_IP} within {timeout:.0f} s (banner seen: {run.banner is not None})")


class Timed:
    """Run commands one after the other, each timed under a label, relative to t0."""

    def __init__(self, run: Run):
        self.run = run
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    def started(self, vm: str, returned: float) -> None:
        """When libvirt started the VM's QEMU, relative to t0 (the command that asked for it returned at `returned`)."""
        self.run.returned = returned
        stamp = qemu_started(vm)
        self.run.vm_started = returned if stamp is None or stamp < self.t0_wall else min(stamp - self.t0_wall, returned)

    def __call__(self, label: str, argv: list[str], env: Optional[dict] = None) -> float:
        began = time.monotonic()
        sh(argv, env=env)
        ended = time.monotonic()
        self.run.steps[label] = ended - began
        return ended - self.t0


def qemu_started(vm: str) -> Optional[float]:
    """Epoch seconds of the last "starting up" line libvirt wrote to the VM's QEMU log (right before QEMU runs)."""
    try:
        text = Path(f"/var/log/libvirt/qemu/{vm}.log").read_text(errors="replace")
    except OSError:
        return None
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: starting up", text, re.M)
    if not stamps:
        return None
    return dt.datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc).timestamp()


def domain_facts(vm: str) -> dict[str, str]:
    """What libvirt runs, for the report: machine type, CPU, devices."""
    from lxml import etree
    xml = sh(["virsh", "-c", URI, "dumpxml", vm], check=False).stdout
    if not xml.strip():
        return {}
    root = etree.fromstring(xml.encode())
    cpu = root.find("cpu")
    cpu_text = "libvirt's default" if cpu is None else " ".join(
        part for part in (cpu.get("mode", ""), cpu.findtext("model") or "") if part) or "custom"
    counts: dict[str, int] = {}
    for device in root.find("devices"):
        if isinstance(device.tag, str) and device.tag != "emulator":
            kind = device.tag if device.tag != "controller" else f"controller {device.get('type')}"
            counts[kind] = counts.get(kind, 0) + 1
    devices = ", ".join(f"{kind}" + (f" ×{n}" if n > 1 else "") for kind, n in sorted(counts.items()))
    return {"machine": root.find("os/type").get("machine", "?"), "CPU": cpu_text, "devices": devices}


def storage_pools() -> dict[str, str]:
    """name -> target path of every libvirt storage pool."""
    pools = {}
    listing = sh(["virsh", "-c", URI, "-q", "pool-list", "--all", "--name"], check=False).stdout
    for name in filter(None, (line.strip() for line in listing.splitlines())):
        xml = sh(["virsh", "-c", URI, "pool-dumpxml", name], check=False).stdout
        found = re.search(r"<path>([^<]*)</path>", xml)
        pools[name] = found.group(1) if found else ""
    return pools


def give_back_base(guest: Guest) -> None:
    """libvirt chowns a backing file to libvirt-qemu at start and never gives it back (docs/debian-guest.md)."""
    try:
        os.chown(guest.disk, 0, 0)
    except OSError:
        pass


# --- the two ways ----------------------------------------------------------------------------

class Bench:
    """Set-up shared by both ways (guest, key, files), the runs, and the teardown of each."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ways = [args.only] if args.only else list(WAYS)
        self.runs: list[Run] = []
        self.nft_json = ""
        self.nft_listing = ""
        self.domains: dict[str, dict[str, str]] = {}
        self.pools_before = set(storage_pools())
        self.pools_removed: set[str] = set()
        self.pool_defined = False
        self.started = time.monotonic()
        self.load_start = os.getloadavg()
        self.load_end = self.load_start
        self.date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        # QEMU runs as libvirt-qemu: every directory on the way to the overlay must be traversable.
        self.workdir = Path(tempfile.mkdtemp(prefix="bprov-", dir="/var/tmp"))
        self.workdir.chmod(0o755)
        self.env = {**os.environ, "DMZCTL_EVENT_LOG": str(self.workdir / "events.log")}
        self.guest = Guest.from_dir(self.guest_dir())
        self.key = self.workdir / "id_ed25519"
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-provision", "-f", str(self.key)])
        self.public_key = self.key.with_suffix(".pub").read_text().strip()

    def guest_dir(self) -> Path:
        found = os.environ.get("DMZCTL_DEBIAN_GUEST")
        if found and (Path(found) / ".complete").exists():
            return Path(found)
        log("building (or finding the cached) Debian guest")
        return Path(sh([str(REPO / "scripts" / "build-debian-guest.sh")], timeout=1800).stdout.strip().splitlines()[-1])

    def dmzctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh([sys.executable, "-m", "dmzctl.cli", *args], check=check, env=self.env)

    # -- preparation (untimed) --

    def prepare(self) -> None:
        self.wipe_virt_install()
        self.wipe_dmzctl(config_known=False)
        if "virt-install" in self.ways:
            source = self.workdir / "bvi.toml"
            source.write_text(firewall_source_config(self.guest))
            batch = json.loads(self.dmzctl("render", "--what", "nft", str(source)).stdout)
            self.nft_json = json.dumps(rename_table(without_backstop(batch), "dmzctl-bvi", VI.table), indent=2) + "\n"
            self.nft_listing = nft_syntax(self.nft_json, self.workdir)
        if "dmzctl" in self.ways:
            config = self.dmzctl_config_path()
            config.write_text(dmzctl_config(self.guest, self.public_key))
            checked = self.dmzctl("validate", str(config), check=False)
            if checked.returncode != 0:
                raise SystemExit("bench_provision: this dmzctl does not accept the provisioning fields of issue 11 "
                                 f"yet ({(checked.stderr or checked.stdout).strip()[:400]}); run with "
                                 "--only virt-install")
            pool_dir = self.workdir / "pool"
            pool_dir.mkdir(mode=0o755)
            sh(["virsh", "-c", URI, "pool-define-as", DZ.pool, "dir", "--target", str(pool_dir)])
            self.pool_defined = True
            sh(["virsh", "-c", URI, "pool-start", DZ.pool])

    def dmzctl_config_path(self) -> Path:
        return self.workdir / f"{DZ.dmz}.toml"

    # -- virt-install --

    def run_virt_install(self, index: int) -> Run:
        run = Run("virt-install", index, load1())
        directory = self.workdir / f"bvi-run{index}"
        directory.mkdir(mode=0o755)
        files = {name: directory / name for name in ("user-data", "meta-data", "network-config")}
        files["user-data"].write_text(user_data(self.public_key))
        files["meta-data"].write_text(meta_data(f"iid-{VI.vm}-{os.getpid()}-{index}"))
        files["network-config"].write_text(network_config())
        xml = directory / f"{VI.network}.xml"
        xml.write_text(network_xml())
        if self.nft_listing:  # what an admin writes: nft syntax, loaded with `nft -f`
            table = directory / f"{VI.table}.nft"
            table.write_text(self.nft_listing)
            load = ("nft -f", ["nft", "-f", str(table)])
        else:
            table = directory / f"{VI.table}.json"
            table.write_text(self.nft_json)
            load = ("nft -j -f", ["nft", "-j", "-f", str(table)])
        overlay = directory / f"{VI.vm}.qcow2"
        timed = Timed(run)
        try:
            timed("virsh net-define", ["virsh", "-c", URI, "net-define", str(xml)])
            timed("virsh net-start", ["virsh", "-c", URI, "net-start", VI.network])
            timed("qemu-img create", qemu_img_argv(self.guest, overlay))
            timed.started(VI.vm, timed("virt-install", virt_install_argv(self.guest, overlay, files)))
            run.firewall = run.command = timed(*load)
            wait_for_ssh(run, timed.t0, self.key, self.args.user, VI.bridge)
            self.domains.setdefault("virt-install", domain_facts(VI.vm))
        except Exception as error:  # noqa: BLE001 - a failed run is reported, the others still run
            run.error = str(error).splitlines()[0][:300]
        finally:
            self.wipe_virt_install()
        return run

    def wipe_virt_install(self) -> None:
        """Remove the virt-install way's objects, by name (only names this benchmark uses)."""
        quiet("virsh", "-c", URI, "destroy", VI.vm)
        quiet("virsh", "-c", URI, "undefine", VI.vm)
        quiet("virsh", "-c", URI, "net-destroy", VI.network)
        quiet("virsh", "-c", URI, "net-undefine", VI.network)
        quiet("nft", "delete", "table", "inet", VI.table)
        for directory in self.workdir.glob("bvi-run*"):
            shutil.rmtree(directory, ignore_errors=True)
        # virt-install defines (and autostarts) a storage pool for each directory holding a disk or its seed
        # that is in no pool yet: the run's directory, and libvirt's scratch directory for the seed ISO.
        for name, path in storage_pools().items():
            if name == DZ.pool:
                continue  # dmzctl's way's own pool, defined by this run for both rounds
            if path.startswith(f"{self.workdir}/") or (path == SCRATCH and name not in self.pools_before):
                quiet("virsh", "-c", URI, "pool-destroy", name)
                quiet("virsh", "-c", URI, "pool-undefine", name)
                quiet("virsh", "-c", URI, "pool-destroy", name)  # had it stayed active, it is transient now
                self.pools_removed.add(f"{name} ({path})")
        for path in (Path(f"/var/log/libvirt/qemu/{VI.vm}.log"),):
            path.unlink(missing_ok=True)
        give_back_base(self.guest)

    # -- dmzctl --

    def run_dmzctl(self, index: int) -> Run:
        run = Run("dmzctl", index, load1())
        timed = Timed(run)
        try:
            run.command = timed("dmzctl up", [sys.executable, "-m", "dmzctl.cli", "up", str(self.dmzctl_config_path())],
                                env=self.env)
            timed.started(DZ.vm, run.command)
            wait_for_ssh(run, timed.t0, self.key, self.args.user, DZ.bridge)
            self.domains.setdefault("dmzctl", domain_facts(DZ.vm))
        except Exception as error:  # noqa: BLE001
            run.error = str(error).splitlines()[0][:300]
        finally:
            self.wipe_dmzctl()
        return run

    def wipe_dmzctl(self, config_known: bool = True) -> None:
        """`dmzctl destroy --delete-volumes --yes` (or `down` where there is no destroy yet), then whatever is
        left of DMZ bdz, by name."""
        config = self.dmzctl_config_path()
        if config_known and config.exists():
            gone = self.dmzctl("destroy", "--delete-volumes", "--yes", str(config), check=False)
            if gone.returncode != 0:
                self.dmzctl("down", "--timeout", "0", str(config), check=False)
        quiet("virsh", "-c", URI, "destroy", DZ.vm)
        quiet("virsh", "-c", URI, "undefine", DZ.vm)
        listing = sh(["virsh", "-c", URI, "-q", "nwfilter-list"], check=False).stdout
        for name in sorted((line.split()[1] for line in listing.splitlines() if len(line.split()) > 1
                            and line.split()[1].startswith(f"dmzctl-{DZ.dmz}-")), key=lambda n: n.count("-")):
            quiet("virsh", "-c", URI, "nwfilter-undefine", name)
        quiet("virsh", "-c", URI, "net-destroy", DZ.network)
        quiet("virsh", "-c", URI, "net-undefine", DZ.network)
        quiet("nft", "delete", "table", "inet", DZ.table)
        volumes = sh(["virsh", "-c", URI, "-q", "vol-list", DZ.pool], check=False)
        for line in volumes.stdout.splitlines() if volumes.returncode == 0 else []:
            if line.split():
                quiet("virsh", "-c", URI, "vol-delete", "--pool", DZ.pool, line.split()[0])
        for path in (Path(f"/var/log/libvirt/qemu/{DZ.vm}.log"), Path(f"/var/log/libvirt/qemu/{DZ.vm}-serial.log")):
            path.unlink(missing_ok=True)
        give_back_base(self.guest)

    # -- the whole run --

    def measure(self) -> None:
        for index in range(1, self.args.runs + 1):
            for way in self.ways:
                log(f"{way}, run {index} of {self.args.runs} (load {load1():.2f})")
                run = self.run_virt_install(index) if way == "virt-install" else self.run_dmzctl(index)
                self.runs.append(run)
                log(f"  {way}: " + (f"failed: {run.error}" if run.error else
                                    f"command {duration(run.command)}, SSH after {duration(run.ssh)}"))
        self.load_end = os.getloadavg()

    def teardown(self) -> None:
        if "virt-install" in self.ways:
            self.wipe_virt_install()
        if "dmzctl" in self.ways:
            self.wipe_dmzctl()
            if self.pool_defined:
                quiet("virsh", "-c", URI, "pool-destroy", DZ.pool)
                quiet("virsh", "-c", URI, "pool-undefine", DZ.pool)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def machine(self) -> list[tuple[str, str]]:
        return machine_rows(self.date, self.load_start, self.load_end, time.monotonic() - self.started)

    def burdens(self) -> dict[str, Burden]:
        return {"virt-install": virt_install_burden(self.guest, self.public_key, self.nft_json, self.nft_listing,
                                                    Path("/var/lib/libvirt/images")),
                "dmzctl": dmzctl_burden(self.guest, self.public_key)}


def machine_rows(date: str, load_start, load_end, seconds: float) -> list[tuple[str, str]]:
    libvirt = tool_version(["virsh", "-c", URI, "version", "--daemon"])
    daemon = sh(["virsh", "-c", URI, "version", "--daemon"], check=False).stdout
    daemon_line = next((line.strip() for line in daemon.splitlines() if "daemon" in line.lower()), libvirt)
    return [("CPU", cpu_model()), ("Cores", str(os.cpu_count())), ("Memory", memory()), ("Kernel", kernel()),
            ("OS", os_name()),
            ("Hardware virtualization", "yes (KVM)" if hardware_virtualization() else "none: guests run under TCG"),
            ("libvirt", daemon_line), ("QEMU", tool_version(["qemu-system-x86_64", "--version"])),
            ("virt-install", tool_version(["virt-install", "--version"])),
            ("dmzctl", revision()), ("Date", date),
            ("Load average (1/5/15 min)", f"at start {load_average(load_start, ' ')}; at end {load_average(load_end, ' ')}"),
            ("Duration", f"{seconds:,.0f} s")]


# --- the report (pure) -----------------------------------------------------------------------

def fmt(seconds: Optional[float]) -> str:
    return duration(seconds, coarse=True)


def way_summary(runs: list[Run], way: str) -> Optional[dict[str, Any]]:
    done = [run for run in runs if run.way == way and not run.error and run.ssh is not None]
    if not done:
        return None
    return {"n": len(done), "failed": sum(1 for run in runs if run.way == way and run.error),
            "total": summary(run.ssh for run in done), "command": summary(run.command for run in done),
            "boot": summary(run.boot_to_ssh for run in done), "lag": summary(run.firewall_lag for run in done),
            "load": summary(run.load for run in done)}


def results_rows(runs: list[Run], ways: list[str]) -> list[list[str]]:
    rows = []
    found = {way: way_summary(runs, way) for way in WAYS}
    for way in WAYS:
        label = "virt-install + nft by hand" if way == "virt-install" else "`dmzctl up`"
        got = found[way]
        if got is None:
            failed = sum(1 for run in runs if run.way == way)
            why = (f"all {failed} runs failed" if failed else
                   NOT_MEASURED if way == "dmzctl" else "not measured in this run")
            rows.append([label, "0", why, "", "", "", "", ""])
            continue
        lag = got["lag"]
        firewall = ("before the VM starts" if lag is None else
                    f"{fmt(lag.median)} after the VM started")
        runs_cell = f"{got['n']}" + (f" (+{got['failed']} failed)" if got["failed"] else "")
        load = got["load"]
        rows.append([label, runs_cell, fmt(got["total"].median), fmt(got["command"].median),
                     fmt(got["boot"].median), f"{fmt(got['total'].min)} / {fmt(got['total'].max)}", firewall,
                     f"{load.min:.2f}–{load.max:.2f}" if load.n > 1 else f"{load.median:.2f}"])
    if found["virt-install"] and found["dmzctl"]:
        cells = [ratio(found["dmzctl"][key].median / found["virt-install"][key].median)
                 for key in ("total", "command", "boot")]
        rows.append(["ratio dmzctl / virt-install (medians)", "", *cells, "", "", ""])
    return rows


def per_run_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for run in runs:
        if run.error:
            rows.append([run.way, str(run.index), f"failed: {run.error}", "", "", "", "", "", f"{run.load:.2f}"])
            continue
        lag = "before start" if run.firewall_lag is None else f"+{fmt(run.firewall_lag)}"
        banner = fmt(None if run.banner is None else run.banner - run.vm_started)
        rows.append([run.way, str(run.index), fmt(run.command), fmt(run.vm_started), lag, banner,
                     fmt(run.boot_to_ssh), fmt(run.ssh), f"{run.load:.2f}"])
    return rows


def step_rows(runs: list[Run], way: str) -> list[list[str]]:
    done = [run for run in runs if run.way == way and not run.error]
    labels = list(dict.fromkeys(label for run in done for label in run.steps))
    rows = []
    for label in labels:
        found = summary(run.steps.get(label) for run in done)
        rows.append([f"`{label}`", f"{fmt(found.min)} / {fmt(found.median)} / {fmt(found.max)}"])
    return rows


def burden_table(burdens: dict[str, Burden]) -> tuple[list[str], list[list[str]]]:
    """Files and commands side by side: count of each, and the lines of each file."""
    header = ["", "virt-install + nft by hand", "dmzctl"]
    rows = []
    for way, column in (("virt-install", 1), ("dmzctl", 2)):
        for name, text in burdens[way].files.items():
            cells = [f"file: {name}", "", ""]
            cells[column] = f"{significant_lines(text)} lines" if text else "n/a"
            rows.append(cells)
    for way, column in (("virt-install", 1), ("dmzctl", 2)):
        for label, argv in burdens[way].commands:
            cells = [f"command: `{label}`", "", ""]
            cells[column] = f"{len(argv)} words"
            rows.append(cells)
    for name, text in burdens["virt-install"].reference.items():
        rows.append([f"for reference, not counted: {name}", f"({significant_lines(text)} lines)", ""])
    files = {way: list(b.files.values()) for way, b in burdens.items()}
    rows.append(["**files to write / lines**",
                 f"{len(files['virt-install'])} / {sum(significant_lines(t) for t in files['virt-install'])}",
                 f"{len(files['dmzctl'])} / {sum(significant_lines(t) for t in files['dmzctl'])}"])
    rows.append(["**commands, in an order to remember**", str(len(burdens["virt-install"].commands)),
                 str(len(burdens["dmzctl"].commands))])
    return header, rows


def render_report(runs: list[Run], ways: list[str], machine: list[tuple[str, str]], burdens: dict[str, Burden],
                  runs_asked: int, user: str, domains: Optional[dict[str, dict[str, str]]] = None,
                  leftovers: Optional[list[str]] = None) -> str:
    report = Report()
    report.add("# Provisioning: `dmzctl up` against virt-install and the same firewall by hand",
               "Generated by `scripts/bench_provision.py` (issue 11). From nothing on the host to \"SSH answers\" "
               f"for the same cloud image, key, address and size of VM; median of {runs_asked} run(s) per way, "
               "the ways taking turns in each round. Run it again to refresh; figures are from one run on a "
               "shared machine.")
    report.add("## Machine")
    report.table(["", ""], machine)
    report.add("Other engineers' guests run on this machine at the same time: the load average above and next to "
               "each figure says how busy it was. Figures are wall-clock. Guests run under TCG (no hardware "
               "virtualization), so the boot is far slower than on a KVM host; the control-plane part is not.")
    report.add("## Set-up", SETUP)
    report.add("## Results")
    report.table(["way", "runs", "total (median)", "command (median)", "boot to SSH (median)", "total min / max",
                  "firewall in place", "load 1 min at start"], results_rows(runs, ways), "lrrrrrlr")
    report.add("*total*: from nothing to `ssh ... true` succeeding. *command*: until the last command the user "
               "types returns. *boot to SSH*: from the moment libvirt started the VM's QEMU (the \"starting up\" "
               "line of /var/log/libvirt/qemu/VM.log) to SSH answering. *firewall in place*: for the by-hand way, "
               "when `nft -f` returned, counted from that same moment: the guest runs without its firewall until "
               "then, unless the admin remembers to load the table first. dmzctl applies its table before it "
               "starts the domain (`dmzctl up` never starts a VM without its firewall).")
    if domains:
        report.add("## The domains as libvirt ran them",
                   "Each tool's own defaults, read back with `virsh dumpxml` in the first run of each way. Under "
                   "TCG the machine type and CPU model can move the boot time by seconds.")
        ways_seen = [way for way in WAYS if way in domains]
        keys = list(dict.fromkeys(key for way in ways_seen for key in domains[way]))
        report.table(["", *ways_seen], [[key, *(domains[way].get(key, "") for way in ways_seen)] for key in keys])
    report.add("## Per run")
    report.table(["way", "run", "command", "VM started", "firewall", "banner after start", "boot to SSH", "total",
                  "load 1 min"], per_run_rows(runs), "lrrrrrrrr")
    steps = step_rows(runs, "virt-install")
    if steps:
        report.add("## The by-hand commands, each (min / median / max)")
        report.table(["command", "min / median / max"], steps)
    report.add("## What each way needs from the user", BURDEN_INTRO)
    header, rows = burden_table(burdens)
    report.table(header, rows, "lrr")
    report.add("What the admin must also keep in mind by hand:\n\n" +
               "\n".join(f"- {note}" for note in burdens["virt-install"].notes))
    notes = NOTES.replace("{user}", user)
    if leftovers:
        notes += ("\n- virt-install defined and autostarted a libvirt storage pool for each directory that held a disk "
                  "or its seed ISO and was in no pool yet; an admin keeps them unless they remove them. This run "
                  f"removed {len(leftovers)}: " + ", ".join(f"`{item}`" for item in sorted(leftovers)) + ".")
    report.add("## Notes", notes)
    return report.text()


SETUP = f"""- Guest: the Debian 12 cloud image of `scripts/build-debian-guest.sh` (cloud-init NoCloud, openssh-server,
  nginx; direct kernel boot with its `vmlinuz` and `initrd.img`, `root=/dev/vda console=ttyS0`), {MEMORY_MIB} MiB,
  {VCPUS} vCPU, a qcow2 overlay of {DISK_SIZE} on the shared base image (which is never written), `graphics none`.
- Same ed25519 key (made by this run), same static address {VM_IP} / {VM_IP6} in a routed dual-stack DMZ
  10.221.0.0/24 + fdd0:221::/64 (gateway {GATEWAY4} / {GATEWAY6}, protected LAN {PROTECTED}). Dual-stack
  because an IPv4-only link costs the guest 12 s of networkd waiting (docs/debian-guest.md).
- **virt-install + nft by hand** (names `bvi-...`): the files are written before the clock starts (network
  XML, user-data, meta-data, network-config, and the nft table dmzctl would apply for the same DMZ, from
  `dmzctl render --what nft`, renamed `inet bvi-fw`). Timed: `virsh net-define`, `virsh net-start`,
  `qemu-img create -f qcow2 -b base -F qcow2`, `virt-install --import --cloud-init user-data=...,meta-data=...,
  network-config=... --boot kernel=...,initrd=...,kernel_args=... --network network=...,model=virtio,mac=...
  --graphics none --noautoconsole --virt-type qemu --osinfo detect=on,require=off` (virtinst builds the seed ISO
  with xorrisofs and starts the VM), then `nft -f` of the table: the firewall lands right after virt-install
  returns, the order the usual way implies.
- **dmzctl** (names `bdz...`, storage pool `bdz-bench` in a temporary directory): one TOML file with `image`,
  `disk_size`, `pool`, `[vm.cloud_init] ssh_authorized_keys`, `ip`/`ip6` and `kernel`/`initrd`/`cmdline`,
  then `dmzctl up` as a cold process (dmzctl makes the overlay volume and the seed, the network, the filters and
  the table, then starts the VM).
- "SSH answers": `ssh -i key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=3
  USER@{VM_IP} true` succeeds, from the host (the DMZ's gateway; the table restricts only flows that the DMZ
  starts), bound to the DMZ's bridge (`-o BindInterface`). The host probes sshd's banner every 0.5 s, then
  tries the login every 0.5 s.
- Between runs everything of the way is removed, untimed: domain, overlay or volumes, network, filters, table."""

BURDEN_INTRO = """Counted from the files and commands this benchmark actually uses (lines: not empty, not comments;
commands: words as typed). The firewall is the table dmzctl renders for the same DMZ; this benchmark loads it as
JSON (`nft -j -f`), an admin would write it in nft syntax and load it with `nft -f`, so its size is counted as
`nft list table` prints it once loaded (its sets also hold the host's other subnets, so the count moves a little
with the host). The dmzctl file has 3 lines (`kernel`, `initrd`, `cmdline`) only because this test image boots its
kernel directly; the by-hand way passes the same three to virt-install's `--boot`."""

NOTES = """- The cloud image's default user is `{user}` (Debian's cloud.cfg); both ways give it the key through
  top-level `ssh_authorized_keys`.
- The by-hand way gets no per-NIC anti-spoofing filter: dmzctl also defines libvirt nwfilters for the VM's NIC.
  Its figures include that work.
- This sandbox's PID 1 reaps exited processes ~1.4 s late (HOST-NOTES.md); it affects teardown, which is not timed.
- virtinst 4.1 starts the VM with the seed cdrom and an SMBIOS serial `ds=nocloud`, then redefines the domain
  without them for later boots."""


# --- main --------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"runs per way (default {DEFAULT_RUNS})")
    parser.add_argument("--only", choices=WAYS, help="measure one way only")
    parser.add_argument("--user", default=DEFAULT_USER, help=f"the guest user SSH logs in as (default {DEFAULT_USER})")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks-provision.md",
                        help="where to write the Markdown report (default: docs/benchmarks-provision.md)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_provision: run as root (libvirt's system instance and nftables need it)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("virsh", "virt-install", "qemu-img", "nft", "ssh", "ssh-keygen", "xorrisofs")
               if not shutil.which(tool)]
    if missing:
        print(f"bench_provision: missing {', '.join(missing)} (scripts/setup.sh installs them)", file=sys.stderr)
        return 2
    BENCH_LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(BENCH_LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_provision: another run holds {BENCH_LOCK}", file=sys.stderr)
        return 3
    interrupt_on_signals()
    bench = Bench(args)
    try:
        bench.prepare()
        bench.measure()
        text = render_report(bench.runs, bench.ways, bench.machine(), bench.burdens(), args.runs, args.user,
                             bench.domains, sorted(bench.pools_removed))
    except (KeyboardInterrupt, Interrupted) as stop:
        log(f"interrupted ({stop or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # clean-up must not be cut short
            signal.signal(sig, signal.SIG_IGN)
        try:
            bench.teardown()
        finally:
            BENCH_LOCK.unlink(missing_ok=True)
            lock.close()
    publish(text, args.output)
    return 0 if all(not run.error for run in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
