"""Start/stop/firewall events for the admin's record: syslog, and a log file as the original kept.

The file is the fallback that always works (containers and hosts without a syslog daemon).
"""

from __future__ import annotations

import os
import syslog
import time
from pathlib import Path


def record(log_path: Path, message: str) -> None:
    """To syslog, and appended to log_path (Settings.event_log)."""
    syslog.openlog("dmzctl", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_NOTICE, message)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"{stamp} dmzctl[{os.getpid()}]: {message}\n")
    except OSError:
        pass  # syslog still has it; an unwritable log file must not stop a shutdown
