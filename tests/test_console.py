"""The graphical console: on a UNIX socket that only libvirt hands out, and still usable with
the real viewers (virt-viewer, virt-manager) on a real X server (Xvfb).

Each test owns a DMZ whose names start with `cns` (10.242.0.0/24) and removes everything of it
afterwards; Xvfb and the viewers are started here and ended by PID, also on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from guest import dmzctl, guest_dir, kernel_vm_toml, wait_for_serial, wipe

pytestmark = [pytest.mark.host, pytest.mark.guest]

GATEWAY = "10.242.0.1/24"
VM_IP = "10.242.0.10"
TOOLS = ("Xvfb", "virt-viewer", "virt-manager", "xdotool", "import", "convert", "ss", "setpriv")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def dmz_toml(name: str, vm: str, graphics: str, listen: str | None) -> str:
    table = kernel_vm_toml(vm, VM_IP, GATEWAY, guest_dir())
    table = table.replace('graphics = "none"', f'graphics = "{graphics}"' +
                          (f'\ngraphics_listen = "{listen}"' if listen else ""))
    return f"""
[dmz]
name = "{name}"
bridge = "{name}0"
gateway = "{GATEWAY}"
protected = ["198.51.100.0/24"]

{table}"""


@pytest.fixture
def console_dmz(tmp_path, monkeypatch):
    """Bring up a one-VM DMZ with a graphical console; take it all away afterwards."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/setup.sh installs them)")
    monkeypatch.setenv("DMZCTL_EVENT_LOG", str(tmp_path / "events.log"))
    made = []

    def make(graphics: str, listen: str | None = None, name: str = "cnscon") -> str:
        vm = f"{name}-web"
        path = tmp_path / f"{name}.toml"
        path.write_text(dmz_toml(name, vm, graphics, listen))
        made.append((path, name, vm))
        wipe(name, [vm])
        dmzctl("up", str(path), check=True)
        return vm

    yield make
    for path, name, vm in made:
        dmzctl("destroy", str(path), "--timeout", "0")
        wipe(name, [vm])


@pytest.fixture
def xserver(tmp_path):
    """A private Xvfb; yields the environment viewers run in."""
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1024x768x24",
                             "-nolisten", "tcp"], pass_fds=(write_end,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as pipe:
            display = pipe.readline().strip()
        assert display, "Xvfb did not report a display"
        home = tmp_path / "home"
        home.mkdir()
        # A throwaway home, no session bus: settings stay in memory, nothing of root's is touched.
        yield {**os.environ, "DISPLAY": f":{display}", "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache"), "GSETTINGS_BACKEND": "memory", "NO_AT_BRIDGE": "1"}
    finally:
        stop(xvfb)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def qemu_pid(vm: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm}.pid").read_text())


def tcp_listeners(pid: int) -> list[str]:
    """Local addresses the process listens on over TCP, from ss."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def live_graphics(vm: str) -> etree._Element:
    xml = subprocess.run(["virsh", "dumpxml", vm], capture_output=True, text=True, check=True).stdout
    return etree.fromstring(xml.encode()).find("devices/graphics")


# --- images: ImageMagick converts, pure Python compares -----------------------------------------

def rgb(path: Path) -> tuple[int, int, bytes]:
    data = subprocess.run(["convert", str(path), "-depth", "8", "ppm:-"], capture_output=True, check=True).stdout
    magic, size, _maximum, pixels = data.split(b"\n", 3)
    assert magic == b"P6", magic
    width, height = map(int, size.split())
    return width, height, pixels


def locate(guest: tuple[int, int, bytes], screen: tuple[int, int, bytes]):
    """Where the guest's framebuffer appears 1:1 on the screen: (x, y, differing pixels) or None.

    A row of the guest image that is not one colour is searched exactly; the whole image is
    then compared at that place (a blinking cursor may differ)."""
    gw, gh, g = guest
    sw, sh, s = screen
    rows = [g[r * gw * 3:(r + 1) * gw * 3] for r in range(gh)]
    keys = [r for r in range(gh) if len({rows[r][i:i + 3] for i in range(0, gw * 3, 3)}) > 1]
    for key in keys[:40]:
        start = 0
        while (at := s.find(rows[key], start)) >= 0:
            start = at + 1
            y, offset = divmod(at, sw * 3)
            if offset % 3 or offset // 3 + gw > sw or y - key < 0 or y - key + gh > sh:
                continue
            x, y = offset // 3, y - key
            differ = 0
            for r in range(gh):
                line = s[((y + r) * sw + x) * 3:((y + r) * sw + x + gw) * 3]
                if line != rows[r]:
                    differ += sum(line[i:i + 3] != rows[r][i:i + 3] for i in range(0, gw * 3, 3))
            return x, y, differ
    return None


def text_pixels(image: tuple[int, int, bytes]) -> int:
    """Pixels not of the most common colour (the background)."""
    _w, _h, data = image
    counts: dict[bytes, int] = {}
    for i in range(0, len(data), 3):
        counts[data[i:i + 3]] = counts.get(data[i:i + 3], 0) + 1
    return len(data) // 3 - max(counts.values())


def window_names(env: dict) -> list[str]:
    result = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "."], capture_output=True,
                            text=True, env=env)
    names = []
    for window in result.stdout.split():
        name = subprocess.run(["xdotool", "getwindowname", window], capture_output=True, text=True, env=env)
        names.append(name.stdout.strip())
    return names


def assert_viewer_shows_guest(vm: str, command: list[str], env: dict, shot: Path, title: str) -> None:
    """Start a viewer, wait for its window, and find the guest's own framebuffer on the screen."""
    log = open(shot.with_suffix(".log"), "w")
    viewer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        found, names = None, []
        while time.monotonic() < deadline and viewer.poll() is None:
            names = window_names(env)
            if any(re.fullmatch(title, name) for name in names):
                guest_before = shot.with_name(shot.stem + "-guest.png")
                subprocess.run(["virsh", "screenshot", vm, str(guest_before)], capture_output=True, check=True)
                subprocess.run(["import", "-window", "root", str(shot)], env=env, capture_output=True, check=True)
                guest = rgb(guest_before)
                found = locate(guest, rgb(shot))
                if found is not None and found[2] <= guest[0] * guest[1] // 100:
                    break
            time.sleep(0.5)
        log.flush()
        assert viewer.poll() is None, f"{command[0]} exited {viewer.returncode}: {shot.with_suffix('.log').read_text()}"
        assert any(re.fullmatch(title, name) for name in names), f"no window {title!r}; windows: {names}"
        assert found is not None, f"the guest's framebuffer is nowhere on the screen ({shot})"
        x, y, differ = found
        # The guest shows text (SeaBIOS's banner, its machine UUID), not a blank screen, and the
        # viewer shows it 1:1; only the blinking cursor may differ.
        assert text_pixels(guest) > 1000, f"the guest's screen is blank ({guest_before})"
        assert differ <= guest[0] * guest[1] // 100, f"{differ} pixels differ at {x},{y} ({shot})"
        print(f"{command[0]}: guest framebuffer at {x},{y} of {shot}, {differ} pixels differ")
    finally:
        stop(viewer)
        log.close()


@pytest.mark.parametrize("graphics", ["vnc", "spice"])
def test_viewers_reach_the_console_through_libvirt_only(console_dmz, xserver, tmp_path, graphics):
    vm = console_dmz(graphics)
    wait_for_serial(vm, "DMZGUEST READY")
    pid = qemu_pid(vm)

    # No TCP port at all for this QEMU: the console is a UNIX socket in libvirt's
    # per-domain directory, which only root and libvirt-qemu may enter.
    assert tcp_listeners(pid) == []
    listen = live_graphics(vm).find("listen")
    assert listen.get("type") == "socket"
    path = Path(listen.get("socket"))
    assert path.is_socket() and path.parent.parent == Path("/var/lib/libvirt/qemu")
    assert path.parent.stat().st_mode & 0o007 == 0

    # A local user without libvirt's blessing gets neither the socket nor libvirt.
    probe = subprocess.run(NOBODY + ["/usr/bin/python3", "-c", f"import socket; socket.socket(socket.AF_UNIX)"
                                     f".connect({str(path)!r})"], capture_output=True, text=True)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe
    refused = subprocess.run(NOBODY + ["virsh", "-c", "qemu:///system", "domdisplay", vm], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0, refused.stdout

    # What libvirt's users do: virt-viewer and virt-manager get the socket from libvirt.
    assert_viewer_shows_guest(vm, ["virt-viewer", "--connect", "qemu:///system", "--attach", vm], xserver,
                              tmp_path / f"virt-viewer-{graphics}.png", rf"{re.escape(vm)} \(1\)")
    assert_viewer_shows_guest(vm, ["virt-manager", "--no-fork", "--connect", "qemu:///system",
                                   "--show-domain-console", vm], xserver,
                              tmp_path / f"virt-manager-{graphics}.png", rf"{re.escape(vm)} on QEMU.*")


def test_localhost_listener_when_asked_is_loopback_only(console_dmz):
    vm = console_dmz("vnc", "localhost")
    pid = qemu_pid(vm)
    listeners = tcp_listeners(pid)
    assert listeners and all(address.startswith("127.0.0.1:") for address in listeners), listeners
    port = int(listeners[0].rsplit(":", 1)[1])
    # Why it is not the default: every local user reaches it, no password asked.
    banner = subprocess.run(NOBODY + ["/usr/bin/python3", "-c", f"import socket; s = socket.create_connection("
                                      f"('127.0.0.1', {port}), 5); print(s.recv(12))"],
                            capture_output=True, text=True, timeout=30)
    assert "RFB 003.008" in banner.stdout, banner
    with pytest.raises(OSError):
        socket.create_connection((VM_IP.rsplit(".", 1)[0] + ".1", port), timeout=2).close()
