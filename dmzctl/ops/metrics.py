"""`dmzctl metrics` and `dmzctl guard --metrics`: read each DMZ's state, its table's counters, verify's
last record and the guard's restores from the host, and hand them to dmzctl/metrics (pure).

The guard's restores: the guard keeps them in memory (its endpoint serves them directly) and writes
them to `<run_dir>/guard.json` after each restore, so that `dmzctl metrics` from cron reports them too.
"""

from __future__ import annotations

import ipaddress
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from ..config import DMZ
from ..errors import ConfigError, DmzctlError, HostError
from ..host import nft
from ..host.atomic import write_atomically
from ..host.virt import Virt
from ..metrics import DMZMetrics, GuardInfo, read_counters, registry_of, text
from ..render.nft import table_name
from ..settings import Settings
from ..verify.record import read_record
from .inspect import inspect

TEXTFILE_NAME = "dmzctl.prom"


def dmz_metrics(virt: Virt, dmz: DMZ, settings: Settings, restores: Optional[int] = None) -> DMZMetrics:
    """One DMZ, read once; a host that cannot answer gives read_ok 0 with the reason, not an exception."""
    result = DMZMetrics(dmz=dmz.name, vms_expected=len(dmz.vms), guard_restores=restores)
    try:
        snap = inspect(virt, dmz, settings)
        listing = nft.list_firewall(table_name(dmz))
    except DmzctlError as error:
        result.read_ok, result.error = False, str(error).splitlines()[0]
        return result
    result.in_sync = snap.in_sync
    for difference in snap.differences:
        result.drift[difference.kind] = result.drift.get(difference.kind, 0) + 1
    result.vms_running = sum(1 for info in snap.observed.domains.values()
                             if info is not None and info.owner == dmz.name and info.running)
    result.counters = read_counters(listing) if snap.observed.table.exists else None
    _verify_of(result, settings)
    return result


def _verify_of(result: DMZMetrics, settings: Settings) -> None:
    record = read_record(settings.state_dir, result.dmz)
    if record is None:
        return
    result.verify_ok = bool(record.get("ok"))
    try:
        result.verify_timestamp = datetime.fromisoformat(str(record.get("finished_at"))).timestamp()
    except ValueError:
        result.verify_timestamp = None


# --- the guard's restores ------------------------------------------------------------

def guard_state_path(run_dir: Path) -> Path:
    return Path(run_dir) / "guard.json"


def record_guard(run_dir: Path, restores: dict[str, int]) -> None:
    """The running guard's restores per DMZ, replaced atomically (best effort: never stops the guard)."""
    try:
        write_atomically(guard_state_path(run_dir), json.dumps({"pid": os.getpid(), "restores": restores}) + "\n")
    except HostError:
        pass


def read_guard(run_dir: Path) -> tuple[GuardInfo, dict[str, int]]:
    """Whether a guard runs (its recorded PID is alive and is dmzctl) and its restores per DMZ."""
    try:
        data = json.loads(guard_state_path(run_dir).read_text())
        pid, restores = int(data["pid"]), {str(k): int(v) for k, v in data["restores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return GuardInfo(running=False), {}
    try:
        running = b"dmzctl" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        running = False
    return GuardInfo(running=running), restores


# --- output ----------------------------------------------------------------------------

def gather(dmzs: list[DMZ], settings: Settings, restores: Optional[Callable[[], dict[str, int]]] = None,
           guard: Optional[GuardInfo] = None) -> tuple[list[DMZMetrics], Optional[GuardInfo]]:
    """Every DMZ's metrics with one libvirt connection. restores: the guard's own counts (its endpoint);
    without it, the guard's state file."""
    if restores is None:
        guard, counts = read_guard(settings.run_dir)
    else:
        counts = restores()
    default = 0 if guard is not None and guard.running else None  # a running guard has restored none yet
    with Virt(settings.uri) as virt:
        found = [dmz_metrics(virt, dmz, settings, counts.get(dmz.name, default)) for dmz in dmzs]
    return found, guard


def metrics_text(dmzs: list[DMZ], settings: Settings) -> str:
    return text(*gather(dmzs, settings))


def write_textfile(directory: Path, content: str) -> Path:
    """DIR/dmzctl.prom for node_exporter's textfile collector (it reads *.prom; the rename is atomic)."""
    path = Path(directory) / TEXTFILE_NAME
    write_atomically(path, content)
    return path


# --- the guard's endpoint ----------------------------------------------------------------

def parse_listen(value: str) -> tuple[str, int]:
    """ADDR:PORT on loopback only (127.0.0.0/8, [::1], localhost): one clear line otherwise."""
    where = f"--metrics {value}"
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError([f"{where}: give ADDR:PORT, e.g. 127.0.0.1:9839"])
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError([f"{where}: {host!r} is not an IP address; use 127.0.0.1:PORT or [::1]:PORT"]) from None
    if not address.is_loopback:
        raise ConfigError([f"{where}: the guard serves metrics on loopback only (127.0.0.1 or ::1); "
                           f"let node_exporter or a reverse proxy expose them"])
    return str(address), int(port)


def url_of(listen: tuple[str, int]) -> str:
    host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
    return f"http://{host}:{listen[1]}/metrics"


def serve(listen: tuple[str, int], gather_fn) -> Callable[[], None]:
    """Serve the metrics from gather_fn on each scrape (prometheus-client's HTTP server, a daemon
    thread); returns the function that stops it."""
    from prometheus_client import start_http_server

    try:
        started = start_http_server(listen[1], addr=listen[0], registry=registry_of(gather_fn))
    except OSError as error:
        raise HostError(f"--metrics {listen[0]}:{listen[1]}: cannot listen: {error.strerror or error}") from None
    server = started[0] if isinstance(started, tuple) else None

    def stop() -> None:
        if server is not None:
            server.shutdown()
            server.server_close()

    return stop


def serve_guard(guard) -> Callable[[], None]:
    """The running guard's endpoint: its DMZs as it has them now (SIGHUP re-reads them) and its
    restores in memory, computed on each scrape."""
    def dmzs() -> list[DMZ]:
        return [target.dmz for target in list(guard.targets.values()) if target.dmz is not None]

    stop = serve(guard.metrics, lambda: gather(dmzs(), guard.settings, lambda: dict(guard.restored),
                                               GuardInfo(running=True)))
    guard.say(f"guard: serving metrics on {url_of(guard.metrics)}")
    return stop
