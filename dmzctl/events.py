"""Start/stop/firewall events for the admin's record: syslog, and a log file as the original kept.

The file is the fallback that always works (containers and hosts without a syslog daemon).
"""

from __future__ import annotations

import os
import syslog
import time
from pathlib import Path

EVENT_LOG = Path(os.environ.get("DMZCTL_EVENT_LOG", "/var/log/dmzctl.log"))


def record(message: str) -> None:
    syslog.openlog("dmzctl", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_NOTICE, message)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        EVENT_LOG.parent.mkdir(parents=True, exist_ok=True)
        with EVENT_LOG.open("a") as log:
            log.write(f"{stamp} dmzctl[{os.getpid()}]: {message}\n")
    except OSError:
        pass  # syslog still has it; an unwritable log file must not stop a shutdown
