"""`dmzctl install`: boot integration (systemd units) and libvirt hooks, and their removal.

Units are installed only where systemd runs the machine (/run/systemd/system),
unless asked for explicitly. Hooks go to /etc/libvirt/hooks/{qemu,network}.d/dmzctl,
beside any hook the admin has; libvirtd reads hooks only when it starts.
Every file written names the interpreter / dmzctl binary that runs this command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..errors import HostError
from ..render.base import shipped_dir
from ..hooks.files import (HOOKS_DIR, SYSTEMD_RUN, Report, _write, install_hooks, restart_note, systemd_running,
                           uninstall_hooks)

UNIT_DIR = Path("/etc/systemd/system")
UNITS = ("dmzctl.service", "dmzctl-guard.service")


def dmzctl_binary() -> list[str]:
    """The command that runs this dmzctl: the `dmzctl` script of this interpreter's environment (what
    scripts/install.sh installs under its prefix, not the PATH link to it), else the script it was
    started as, else `python -m dmzctl.cli`."""
    beside = Path(sys.executable).parent / "dmzctl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    argv0 = Path(sys.argv[0])
    if argv0.name == "dmzctl":
        found = argv0 if "/" in sys.argv[0] else Path(shutil.which(sys.argv[0]) or argv0)
        return [str(found.absolute())]
    return [sys.executable, "-m", "dmzctl.cli"]


def unit_source_dir() -> Path:
    return shipped_dir("systemd")


def render_unit(name: str, binary: list[str]) -> str:
    source = unit_source_dir() / name
    try:
        text = source.read_text()
    except OSError as error:
        raise HostError(f"cannot read the unit template {source}: {error.strerror}") from None
    return text.replace("@DMZCTL@", " ".join(binary))


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
