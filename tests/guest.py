"""Helpers for tests that run the tiny test guest under the real libvirtd.

The guest (scripts/build-test-guest.sh) prints DMZGUEST lines to its serial
port and runs a command server on TCP 7777: one line in, its output and
`EXIT <rc>` back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DMZCTL = [sys.executable, "-m", "dmzctl.cli"]


def cached_build(variable: str, script: str, what: str) -> Path:
    """A cached guest build: $variable (set by scripts/test.sh), else built on demand by the script."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    result = subprocess.run([str(ROOT / "scripts" / script)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"building {what} failed:\n{result.stderr[-3000:]}")
    path = result.stdout.strip().splitlines()[-1]
    os.environ[variable] = path
    return Path(path)


def guest_dir() -> Path:
    """The cached tiny guest (kernel + busybox)."""
    return cached_build("DMZCTL_TEST_GUEST", "build-test-guest.sh", "the test guest")


def dmzctl(*args: str, check: bool = False, timeout: float = 300, env: dict | None = None):
    result = subprocess.run(DMZCTL + list(args), capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"dmzctl {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def serial_log(vm: str) -> Path:
    return Path(f"/var/log/libvirt/qemu/{vm}-serial.log")


def wait_for_serial(vm: str, marker: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = serial_log(vm).read_text(errors="replace")
        except OSError:
            text = ""
        if marker in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{vm}: no {marker!r} on the serial console within {timeout} s; log:\n{text}")


def in_guest(address: str, command: str, timeout: float = 30) -> tuple[int, str]:
    """Run a shell command inside the guest; (exit code, output)."""
    with socket.create_connection((address, 7777), timeout=timeout) as conn:
        conn.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode(errors="replace").rstrip("\n").splitlines()
    if not lines or not lines[-1].startswith("EXIT "):
        raise AssertionError(f"command server gave no EXIT line for {command!r}: {lines}")
    return int(lines[-1].split()[1]), "\n".join(lines[:-1])


def kernel_vm_toml(name: str, ip: str, gateway: str, guest: Path, extra_cmdline: str = "",
                   shutdown_timeout: float = 20, ip6: str | None = None, gateway6: str | None = None) -> str:
    """A [[vm]] table booting the test guest with a static address."""
    address, prefix = gateway.split("/")
    cmdline = f"console=ttyS0 quiet cryptomgr.notests dmz.name={name} dmz.ip={ip}/{prefix} dmz.gw={address}"
    if ip6:
        cmdline += f" dmz.ip6={ip6}/64 dmz.gw6={gateway6.split('/')[0]}"
    cmdline = f"{cmdline} {extra_cmdline}".strip()
    lines = [
        "[[vm]]", f'name = "{name}"', 'memory = "128MiB"', f'kernel = "{guest / "kernel"}"',
        f'initrd = "{guest / "initrd.img"}"', f'cmdline = "{cmdline}"', f'ip = "{ip}"',
        'graphics = "none"', f"shutdown_timeout = {shutdown_timeout}", "autostart = false",
    ]
    if ip6:
        lines.append(f'ip6 = "{ip6}"')
    return "\n".join(lines) + "\n"


def wipe(dmz: str, vms: list[str]) -> None:
    """Remove whatever a test's DMZ left, by name; only objects that carry the test's names."""
    for vm in vms:
        subprocess.run(["virsh", "-q", "destroy", vm], capture_output=True)
        subprocess.run(["virsh", "-q", "undefine", vm], capture_output=True)
        try:
            serial_log(vm).unlink()
        except OSError:
            pass
    listing = subprocess.run(["virsh", "-q", "nwfilter-list"], capture_output=True, text=True).stdout
    names = [line.split()[1] for line in listing.splitlines() if len(line.split()) > 1]
    for name in sorted((n for n in names if n.startswith(f"dmzctl-{dmz}-")), key=lambda n: n.count("-")):
        subprocess.run(["virsh", "-q", "nwfilter-undefine", name], capture_output=True)
    subprocess.run(["virsh", "-q", "net-destroy", dmz], capture_output=True)
    subprocess.run(["virsh", "-q", "net-undefine", dmz], capture_output=True)
    for table in (f"dmzctl-{dmz}", f"dmzctl-{dmz}.backstop"):
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
