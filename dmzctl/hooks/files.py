"""dmzctl's libvirt hook files on disk: render, install, check and remove them, beside the admin's.

libvirt >= 6.5 runs every executable in <hooks>/<driver>.d/ (after the legacy single
<hooks>/<driver> script); libvirtd looks for hooks when it starts or reloads (SIGHUP).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import MARKER, script

HOOKS = ("qemu", "network")
DAEMONS = ("libvirtd", "virtqemud", "virtnetworkd")
HOOKS_DIR = Path("/etc/libvirt/hooks")  # libvirt's; Settings.hooks_dir may point elsewhere (tests)
SYSTEMD_RUN = Path("/run/systemd/system")


def systemd_running() -> bool:
    return SYSTEMD_RUN.is_dir()


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def did(self, line: str) -> None:
        self.lines.append(line)


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


def missing_hooks(directory: Path) -> list[str]:
    """The hook files that are absent or not dmzctl's: a dmzctl VM started from virsh or
    virt-manager without its table is then not refused."""
    return [str(directory / f"{kind}.d" / "dmzctl") for kind in HOOKS
            if not _ours(directory / f"{kind}.d" / "dmzctl")]


def ensure_hooks(directory: Path) -> list[str]:
    """Install the hooks when missing or outdated, and make libvirtd read them (SIGHUP): it
    looks for hooks only at its start or reload. Returns what changed, one line each."""
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


