"""`dmzctl install`: boot integration (systemd units) and libvirt hooks, and their removal.

Units are installed only where systemd runs the machine (/run/systemd/system),
unless asked for explicitly. Hooks go to /etc/libvirt/hooks/{qemu,network}.d/dmzctl,
beside any hook the admin has; libvirtd reads hooks only when it starts.
Every file written names the interpreter / dmzctl binary that runs this command.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import HostError
from .hooks import MARKER, script

HOOKS_DIR = Path("/etc/libvirt/hooks")
UNIT_DIR = Path("/etc/systemd/system")
SYSTEMD_RUN = Path("/run/systemd/system")
UNITS = ("dmzctl.service", "dmzctl-guard.service")
HOOKS = ("qemu", "network")
DAEMONS = ("libvirtd", "virtqemud", "virtnetworkd")


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def did(self, line: str) -> None:
        self.lines.append(line)


def dmzctl_binary() -> list[str]:
    """The command that runs this dmzctl: its script when started as `dmzctl`, else `python -m dmzctl.cli`."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "dmzctl":
        found = argv0 if "/" in sys.argv[0] else Path(shutil.which(sys.argv[0]) or argv0)
        return [str(found.absolute())]
    beside = Path(sys.executable).parent / "dmzctl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "dmzctl.cli"]


def unit_source_dir() -> Path:
    in_tree = Path(__file__).resolve().parents[1] / "systemd"
    if in_tree.is_dir():
        return in_tree
    return Path("/usr/share/dmzctl/systemd")


def systemd_running() -> bool:
    return SYSTEMD_RUN.is_dir()


def render_unit(name: str, binary: list[str]) -> str:
    source = unit_source_dir() / name
    try:
        text = source.read_text()
    except OSError as error:
        raise HostError(f"cannot read the unit template {source}: {error.strerror}") from None
    return text.replace("@DMZCTL@", " ".join(binary))


def render_hook(kind: str, interpreter: str) -> str:
    lines = script(kind).read_text().splitlines(keepends=True)
    flags = lines[0].split()[1:]  # keep the template's interpreter flags (-I, -IS)
    lines[0] = f"#!{' '.join([interpreter] + flags)}\n"
    return "".join(lines)


def _write(path: Path, text: str, mode: int) -> bool:
    """Write atomically; False when the file already holds exactly this."""
    try:
        if path.read_text() == text and (path.stat().st_mode & 0o7777) == mode:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.dmzctl-new")
    temporary.write_text(text)
    temporary.chmod(mode)
    os.replace(temporary, path)
    return True


def running_daemons() -> dict[str, list[int]]:
    """libvirt's daemons by name, from /proc (what `pgrep -x` would find)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        if name in DAEMONS:
            found.setdefault(name, []).append(int(entry.name))
    return {name: sorted(pids) for name, pids in sorted(found.items())}


def hooks_dir() -> Path:
    """Where libvirt looks for hooks; tests point $DMZCTL_HOOKS_DIR elsewhere."""
    return Path(os.environ.get("DMZCTL_HOOKS_DIR") or HOOKS_DIR)


def missing_hooks(directory: Optional[Path] = None) -> list[str]:
    """The hook files that are absent or not dmzctl's: a dmzctl VM started from virsh or
    virt-manager without its table is then not refused."""
    directory = directory or hooks_dir()
    return [str(directory / f"{kind}.d" / "dmzctl") for kind in HOOKS
            if not _ours(directory / f"{kind}.d" / "dmzctl")]


def ensure_hooks(directory: Optional[Path] = None) -> list[str]:
    """Install the hooks when missing or outdated, and make libvirtd read them (SIGHUP): it
    looks for hooks only at its start or reload. Returns what changed, one line each."""
    directory = directory or hooks_dir()
    report = Report()
    if not install_hooks(report, directory):
        return []
    changed = [line for line in report.lines if "installed" in line and "already" not in line]
    if directory == HOOKS_DIR:
        for name, pids in running_daemons().items():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    continue
                changed.append(f"hooks: told {name} (pid {pid}) to read them (SIGHUP)")
    return changed


def install_hooks(report: Report, hooks_dir: Path = HOOKS_DIR, interpreter: Optional[str] = None) -> bool:
    """Returns whether anything changed."""
    interpreter = interpreter or sys.executable
    changed = False
    for kind in HOOKS:
        target = hooks_dir / f"{kind}.d" / "dmzctl"
        if _write(target, render_hook(kind, interpreter), 0o755):
            changed = True
            report.did(f"hooks: installed {target} ({_purpose(kind)})")
        else:
            report.did(f"hooks: {target} already installed")
        others = _other_hooks(hooks_dir, kind)
        if others:
            report.did(f"hooks: kept the admin's {kind} hook(s), libvirt runs them too: {', '.join(others)}")
    return changed


def _purpose(kind: str) -> str:
    return {"qemu": "refuses to start a dmzctl VM whose firewall table is absent",
            "network": "re-applies a DMZ's firewall table when its network starts"}[kind]


def _other_hooks(hooks_dir: Path, kind: str) -> list[str]:
    found = []
    legacy = hooks_dir / kind
    if legacy.is_file():
        found.append(str(legacy))
    directory = hooks_dir / f"{kind}.d"
    if directory.is_dir():
        found += [str(p) for p in sorted(directory.iterdir()) if p.name != "dmzctl" and not p.name.startswith(".")]
    return found


def uninstall_hooks(report: Report, hooks_dir: Path = HOOKS_DIR) -> bool:
    changed = False
    for kind in HOOKS:
        target = hooks_dir / f"{kind}.d" / "dmzctl"
        if not target.exists():
            continue
        if not _ours(target):
            report.did(f"hooks: left {target}: it is not dmzctl's hook")
            continue
        target.unlink()
        changed = True
        report.did(f"hooks: removed {target}")
        try:
            target.parent.rmdir()  # only when nothing else is left in it
        except OSError:
            pass
    return changed


def _ours(path: Path) -> bool:
    try:
        with path.open() as handle:
            handle.readline()
            return handle.readline().startswith(MARKER)
    except OSError:
        return False


def restart_note(report: Report) -> None:
    """libvirtd decides at its start (and on SIGHUP) which drivers have any hook at all; a
    driver that had none then runs none, whatever is added later. A driver that had one
    re-reads <driver>.d/ at every call (libvirt's virHookCall), so removal needs nothing."""
    daemons = running_daemons()
    if daemons:
        which = ", ".join(f"{name} (pid {' '.join(map(str, pids))})" for name, pids in daemons.items())
        how = ("systemctl restart libvirtd" if systemd_running()
               else "restart it, or send it SIGHUP: kill -HUP " + " ".join(str(p) for pids in daemons.values()
                                                                         for p in pids))
        report.did(f"hooks: {which} is running and looks for hooks only when it starts or reloads: "
                   f"restart it for the hooks to take effect ({how})")


def install_units(report: Report, unit_dir: Path = UNIT_DIR, forced: bool = False) -> bool:
    if not systemd_running() and not forced:
        report.did(f"systemd: skipped: systemd does not run this machine ({SYSTEMD_RUN} is absent); "
                   f"the units are in {unit_source_dir()} (dmzctl install --systemd installs them anyway)")
        return False
    binary = dmzctl_binary()
    changed = False
    for name in UNITS:
        target = unit_dir / name
        if _write(target, render_unit(name, binary), 0o644):
            changed = True
            report.did(f"systemd: installed {target} (runs {' '.join(binary)})")
        else:
            report.did(f"systemd: {target} already installed")
    if systemd_running() and shutil.which("systemctl"):
        _systemctl(report, "daemon-reload")
        _systemctl(report, "enable", *UNITS)
        report.did("systemd: enabled dmzctl.service and dmzctl-guard.service: they start at the next boot; "
                   "now: systemctl start dmzctl dmzctl-guard")
    else:
        report.did("systemd: not enabled: systemd is not running here")
    return changed


def uninstall_units(report: Report, unit_dir: Path = UNIT_DIR) -> bool:
    present = [name for name in UNITS if (unit_dir / name).exists()]
    if present and systemd_running() and shutil.which("systemctl"):
        _systemctl(report, "disable", *present)
    changed = False
    for name in present:
        (unit_dir / name).unlink()
        changed = True
        report.did(f"systemd: removed {unit_dir / name}")
    if changed and systemd_running() and shutil.which("systemctl"):
        _systemctl(report, "daemon-reload")
    return changed


def _systemctl(report: Report, *args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise HostError(f"systemctl {' '.join(args)} failed: {result.stderr.strip()}")
    report.did(f"systemd: systemctl {' '.join(args)}")


def install(systemd: Optional[bool], hooks: bool, hooks_dir: Path = HOOKS_DIR, unit_dir: Path = UNIT_DIR,
            remove: bool = False) -> Report:
    """systemd: None = when systemd runs the machine, True = always, False = never."""
    report = Report()
    if systemd is not False:
        if remove:
            uninstall_units(report, unit_dir)
        else:
            install_units(report, unit_dir, forced=bool(systemd))
    else:
        report.did("systemd: skipped (--no-systemd)")
    if hooks:
        if remove:
            if uninstall_hooks(report, hooks_dir):
                report.did("hooks: libvirtd stops running them at once (it re-reads the .d directories "
                           "at every call): no restart needed")
        elif install_hooks(report, hooks_dir):
            restart_note(report)
    else:
        report.did("hooks: skipped (--no-hooks)")
    return report
