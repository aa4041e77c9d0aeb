"""Surviving a reboot, a libvirtd restart and other hands on the firewall (issue 5).

One DMZ `svdmz` with the real test guest `sv-web` (10.251.0.10, fdd0:251::10) serves the
whole module; each test leaves it up. A network namespace `svprot` plays the protected LAN:
a listener answers on TCP 8080 at 10.252.0.2 / fdd0:252::2 (protected) and at 198.18.52.200 /
2001:db8:52::200, routed by the host through the namespace (beyond the host and not private: the
control that proves the path works; the namespace's own link is blocked as a host subnet). Packets go from inside the guest (its command server) only to that namespace and
the host. Everything is removed at the end, also when a test fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guest import ROOT, dmzctl, guest_dir, in_guest, kernel_vm_toml, serial_log, wait_for_serial, wipe

DMZ = "svdmz"
VM = "sv-web"
VM_IP = "10.251.0.10"
GATEWAY = "10.251.0.1/24"
GATEWAY6 = "fdd0:251::1/64"
NETNS = "svprot"
PROTECTED = ["10.252.0.2", "fdd0:252::2"]
CONTROL = ["198.18.52.200", "2001:db8:52::200"]
BEYOND = [("198.18.52.0/24", "10.252.0.2"), ("2001:db8:52::/64", "fdd0:252::2")]
PORT = 8080
TABLE = f"dmzctl-{DMZ}"
MEASURED = Path(os.environ.get("DMZCTL_MEASURE_DIR", "/tmp")) / "dmzctl-survive-measured.json"

LISTENER = r"""
import socket, sys
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    conn, peer = s.accept()
    log.write(f"{conn.getsockname()[0]} {peer[0]}\n")
    conn.sendall(b"SVOK\n")
    conn.close()
"""


def run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def table_exists() -> bool:
    return run("nft", "list", "table", "inet", TABLE, check=False).returncode == 0


def record(key: str, value) -> None:
    """Measured figures for the report, kept across the test modules of one run."""
    data = json.loads(MEASURED.read_text()) if MEASURED.exists() else {}
    data[key] = value
    MEASURED.write_text(json.dumps(data, indent=2))


# --- the protected LAN in a namespace ---------------------------------------

def make_world(log: Path) -> subprocess.Popen:
    remove_world()
    run("ip", "netns", "add", NETNS)
    run("ip", "link", "add", "svp-h", "type", "veth", "peer", "name", "svp-n")
    run("ip", "link", "set", "svp-n", "netns", NETNS)
    run("ip", "addr", "add", "10.252.0.1/24", "dev", "svp-h")
    run("ip", "-6", "addr", "add", "fdd0:252::1/64", "dev", "svp-h", "nodad")
    run("ip", "link", "set", "svp-h", "up")
    inside = ["ip", "netns", "exec", NETNS]
    run(*inside, "ip", "link", "set", "lo", "up")
    for address in ("10.252.0.2/24", "198.18.52.200/32"):
        run(*inside, "ip", "addr", "add", address, "dev", "svp-n")
    for address in ("fdd0:252::2/64", "2001:db8:52::200/128"):
        run(*inside, "ip", "-6", "addr", "add", address, "dev", "svp-n", "nodad")
    run(*inside, "ip", "link", "set", "svp-n", "up")
    run(*inside, "ip", "route", "add", "default", "via", "10.252.0.1")
    run(*inside, "ip", "-6", "route", "add", "default", "via", "fdd0:252::1")
    for prefix, via in BEYOND:
        run("ip", "-6" if ":" in prefix else "-4", "route", "replace", prefix, "via", via)
    listener = subprocess.Popen([*inside, "/usr/bin/python3", "-c", LISTENER, str(log), str(PORT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "listening", listener.stderr.read()
    return listener


def remove_world() -> None:
    for prefix, _via in BEYOND:
        subprocess.run(["ip", "-6" if ":" in prefix else "-4", "route", "del", prefix], capture_output=True)
    subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True)
    subprocess.run(["ip", "link", "del", "svp-h"], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def probe(address: str, attempts: int = 1) -> bool:
    """A TCP connection from inside the guest to the namespace's listener: did it answer?"""
    for attempt in range(attempts):
        rc, out = in_guest(VM_IP, f"nc -w 2 {address} {PORT} </dev/null", timeout=20)
        if rc == 0 and "SVOK" in out:
            return True
        if attempt + 1 < attempts:
            time.sleep(0.5)
    return False


def pin_guest_ipv6() -> None:
    """Keep the guest on its static IPv6 address. Linux also takes a SLAAC address from libvirt's
    router advertisements and prefers it as source; dmzctl's spoof6 nwfilter drops that source
    (only the configured ip6 and link-local pass), so probes would fail for that reason instead."""
    script = ("echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_ra; echo 0 > /proc/sys/net/ipv6/conf/eth0/autoconf; "
              "for a in $(ip -6 addr show dev eth0 | grep dynamic | awk '{print $2}'); "
              "do ip -6 addr del $a dev eth0; done; ip -6 addr show dev eth0 scope global")
    rc, out = in_guest(VM_IP, script)
    assert rc == 0 and "dynamic" not in out and "fdd0:251::10/64" in out, out


def assert_isolated(world) -> None:
    """Controls answer (the path works), protected addresses do not, and nothing reached them."""
    for address in CONTROL:
        assert probe(address, attempts=8), f"control {address} did not answer: the test path is broken"
    for address in PROTECTED:
        assert not probe(address), f"the guest reached protected {address}"
    arrived = [line.split()[0] for line in world["log"].read_text().splitlines()]
    assert not [a for a in arrived if a.removeprefix("::ffff:") in PROTECTED], arrived


# --- dmzctl guard as a child process -------------------------------------------

class GuardProcess:
    """`dmzctl guard CONFIG` started by the test, its output collected, stopped by its pid."""

    def __init__(self, world):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmzctl.cli", "guard", str(world["config"]), "--interval", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, **world["env"]})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.lines) < count:
            assert self.process.poll() is None, "the guard exited:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, f"no {text!r} from the guard:\n" + "\n".join(self.lines)
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            code = self.process.wait(timeout=10)
        self.reader.join(timeout=5)
        return code


def restore_delay(client, seconds: float = 3) -> float:
    """Delete the DMZ's table (this process, through libnftables) and time its return."""
    began = time.monotonic()
    assert client.cmd(f"delete table inet {TABLE}")[0] == 0
    while client.cmd(f"list table inet {TABLE}")[0] != 0:
        assert time.monotonic() - began < seconds, f"the guard did not restore the table within {seconds} s"
        time.sleep(0.002)
    return time.monotonic() - began


# --- the DMZ ----------------------------------------------------------------

def dmz_toml(guest: Path) -> str:
    return f"""
[dmz]
name = "{DMZ}"
bridge = "svbr0"
gateway = "{GATEWAY}"
gateway6 = "{GATEWAY6}"
protected = ["10.252.0.0/25", "fdd0:252::/65"]

{kernel_vm_toml(VM, VM_IP, GATEWAY, guest, ip6="fdd0:251::10", gateway6=GATEWAY6, shutdown_timeout=5)}"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The DMZ up with its guest ready, the protected LAN beside it; all removed afterwards."""
    base = tmp_path_factory.mktemp("survive")
    config = base / f"{DMZ}.toml"
    config.write_text(dmz_toml(guest_dir()))
    events = base / "events.log"
    env = {"DMZCTL_EVENT_LOG": str(events)}
    log = base / "arrived.log"
    log.touch()
    wipe(DMZ, [VM])
    listener = None
    state = {"config": config, "events": events, "env": env, "log": log, "base": base, "guard": None}
    try:
        listener = make_world(log)
        dmzctl("up", str(config), check=True, env=env)
        wait_for_serial(VM, "DMZGUEST READY")
        pin_guest_ipv6()
        assert probe(CONTROL[0], attempts=20), "the guest never reached the control address"
        yield state
    finally:
        if state.get("guard") is not None:
            state["guard"].stop()
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
        dmzctl("destroy", str(config), "--timeout", "0", env=env)
        wipe(DMZ, [VM])
        remove_world()


def events_of(world) -> list[str]:
    return world["events"].read_text().splitlines() if world["events"].exists() else []


@pytest.mark.host
@pytest.mark.guest
def test_table_deleted_or_flushed_check_names_it_fix_restores_nwfilter_holds(world):
    config = str(world["config"])
    began = time.monotonic()
    clean = dmzctl("check", config, env=world["env"])
    check_seconds = time.monotonic() - began
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.splitlines()[-1] == "dmzctl check: 1 DMZ(s), all in sync"
    internal = json.loads(dmzctl("check", config, "--json").stdout)["dmzs"][0]["seconds"]
    record("check_seconds_cli", round(check_seconds, 3))
    record("check_seconds_internal", internal)

    # The table deleted: check names it, and the nwfilter layer alone keeps the LAN out.
    run("nft", "delete", "table", "inet", TABLE)
    drifted = dmzctl("check", config)
    assert drifted.returncode == 1
    assert f"{DMZ}: firewall table inet {TABLE}: missing" in drifted.stdout
    assert drifted.stdout.splitlines()[-1] == f"dmzctl check: 1 DMZ(s), 1 drifted: {DMZ} (1 difference: firewall table missing)"
    assert_isolated(world)
    fixed = dmzctl("check", config, "--fix", env=world["env"])
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"{DMZ}: fixed: firewall table inet {TABLE} applied" in fixed.stdout
    assert fixed.stdout.splitlines()[-1] == f"dmzctl check: 1 DMZ(s), 1 fixed ({DMZ}), all in sync"
    assert dmzctl("check", config).returncode == 0

    # One chain flushed: named as such; isolation holds through the gap.
    run("nft", "flush", "chain", "inet", TABLE, "from_dmz")
    flushed = dmzctl("check", config, "--json")
    assert flushed.returncode == 1
    report = json.loads(flushed.stdout)
    problems = [d["problem"] for d in report["dmzs"][0]["differences"]]
    assert len(problems) == 1 and problems[0].startswith("chain from_dmz flushed (0 of "), problems
    assert report["summary"] == f"dmzctl check: 1 DMZ(s), 1 drifted: {DMZ} (1 difference: firewall chain from_dmz flushed)"
    assert_isolated(world)
    assert dmzctl("check", config, "--fix", env=world["env"]).returncode == 0
    assert dmzctl("check", config).returncode == 0
    assert_isolated(world)


@pytest.mark.host
@pytest.mark.guest
def test_guard_restores_a_deleted_table_within_a_second(world):
    import nftables

    config = str(world["config"])
    if world["guard"] is not None:
        world["guard"].stop()
    guard = world["guard"] = GuardProcess(world)
    guard.wait_for("guard: watching")
    assert "libvirt events" in guard.lines[-1], guard.lines

    client = nftables.Nftables()

    def rules_in(chain: str) -> int:
        rc, out, _ = client.cmd(f"list chain inet {TABLE} {chain}")
        return sum(1 for line in out.splitlines() if "comment" in line) if rc == 0 else 0

    delays = []
    for _ in range(7):
        delays.append(restore_delay(client))
        time.sleep(0.3)
    # Altered rather than removed: a chain flushed.
    began = time.monotonic()
    assert client.cmd(f"flush chain inet {TABLE} from_dmz")[0] == 0
    while rules_in("from_dmz") == 0:
        assert time.monotonic() - began < 3, "the guard did not restore the flushed chain within 3 s"
        time.sleep(0.002)
    flush_delay = time.monotonic() - began

    assert max(delays) < 1.0, delays
    assert flush_delay < 1.0, flush_delay
    record("guard_delete_restore_ms", {"min": round(min(delays) * 1000, 1),
                                       "median": round(statistics.median(delays) * 1000, 1),
                                       "max": round(max(delays) * 1000, 1), "n": len(delays)})
    record("guard_flush_restore_ms", round(flush_delay * 1000, 1))

    # Its own restores do not wake it again: exactly one restore per change, then quiet.
    time.sleep(1.0)
    restored = [line for line in events_of(world) if "guard restored" in line]
    assert len(restored) == len(delays) + 1, restored
    assert f"(missing; 'delete table inet {TABLE}' by " in restored[0], restored[0]
    assert "altered" in restored[-1] and "from_dmz" in restored[-1], restored[-1]
    assert dmzctl("check", config).returncode == 0

    assert guard.stop() == 0, guard.lines
    world["guard"] = None
    assert "guard: stopping (8 restore(s))" in guard.lines
    assert not [line for line in guard.lines if "Traceback" in line]
    assert_isolated(world)


@pytest.mark.host
@pytest.mark.guest
def test_simulated_reboot_brings_everything_back_firewall_first(world, tmp_path):
    config = str(world["config"])
    # What a reboot leaves: nothing running, no table (persistent definitions stay).
    run("virsh", "-q", "destroy", VM)
    run("virsh", "-q", "net-destroy", DMZ)
    run("nft", "delete", "table", "inet", TABLE)
    serial_log(VM).unlink(missing_ok=True)
    assert dmzctl("check", config).returncode == 1

    # The boot path: exactly the unit's ExecStart (it reads /etc/dmzctl; here the config is named).
    units = tmp_path / "units"
    installed = dmzctl("install", "--systemd", "--no-hooks", "--unit-dir", str(units), check=True)
    assert "systemd: not enabled: systemd is not running here" in installed.stdout
    unit = (units / "dmzctl.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(" boot") and "@DMZCTL@" not in unit
    boot_log = tmp_path / "boot-events.log"
    result = subprocess.run(shlex.split(exec_start) + [config], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DMZCTL_EVENT_LOG": str(boot_log)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{DMZ}: network {DMZ} started" in result.stdout

    events = boot_log.read_text().splitlines()
    firewall = next(i for i, line in enumerate(events) if f"firewall table {TABLE} applied" in line)
    started = next(i for i, line in enumerate(events) if f"vm={VM} started" in line)
    assert firewall < started, events
    assert dmzctl("check", config).returncode == 0
    wait_for_serial(VM, "DMZGUEST READY")
    pin_guest_ipv6()
    assert_isolated(world)


# --- libvirt hooks ------------------------------------------------------------

def libvirtd_pid() -> int:
    pids = run("pgrep", "-x", "libvirtd").stdout.split()
    assert len(pids) == 1, pids
    return int(pids[0])


def restart_libvirtd(sig: int) -> float:
    """Stop the running libvirtd by its pid and start it as it was (same environment, cwd).

    Returns the seconds until the new one answers."""
    pid = libvirtd_pid()
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    cwd = os.readlink(f"/proc/{pid}/cwd")
    began = time.monotonic()
    os.kill(pid, sig)
    while Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        except OSError:
            break
        assert time.monotonic() - began < 30, "libvirtd did not stop"
        time.sleep(0.05)
    subprocess.run(["libvirtd", "-d"], env=env, cwd=cwd, check=True)
    while run("virsh", "-c", "qemu:///system", "version", check=False).returncode != 0:
        assert time.monotonic() - began < 60, "libvirtd did not answer after its restart"
        time.sleep(0.1)
    return time.monotonic() - began


@pytest.fixture(scope="module")
def hooks(world):
    """dmzctl's hooks in /etc/libvirt/hooks, and libvirtd killed (SIGKILL) and started again so that
    it runs them, with the DMZ up: that restart is the libvirtd-restart scenario. Afterwards the
    hook files are removed: libvirtd re-reads the .d directories at each call, so that needs no
    second restart."""
    hooks_dir = Path("/etc/libvirt/hooks")
    ours = [hooks_dir / "qemu.d" / "dmzctl", hooks_dir / "network.d" / "dmzctl"]
    present = {p: p.read_text() for p in ours if p.exists()}  # dmzctl's, from an earlier up: put back after
    foreign = [p for p, text in present.items() if "# dmzctl libvirt hook" not in text]
    assert not foreign, f"hook files that are not dmzctl's, not touching them: {foreign}"
    for path in present:
        path.unlink()
    pid = libvirtd_pid()
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    try:
        installed = dmzctl("install", "--no-systemd", "--hooks", check=True)
        assert "looks for hooks only when it starts" in installed.stdout, installed.stdout
        if world["guard"] is not None:  # one left by a test that failed: never two guards at once
            world["guard"].stop()
        guard = world["guard"] = GuardProcess(world)  # it must live through the restart too
        guard.wait_for("guard: watching")
        seconds = restart_libvirtd(signal.SIGKILL)
        record("libvirtd_restart_seconds", round(seconds, 2))
        yield {"restart_seconds": seconds}
    finally:
        removed = dmzctl("install", "--no-systemd", "--uninstall")
        for path in ours:  # whatever the command said, leave nothing of ours
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass
        for path, text in present.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)
        if run("pgrep", "-x", "libvirtd", check=False).returncode != 0:  # never leave the host without it
            subprocess.run(["libvirtd", "-d"], env=env, cwd="/")
        assert removed.returncode == 0, removed.stdout + removed.stderr


@pytest.mark.host
@pytest.mark.guest
def test_libvirtd_killed_and_restarted_keeps_the_dmz_isolated_and_in_sync(world, hooks):
    import nftables

    config = str(world["config"])
    state = run("virsh", "-q", "domstate", VM).stdout.strip()
    assert state == "running", state
    result = dmzctl("check", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_isolated(world)
    rc, _ = in_guest(VM_IP, "nc -w 2 10.251.0.1 22 </dev/null")
    assert rc != 0, "the guest reached the host's port 22"

    # The guard lost its libvirt connection with the old daemon, made a new one, and still guards.
    guard = world["guard"]
    guard.wait_for("the libvirt connection closed")
    guard.wait_for("guard: listening to libvirt events", count=2, timeout=30)
    assert restore_delay(nftables.Nftables()) < 1.0
    assert guard.stop() == 0, guard.lines
    world["guard"] = None
    assert dmzctl("check", config).returncode == 0


@pytest.mark.host
@pytest.mark.guest
def test_virsh_start_without_the_table_is_refused_by_the_hook(world, hooks):
    config = str(world["config"])
    if world["guard"] is not None:  # it would put the table back
        world["guard"].stop()
        world["guard"] = None
    run("virsh", "-q", "destroy", VM)
    run("nft", "delete", "table", "inet", TABLE)
    serial_log(VM).unlink(missing_ok=True)
    began = time.monotonic()
    refused = run("virsh", "start", VM, check=False)
    refused_seconds = time.monotonic() - began
    assert refused.returncode != 0
    assert f"dmzctl: refusing to start {VM} of DMZ {DMZ}: its firewall table inet {TABLE} is absent" \
        in refused.stderr, refused.stderr
    assert run("virsh", "-q", "domstate", VM).stdout.strip() == "shut off"
    record("virsh_start_refused_seconds", round(refused_seconds, 3))

    # A flushed chain is refused too: the table must hold its rules, not just exist.
    dmzctl("firewall", "up", config, check=True, env=world["env"])
    run("nft", "flush", "chain", "inet", TABLE, "forward")
    refused = run("virsh", "start", VM, check=False)
    assert refused.returncode != 0 and "has empty chain(s): forward" in refused.stderr, refused.stderr

    # The network hook: restarting the DMZ network brings the table back, from the config file.
    run("nft", "delete", "table", "inet", TABLE)
    run("virsh", "-q", "net-destroy", DMZ)
    hook_log = Path("/var/log/dmzctl.log")  # libvirtd's environment: the default event log

    def hook_lines():
        text = hook_log.read_text(errors="replace") if hook_log.exists() else ""
        return [line for line in text.splitlines() if f"dmz={DMZ} firewall table {TABLE} applied by the libvirt "
                                                       f"network hook" in line]

    before = len(hook_lines())
    run("virsh", "-q", "net-start", DMZ)
    assert table_exists(), "the network hook did not apply the table"
    lines = hook_lines()
    assert len(lines) == before + 1, lines[-3:]
    record("network_hook_apply_ms", float(lines[-1].rsplit("; ", 1)[1].split(" ms")[0]))

    # With its table back, the same virsh start passes the hook.
    began = time.monotonic()
    run("virsh", "-q", "start", VM)
    record("virsh_start_allowed_seconds", round(time.monotonic() - began, 3))
    result = dmzctl("check", config)
    assert result.returncode == 0, result.stdout
    wait_for_serial(VM, "DMZGUEST READY")
    pin_guest_ipv6()
    assert_isolated(world)


# --- the hook scripts alone (no libvirt): behaviour and run time ---------------

@pytest.mark.host
def test_hook_scripts_judge_fast_and_only_dmzctl_objects(tmp_path):
    """The scripts as `install` writes them, run as libvirt runs them; timed."""
    hooks_dir = tmp_path / "hooks"
    dmzctl("install", "--no-systemd", "--hooks-dir", str(hooks_dir), check=True)
    qemu = hooks_dir / "qemu.d" / "dmzctl"
    network = hooks_dir / "network.d" / "dmzctl"
    assert qemu.read_text().startswith(f"#!{sys.executable} -IS\n")
    name = "svhook"
    table = f"dmzctl-{name}"
    config = tmp_path / f"{name}.toml"
    config.write_text(f'[dmz]\nname = "{name}"\nbridge = "svhookbr0"\ngateway = "10.251.0.1/24"\n'
                      f'protected = ["10.252.0.0/25"]\n')
    ns = "http://dmzctl.org/xmlns/dmzctl/1.0"
    domain = (f"<domain type='qemu'><name>svhook-vm</name><metadata><dmzctl:vm xmlns:dmzctl='{ns}' dmz='{name}' "
              f"config='{config}'/></metadata></domain>")
    net = (f"<hookData><network><name>{name}</name><metadata><dmzctl:network xmlns:dmzctl='{ns}' dmz='{name}' "
           f"config='{config}'/></metadata></network></hookData>")
    env = {**os.environ, "DMZCTL_EVENT_LOG": str(tmp_path / "events.log"), "DMZCTL_RUN_DIR": str(tmp_path / "run")}

    def hook(path, *args, stdin):
        began = time.monotonic()
        result = subprocess.run([str(path), *args], input=stdin, capture_output=True, text=True, env=env,
                                timeout=30)
        return result, (time.monotonic() - began) * 1000

    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    try:
        refused, _ = hook(qemu, "svhook-vm", "prepare", "begin", "-", stdin=domain)
        assert refused.returncode == 1 and f"its firewall table inet {table} is absent" in refused.stderr
        other_op, _ = hook(qemu, "svhook-vm", "release", "end", "-", stdin=domain)
        assert other_op.returncode == 0
        foreign, _ = hook(qemu, "x", "prepare", "begin", "-", stdin="<domain><name>x</name></domain>")
        assert foreign.returncode == 0 and foreign.stderr == ""

        # The network hook applies the table from the config its metadata names...
        times = []
        for _ in range(3):
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
            applied, ms = hook(network, name, "start", "begin", "-", stdin=net)
            assert applied.returncode == 0, applied.stderr
            assert table_of(table), "the network hook did not apply the table"
            times.append(ms)
        record("network_hook_run_ms", {"median": round(statistics.median(times), 1), "max": round(max(times), 1)})
        # ... and then the qemu hook lets the VM start.
        times = []
        for _ in range(5):
            allowed, ms = hook(qemu, "svhook-vm", "prepare", "begin", "-", stdin=domain)
            assert allowed.returncode == 0, allowed.stderr
            times.append(ms)
        record("qemu_hook_run_ms", {"median": round(statistics.median(times), 1), "max": round(max(times), 1)})
        assert statistics.median(times) < 500

        # While a dmzctl run holds the DMZ (the `up` that starts this network), the hook leaves it be.
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
        (tmp_path / "run").mkdir(exist_ok=True)
        with open(tmp_path / "run" / f"{name}.lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            skipped, _ = hook(network, name, "start", "begin", "-", stdin=net)
            assert skipped.returncode == 0 and not table_of(table)
        # A config that is gone: the network starts (exit 0), the event log says why.
        moved = net.replace(str(config), str(tmp_path / "moved.toml"))
        warned, _ = hook(network, name, "start", "begin", "-", stdin=moved)
        assert warned.returncode == 0, warned.stderr
        assert f"its config cannot be used: {tmp_path / 'moved.toml'}: no such file" in warned.stderr
        assert not table_of(table)
    finally:
        for name in (table, f"{table}.backstop"):  # the network hook applied both
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


def table_of(table: str) -> bool:
    return run("nft", "list", "table", "inet", table, check=False).returncode == 0


# --- install ------------------------------------------------------------------

@pytest.mark.host
def test_install_says_what_it_did_and_keeps_the_admins_hooks(tmp_path):
    hooks_dir = tmp_path / "hooks"
    (hooks_dir / "qemu.d").mkdir(parents=True)
    legacy = hooks_dir / "qemu"
    legacy.write_text("#!/bin/sh\nexit 0\n")
    legacy.chmod(0o755)
    theirs = hooks_dir / "qemu.d" / "50-admin"
    theirs.write_text("#!/bin/sh\nexit 0\n")
    theirs.chmod(0o755)
    units = tmp_path / "units"

    first = dmzctl("install", "--hooks-dir", str(hooks_dir), "--unit-dir", str(units), check=True)
    out = first.stdout
    assert "systemd: skipped: systemd does not run this machine (/run/systemd/system is absent)" in out
    assert f"hooks: installed {hooks_dir}/qemu.d/dmzctl" in out
    assert f"hooks: installed {hooks_dir}/network.d/dmzctl" in out
    assert f"kept the admin's qemu hook(s), libvirt runs them too: {legacy}, {theirs}" in out
    assert "is running and looks for hooks only when it starts or reloads" in out
    assert not units.exists()

    again = dmzctl("install", "--hooks-dir", str(hooks_dir), "--unit-dir", str(units), check=True)
    assert "already installed" in again.stdout and "restart" not in again.stdout

    forced = dmzctl("install", "--systemd", "--no-hooks", "--unit-dir", str(units), check=True)
    assert f"systemd: installed {units}/dmzctl.service" in forced.stdout
    unit = (units / "dmzctl.service").read_text()
    guard_unit = (units / "dmzctl-guard.service").read_text()
    for needed in ("Type=oneshot", "RemainAfterExit=yes", "After=network-online.target libvirtd.service",
                   " boot\n", " boot --stop\n", "WantedBy=multi-user.target"):
        assert needed in unit, needed
    assert " guard\n" in guard_unit and "After=dmzctl.service" in guard_unit
    command = unit.split("ExecStart=", 1)[1].split()[0]
    assert Path(command).is_absolute() and os.access(command, os.X_OK), command

    removed = dmzctl("install", "--uninstall", "--systemd", "--hooks-dir", str(hooks_dir), "--unit-dir", str(units),
                     check=True)
    assert f"hooks: removed {hooks_dir}/qemu.d/dmzctl" in removed.stdout
    assert "no restart needed" in removed.stdout
    assert legacy.exists() and theirs.exists()
    assert not (hooks_dir / "network.d").exists()  # ours alone: removed with the hook
    assert not (units / "dmzctl.service").exists()


def test_guard_checks_a_dmz_whose_table_changed_before_the_stale_ones(tmp_path):
    """Pure scheduling: with many DMZs a host-network change makes every table due at once; a DMZ
    whose own table was deleted meanwhile is checked first, one DMZ per turn of the event loop."""
    from dmzctl.ops.guard import Guard, Pending
    from dmzctl.settings import Settings

    guard = Guard([], Settings(), say=lambda _m: None)
    checked = []
    guard.check = lambda name, why: checked.append(name) or True
    guard.check_all = Guard.check_all.__get__(guard)
    guard.targets = {name: None for name in ("a", "b", "c", "d")}
    guard.check_all("host networks changed")
    guard.run_due()
    pending = Pending()
    pending.first["d"] = "delete table inet dmzctl-d"
    guard.schedule_tables(pending, "nft[1]")
    for _ in range(4):
        guard.run_due()
    assert checked == ["a", "d", "b", "c"]
    assert not guard.due and not guard.urgent
