"""A VM's serial console through `virsh console`, as a child that never outlives dmzctl.

virsh prints libvirt's "Authorization not available. Check if polkit service is
running..." on hosts without polkit (a warning, not an error): that noise is left out,
everything else it says on stderr is passed on. SIGTERM, SIGHUP and SIGINT are
forwarded to the child; when dmzctl ends for any reason, the child is ended too (one
was seen ignoring SIGTERM for over 10 minutes: it gets SIGKILL after a grace period).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time

from ..errors import DmzctlError

NOISE = ("Authorization not available", "polkit")
GRACE = 3.0  # seconds between SIGTERM and SIGKILL for a child that does not end


def _pass_stderr(stream) -> None:
    for line in stream:
        if not any(word in line for word in NOISE):
            sys.stderr.write(line)
            sys.stderr.flush()


def attach(uri: str, name: str) -> int:
    """Run `virsh console NAME` on this terminal; its exit code."""
    virsh = shutil.which("virsh")
    if virsh is None:
        raise DmzctlError("virsh is needed for the console: apt-get install libvirt-clients")
    child = subprocess.Popen([virsh, "-c", uri, "console", name], stderr=subprocess.PIPE, text=True)
    reader = threading.Thread(target=_pass_stderr, args=(child.stderr,), daemon=True)
    reader.start()
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
        reader.join(timeout=1)


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
