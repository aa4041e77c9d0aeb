"""A VM's serial console through `virsh console`, as a child that never outlives dmzctl.

SIGTERM, SIGHUP and SIGINT are forwarded to the child; when dmzctl ends for any reason,
the child is ended too (one was seen ignoring SIGTERM for over 10 minutes: it gets
SIGKILL after a grace period).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

from ..errors import DmzctlError

GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a child that does not end


def attach(uri: str, name: str) -> int:
    """Run `virsh console NAME` on this terminal; its exit code."""
    virsh = shutil.which("virsh")
    if virsh is None:
        raise DmzctlError("virsh is needed for the console: apt-get install libvirt-clients")
    # virsh keeps the terminal for all three streams: with its stderr anywhere else (a pipe or a pty
    # of dmzctl's, to leave out libvirt's polkit warning) it no longer leaves on Ctrl+] (seen here).
    child = subprocess.Popen([virsh, "-c", uri, "console", name])
    asked_to_end = []

    def forward(signum, _frame):
        asked_to_end.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if asked_to_end and time.monotonic() - asked_to_end[0] > GRACE:
                    child.kill()  # it ignored the signal: dmzctl was asked to end, so is it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        end(child)


def end(child: subprocess.Popen) -> None:
    """End the child: SIGTERM, then SIGKILL after GRACE seconds."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
