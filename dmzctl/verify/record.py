"""verify's last results, kept: one JSON file per DMZ under the state directory
(`<state_dir>/verify/<dmz>.json`, Settings.state_dir, /var/lib/dmzctl by default), written
atomically after each run. `dmzctl report` shows it; a metrics exporter can read the same file.

The file is Report.to_dict() plus `finished_at` (ISO 8601, UTC) and `dmzctl_version`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..host.atomic import write_atomically


def record_path(state_dir: Path, dmz_name: str) -> Path:
    return Path(state_dir) / "verify" / f"{dmz_name}.json"


def record(report, state_dir: Path, finished_at: Optional[datetime] = None) -> Path:
    """Write the report's results for its DMZ (replacing the previous run's); the file's path."""
    from .. import __version__

    finished_at = finished_at or datetime.now(timezone.utc)
    data = dict(report.to_dict(), finished_at=finished_at.isoformat(timespec="seconds"), dmzctl_version=__version__)
    path = record_path(state_dir, report.dmz)
    write_atomically(path, json.dumps(data, indent=1) + "\n", failure="cannot record verify's results in")
    return path


def read_record(state_dir: Path, dmz_name: str) -> Optional[dict]:
    """The last recorded run of verify for a DMZ; None when there is none (or it cannot be read)."""
    try:
        data = json.loads(record_path(state_dir, dmz_name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
