"""Lifecycle against the real libvirtd, real nftables and the real tiny guest.

Each test owns a DMZ whose names start with `lc` and removes everything of it
afterwards, also when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from guest import dmzctl, guest_dir, in_guest, kernel_vm_toml, serial_log, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

GATEWAY = "10.241.0.1/24"
GATEWAY6 = "fdd0:241::1/64"
WEB_IP = "10.241.0.10"


def dmz_toml(name: str, vms: str, extra: str = "") -> str:
    return f"""
[dmz]
name = "{name}"
bridge = "dmz{name}0"
gateway = "{GATEWAY}"
gateway6 = "{GATEWAY6}"
protected = ["10.242.0.0/24", "fdd0:242::/64"]
{extra}
{vms}"""


@pytest.fixture
def make_dmz(tmp_path, monkeypatch):
    """Write a DMZ config; wipe its objects from the host afterwards, whatever happened."""
    created = []
    monkeypatch.setenv("DMZCTL_EVENT_LOG", str(tmp_path / "events.log"))

    def make(name: str, vms: list[tuple[str, str]], extra: str = "", **vm_options):
        guest = guest_dir()
        tables = "".join(kernel_vm_toml(vm, ip, GATEWAY, guest, **vm_options) for vm, ip in vms)
        path = tmp_path / f"{name}.toml"
        path.write_text(dmz_toml(name, tables, extra))
        created.append((name, [vm for vm, _ in vms]))
        wipe(name, [vm for vm, _ in vms])
        return path

    yield make
    for name, vms in created:
        dmzctl("destroy", str(tmp_path / f"{name}.toml"), "--timeout", "0")
        wipe(name, vms)


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-q", *args], capture_output=True, text=True)


def leftovers(dmz: str, vms: list[str]) -> list[str]:
    found = []
    for vm in vms:
        if virsh("dominfo", vm).returncode == 0:
            found.append(f"domain {vm}")
    if virsh("net-info", dmz).returncode == 0:
        found.append(f"network {dmz}")
    filters = virsh("nwfilter-list").stdout
    found += [f"nwfilter {line.split()[1]}" for line in filters.splitlines()
              if len(line.split()) > 1 and line.split()[1].startswith(f"dmzctl-{dmz}-")]
    if subprocess.run(["nft", "list", "table", "inet", f"dmzctl-{dmz}"], capture_output=True).returncode == 0:
        found.append(f"nft table dmzctl-{dmz}")
    return found


def test_up_boots_guest_behind_its_firewall_and_twice_is_a_no_op(make_dmz, tmp_path):
    config = make_dmz("lcup", [("lcup-web", WEB_IP)])
    result = dmzctl("up", str(config), check=True)
    assert "firewall table inet dmzctl-lcup applied" in result.stdout
    wait_for_serial("lcup-web", "DMZGUEST READY")

    # The firewall was in place before the VM started: the event log keeps the order.
    events = (tmp_path / "events.log").read_text().splitlines()
    firewall = next(i for i, line in enumerate(events) if "firewall table dmzctl-lcup applied" in line)
    started = next(i for i, line in enumerate(events) if "vm=lcup-web started" in line)
    assert firewall < started

    # What the policy allows works: the host reaches the guest, the guest reaches
    # the gateway's DNS; what it forbids does not: the host's other ports.
    rc, out = in_guest(WEB_IP, "nslookup dmzctl.invalid 10.241.0.1")
    assert "NXDOMAIN" in out, out  # an answer from the gateway's dnsmasq, not a timeout
    rc, out = in_guest(WEB_IP, "nc -w 2 10.241.0.1 22 </dev/null")
    assert rc != 0, "the guest reached the host's port 22"

    second = dmzctl("up", str(config), check=True)
    assert second.stdout.strip() == "lcup: up: nothing to change"

    assert_console_attaches("lcup-web")
    assert "no VM named 'lcup-nothing'" in dmzctl("console", "lcup-nothing").stderr


def _wait_or_end(pid: int, limit: float) -> int:
    """The child's wait status; SIGTERM after `limit` s (dmzctl console must end virsh then), SIGKILL
    after as long again, so that a hung console never hangs the suite."""
    import signal

    deadline = time.monotonic() + limit
    sent = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline and sent is None:
            os.kill(pid, signal.SIGTERM)
            sent = signal.SIGTERM
            deadline = time.monotonic() + limit
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def assert_console_attaches(vm: str) -> None:
    """`dmzctl console` attaches to the serial console, as virsh console does; Ctrl+] leaves."""
    import os
    import pty
    import select
    import sys

    from guest import ROOT

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "dmzctl.cli", "console", vm])
    seen = b""
    deadline = time.monotonic() + 60
    while b"Escape character" not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    os.write(fd, b"\x1d")  # Ctrl+]
    status = _wait_or_end(pid, 15)
    os.close(fd)
    assert f"Connected to domain '{vm}'".encode() in seen, seen
    assert os.waitstatus_to_exitcode(status) == 0


def test_status_reports_each_state_truthfully(make_dmz):
    config = make_dmz("lcst", [("lcst-web", "10.241.0.20")])
    absent = dmzctl("status", str(config), "--json")
    assert absent.returncode == 1
    report = json.loads(absent.stdout)[0]
    assert report["network"] == "absent" and report["firewall"] == "absent" and not report["ok"]

    dmzctl("up", str(config), check=True)
    up = dmzctl("status", str(config), "--json")
    assert up.returncode == 0, up.stdout
    report = json.loads(up.stdout)[0]
    assert report["ok"] and report["network"] == "active" and report["firewall"] == "in sync"
    assert report["vms"][0]["state"] == "running" and "10.241.0.20" in report["vms"][0]["configured"]
    assert dmzctl("status", str(config)).stdout.startswith("DMZ lcst")

    # One chain flushed behind dmzctl's back: drifted, not "in sync".
    subprocess.run(["nft", "flush", "chain", "inet", "dmzctl-lcst", "from_dmz"], check=True)
    drifted = json.loads(dmzctl("status", str(config), "--json").stdout)[0]
    assert drifted["firewall"] == "drifted" and not drifted["ok"]

    subprocess.run(["nft", "delete", "table", "inet", "dmzctl-lcst"], check=True)
    gone = dmzctl("status", str(config), "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout)[0]["firewall"] == "absent"

    dmzctl("up", str(config), check=True)
    dmzctl("kill", str(config), check=True)
    killed = json.loads(dmzctl("status", str(config), "--json").stdout)[0]
    assert killed["vms"][0]["state"] == "shut off" and not killed["ok"]


def test_down_powers_off_by_acpi_and_keeps_the_definitions_destroy_removes_them(make_dmz):
    config = make_dmz("lcdn", [("lcdn-web", "10.241.0.30"), ("lcdn-db", "10.241.0.31")])
    dmzctl("up", str(config), check=True)
    wait_for_serial("lcdn-web", "DMZGUEST READY")
    wait_for_serial("lcdn-db", "DMZGUEST READY")
    result = dmzctl("down", str(config), check=True)
    assert "VM lcdn-web powered off" in result.stdout, result.stdout  # not destroyed after the timeout
    assert "DMZGUEST POWEROFF" in serial_log("lcdn-web").read_text()
    assert "network lcdn stopped (still defined)" in result.stdout, result.stdout
    # Halted, as virt-manager's shutdown: listed "Shut off", network inactive, filters kept, no table.
    assert virsh("domstate", "lcdn-web").stdout.strip() == "shut off"
    assert "Active:         no" in virsh("net-info", "lcdn").stdout
    assert sorted(leftovers("lcdn", ["lcdn-web", "lcdn-db"])) == sorted(
        ["domain lcdn-web", "domain lcdn-db", "network lcdn"] + [
            f"nwfilter dmzctl-lcdn-{vm}" for vm in ("lcdn-web", "lcdn-db")])
    for table in ("dmzctl-lcdn", "dmzctl-lcdn.backstop"):
        assert subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode != 0
    status = dmzctl("status", str(config), "--json")
    report = json.loads(status.stdout)[0]
    assert status.returncode == 1 and report["verdict"] == "DOWN (defined, not running)", status.stdout
    assert [vm["state"] for vm in report["vms"]] == ["shut off", "shut off"]
    check = json.loads(dmzctl("check", str(config), "--json").stdout)["dmzs"][0]
    assert [d["kind"] for d in check["differences"]] == ["dmz-down"], check
    again = dmzctl("down", str(config), check=True)
    assert "network lcdn stopped" not in again.stdout and "dmzctl-lcdn removed" not in again.stdout, again.stdout
    # Up again from the kept definitions: nothing defined anew.
    up = dmzctl("up", str(config), check=True)
    assert "defined" not in up.stdout and "VM lcdn-web started" in up.stdout, up.stdout
    # destroy --vm: that VM's definition and filters go; the rest stays up.
    one = dmzctl("destroy", str(config), "--vm", "lcdn-db", "--timeout", "0", check=True)
    assert "VM lcdn-db undefined" in one.stdout and "nwfilter dmzctl-lcdn-lcdn-db removed" in one.stdout, one.stdout
    assert virsh("dominfo", "lcdn-db").returncode != 0 and virsh("domstate", "lcdn-web").stdout.strip() == "running"
    # destroy: every definition goes; the user's disks (here the guest's kernel) are not touched.
    gone = dmzctl("destroy", str(config), "--timeout", "0", check=True)
    assert "network lcdn removed" in gone.stdout, gone.stdout
    assert leftovers("lcdn", ["lcdn-web", "lcdn-db"]) == []
    assert (guest_dir() / "kernel").exists() and (guest_dir() / "initrd.img").exists()


def test_guest_ignoring_acpi_is_destroyed_after_its_timeout(make_dmz):
    config = make_dmz("lcig", [("lcig-web", "10.241.0.40")], extra_cmdline="dmz.acpi=ignore",
                      shutdown_timeout=3)
    dmzctl("up", str(config), check=True)
    wait_for_serial("lcig-web", "DMZGUEST READY")
    began = time.monotonic()
    result = dmzctl("down", str(config), check=True)
    elapsed = time.monotonic() - began
    assert "did not power off within its timeout: destroyed" in result.stdout, result.stdout
    assert "DMZGUEST ACPI-IGNORED" in serial_log("lcig-web").read_text()
    assert elapsed >= 3, "destroyed before its 3 s of ACPI grace were up"
    assert virsh("domstate", "lcig-web").stdout.strip() == "shut off"


def test_refused_firewall_means_no_vm_and_nothing_left(make_dmz):
    config = make_dmz("lcfw", [("lcfw-web", "10.241.0.50")])
    # A table of the same name owned by another process (nft's "owner" flag):
    # the kernel refuses dmzctl's transaction with EPERM, a real refusal.
    holder = subprocess.Popen(["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        holder.stdin.write("add table inet dmzctl-lcfw { flags owner; }\n")
        holder.stdin.flush()
        deadline = time.monotonic() + 10
        while subprocess.run(["nft", "list", "table", "inet", "dmzctl-lcfw"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "could not create the owner table"
            time.sleep(0.05)
        result = dmzctl("up", str(config))
        assert result.returncode == 5, result.stdout + result.stderr
        assert "nftables refused the firewall batch" in result.stderr
        assert "Traceback" not in result.stderr
        assert virsh("dominfo", "lcfw-web").returncode != 0, "a VM was defined without its firewall"
        assert [x for x in leftovers("lcfw", ["lcfw-web"]) if not x.startswith("nft")] == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_foreign_objects_of_the_same_name_are_refused_and_left_intact(make_dmz, tmp_path):
    config = make_dmz("lcfo", [("lcfo-web", "10.241.0.60")])
    foreign = tmp_path / "foreign-net.xml"
    foreign.write_text("<network><name>lcfo</name><bridge name='lcfoforeign0'/></network>")
    assert virsh("net-define", str(foreign)).returncode == 0
    try:
        result = dmzctl("up", str(config))
        assert result.returncode == 4, result.stderr
        assert "network 'lcfo' already exists and is not dmzctl's" in result.stderr
        assert "lcfoforeign0" in virsh("net-dumpxml", "lcfo").stdout
        assert virsh("dominfo", "lcfo-web").returncode != 0
        assert subprocess.run(["nft", "list", "table", "inet", "dmzctl-lcfo"], capture_output=True).returncode != 0
    finally:
        virsh("net-undefine", "lcfo")

    domain = tmp_path / "foreign-dom.xml"
    domain.write_text("<domain type='qemu'><name>lcfo-web</name><memory unit='MiB'>64</memory>"
                      "<os><type>hvm</type></os></domain>")
    assert virsh("define", str(domain)).returncode == 0
    try:
        result = dmzctl("up", str(config))
        assert result.returncode == 4, result.stderr
        assert "domain 'lcfo-web' already exists and is not dmzctl's" in result.stderr
        assert "<memory unit='KiB'>65536</memory>" in virsh("dumpxml", "lcfo-web").stdout
        assert virsh("net-info", "lcfo").returncode != 0, "the check must come before any change"
    finally:
        virsh("undefine", "lcfo-web")


def test_missing_kernel_is_one_line_and_changes_nothing(make_dmz, tmp_path):
    config = make_dmz("lcmk", [("lcmk-web", "10.241.0.70")])
    config.write_text(config.read_text().replace(str(guest_dir() / "kernel"), str(tmp_path / "no-kernel")))
    result = dmzctl("up", str(config))
    assert result.returncode == 3
    assert result.stderr.strip() == f"dmzctl: missing file(s): vm[lcmk-web].kernel {tmp_path / 'no-kernel'}"
    assert leftovers("lcmk", ["lcmk-web"]) == []


def test_changed_vm_is_pending_until_restart_changed(make_dmz):
    config = make_dmz("lcch", [("lcch-web", "10.241.0.80")])
    dmzctl("up", str(config), check=True)
    wait_for_serial("lcch-web", "DMZGUEST READY")
    config.write_text(config.read_text().replace('memory = "128MiB"', 'memory = "144MiB"'))

    pending = dmzctl("up", str(config), check=True)
    assert "VM lcch-web definition updated" in pending.stdout
    assert "PENDING: VM lcch-web" in pending.stdout
    assert "<currentMemory unit='KiB'>131072</currentMemory>" in virsh("dumpxml", "lcch-web").stdout
    status = json.loads(dmzctl("status", str(config), "--json").stdout)[0]
    # Status says what check says (state.diff): the new definition is in place, the VM runs the old one.
    assert not status["ok"] and "runs an older definition" in status["vms"][0]["problems"][0]

    restarted = dmzctl("up", str(config), "--restart-changed", check=True)
    assert "VM lcch-web powered off" in restarted.stdout and "VM lcch-web started" in restarted.stdout
    assert "<currentMemory unit='KiB'>147456</currentMemory>" in virsh("dumpxml", "lcch-web").stdout
    assert dmzctl("status", str(config)).returncode == 0


def test_firewall_down_refuses_while_vms_run_and_restart_keeps_the_firewall(make_dmz):
    config = make_dmz("lcfd", [("lcfd-web", "10.241.0.90")])
    dmzctl("up", str(config), check=True)
    refused = dmzctl("firewall", "down", str(config))
    assert refused.returncode == 1
    assert "VM lcfd-web is running; removing the firewall would leave it unprotected" in refused.stderr
    assert subprocess.run(["nft", "list", "table", "inet", "dmzctl-lcfd"], capture_output=True).returncode == 0

    wait_for_serial("lcfd-web", "DMZGUEST READY")
    restarted = dmzctl("restart", str(config), check=True)
    assert "VM lcfd-web powered off" in restarted.stdout and "VM lcfd-web started" in restarted.stdout
    assert "firewall" not in restarted.stdout  # the table stayed as it was
    assert dmzctl("status", str(config)).returncode == 0

    forced = dmzctl("firewall", "down", str(config), "--force", check=True)
    assert "no longer protected" in forced.stderr
    assert subprocess.run(["nft", "list", "table", "inet", "dmzctl-lcfd"], capture_output=True).returncode != 0
    assert "table inet dmzctl-lcfd" in dmzctl("firewall", "up", str(config), check=True).stdout
    assert dmzctl("firewall", "show", str(config), check=True).stdout.startswith("table inet dmzctl-lcfd")


def test_two_runs_on_one_dmz_do_not_interleave(make_dmz, tmp_path, monkeypatch):
    import threading

    from dmzctl.host.lock import dmz_lock

    config = make_dmz("lclk", [])
    released = threading.Event()

    def hold():
        with dmz_lock(tmp_path / "run", "lclk"):
            time.sleep(2)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.3)
    result = dmzctl("up", str(config), env={"DMZCTL_RUN_DIR": str(tmp_path / "run")}, check=True)
    holder.join()
    assert "lclk: waiting for another dmzctl run on this DMZ" in result.stdout
    assert released.is_set()


def test_another_dmz_coming_and_going_leaves_this_dmz_s_filters_alone(make_dmz, tmp_path):
    """No VM filter lists the host's addresses (the backstop table drops new flows to the host
    whatever its address): another DMZ's gateway, a new host address, redefines none of this DMZ's
    filters, which libvirt would re-instantiate one command at a time. This DMZ's table follows the
    new subnet, and the backstop drops new flows to the new gateway with no change at all."""
    config = make_dmz("lcnf", [("lcnf-web", "10.241.0.60")])
    dmzctl("up", str(config), check=True)
    before = virsh("nwfilter-dumpxml", "dmzctl-lcnf-lcnf-web").stdout
    backstop = subprocess.run(["nft", "list", "table", "inet", "dmzctl-lcnf.backstop"], capture_output=True,
                              text=True, check=True).stdout
    other = tmp_path / "lcnf2.toml"
    other.write_text('[dmz]\nname = "lcnf2"\ngateway = "10.248.0.1/24"\nprotected = ["10.248.128.0/24"]\n')
    wipe("lcnf2", [])
    try:
        up = dmzctl("up", str(other), check=True)
        assert "firewall table inet dmzctl-lcnf of DMZ lcnf refreshed" in up.stdout, up.stdout
        assert "nwfilter dmzctl-lcnf" not in up.stdout, up.stdout
        assert virsh("nwfilter-dumpxml", "dmzctl-lcnf-lcnf-web").stdout == before
        assert subprocess.run(["nft", "list", "table", "inet", "dmzctl-lcnf.backstop"], capture_output=True,
                              text=True, check=True).stdout == backstop
        assert dmzctl("status", str(config)).returncode == 0, dmzctl("status", str(config)).stdout
        gone = dmzctl("destroy", str(other), check=True)
        assert "nwfilter dmzctl-lcnf" not in gone.stdout, gone.stdout
        assert virsh("nwfilter-dumpxml", "dmzctl-lcnf-lcnf-web").stdout == before
    finally:
        dmzctl("destroy", str(other), "--timeout", "0")
        wipe("lcnf2", [])


def test_vms_start_together_and_one_failed_start_undoes_them_all(make_dmz, tmp_path):
    """up starts a DMZ's VMs concurrently; when one start fails, the others are stopped again, and
    everything this run made goes (fail closed, nothing half-up)."""
    config = make_dmz("lcpa", [("lcpa-ok", "10.241.0.70"), ("lcpa-bad", "10.241.0.71")])
    hidden = tmp_path / "private"  # QEMU (user libvirt-qemu) cannot enter a 0700 directory
    hidden.mkdir(mode=0o700)
    for name in ("kernel", "initrd.img"):
        shutil.copyfile(guest_dir() / name, hidden / name)
    head, ok, bad = config.read_text().split("[[vm]]")
    config.write_text("[[vm]]".join([head, ok, bad.replace(str(guest_dir()), str(hidden))]))
    result = dmzctl("up", str(config))
    assert result.returncode != 0, result.stdout
    assert "lcpa: starting lcpa-ok" in result.stdout and "lcpa: starting lcpa-bad" in result.stdout, result.stdout
    assert "Permission denied" in result.stderr + result.stdout, result.stderr
    assert "undone: VM lcpa-ok start" in result.stdout, result.stdout
    assert leftovers("lcpa", ["lcpa-ok", "lcpa-bad"]) == []
