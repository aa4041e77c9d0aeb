"""The kernel log, where nft's `log` statements write: through the journal where systemd-journald runs
(it keeps more than the ring buffer), else /dev/kmsg, read without blocking from the start of the
ring buffer. Lines come back as (seconds since the epoch, message)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from ..errors import HostError

KMSG = Path("/dev/kmsg")
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def _boot_epoch() -> float:
    """Epoch seconds at the kernel's timestamp zero: /dev/kmsg's stamps are microseconds of the
    monotonic clock the kernel's printk uses (it does not count suspended time, as CLOCK_MONOTONIC)."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


def _unescape(text: str) -> str:
    # /dev/kmsg writes non-printable bytes as \xNN.
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace") if "\\x" in text else text


def read_kmsg(path: Path = KMSG) -> list[tuple[float, str]]:
    """Every record still in the ring buffer, oldest first (records overwritten while reading are
    skipped: the kernel says so with EPIPE)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise HostError(f"cannot read the kernel log {path}: {error.strerror} (run as root)") from None
    boot = _boot_epoch()
    found = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break  # the end of the buffer: nothing newer yet
            except OSError as error:
                if error.errno == errno.EPIPE:
                    continue
                raise HostError(f"cannot read the kernel log {path}: {error.strerror}") from None
            if not record:
                break
            head, _sep, message = record.decode("utf-8", "replace").partition(";")
            parts = head.split(",")
            if len(parts) < 3 or not parts[2].isdigit():
                continue
            found.append((boot + int(parts[2]) / 1e6, _unescape(message.split("\n", 1)[0])))
    finally:
        os.close(fd)
    return found


def journal_runs() -> bool:
    return JOURNAL_SOCKET.exists() and shutil.which("journalctl") is not None


def read_journal(since: Optional[float] = None, grep: str = "dmzctl ") -> list[tuple[float, str]]:
    """The kernel's messages in the journal (journalctl -k -o json), oldest first."""
    argv = ["journalctl", "-k", "-o", "json", "--no-pager", "-g", grep]
    if since is not None:
        argv += ["--since", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode not in (0, 1):  # 1: nothing matched
        raise HostError(f"journalctl -k failed: {result.stderr.strip().splitlines()[0] if result.stderr else ''}")
    found = []
    for line in result.stdout.splitlines():
        try:
            entry = json.loads(line)
            found.append((int(entry["__REALTIME_TIMESTAMP"]) / 1e6, str(entry["MESSAGE"])))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def read_kernel_log(since: Optional[float] = None, source: str = "auto") -> tuple[str, list[tuple[float, str]]]:
    """(where it was read, lines): the journal where one runs, /dev/kmsg otherwise."""
    if source == "journal" or (source == "auto" and journal_runs()):
        return "the journal (journalctl -k)", read_journal(since)
    return f"the kernel ring buffer ({KMSG})", read_kmsg()
