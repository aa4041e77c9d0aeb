"""Prometheus metrics of the DMZs, from values read elsewhere (ops/metrics.py reads the host). Pure:
building the families and the text format touches nothing.

Names follow Prometheus' conventions (`dmzctl_<thing>_<unit>_total` for counters); labels stay
low-cardinality: dmz, reason, kind, hole, publish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from .counters import Count, TableCounters, read_counters  # noqa: F401  (the module's interface)


@dataclass
class DMZMetrics:
    """What is known of one DMZ at one moment."""

    dmz: str
    read_ok: bool = True  # False: the host could not be read (error says why); nothing else is known
    error: Optional[str] = None
    in_sync: bool = False
    drift: dict[str, int] = field(default_factory=dict)  # difference kind -> how many
    vms_running: int = 0
    vms_expected: int = 0
    counters: Optional[TableCounters] = None  # None: no table
    verify_ok: Optional[bool] = None  # None: verify never recorded a run
    verify_timestamp: Optional[float] = None  # seconds since the epoch
    guard_restores: Optional[int] = None  # None: no guard has reported


@dataclass
class GuardInfo:
    running: bool = False


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _state_families(dmzs: list[DMZMetrics]) -> list:
    ok = _gauge("dmzctl_dmz_read_ok", "1 when the DMZ's state could be read from the host", ["dmz"])
    in_sync = _gauge("dmzctl_dmz_in_sync", "1 when the live DMZ is as configured (dmzctl check)", ["dmz"])
    drift = _gauge("dmzctl_dmz_drift", "Differences from the config, by kind (dmzctl check)", ["dmz", "kind"])
    running = _gauge("dmzctl_vms_running", "The DMZ's VMs that run", ["dmz"])
    expected = _gauge("dmzctl_vms_expected", "The VMs the DMZ's config names", ["dmz"])
    table = _gauge("dmzctl_table_present", "1 when the DMZ's nft table exists", ["dmz"])
    for m in dmzs:
        ok.add_metric([m.dmz], 1 if m.read_ok else 0)
        if not m.read_ok:
            continue
        in_sync.add_metric([m.dmz], 1 if m.in_sync else 0)
        for kind, count in sorted(m.drift.items()):
            drift.add_metric([m.dmz, kind], count)
        running.add_metric([m.dmz], m.vms_running)
        expected.add_metric([m.dmz], m.vms_expected)
        table.add_metric([m.dmz], 0 if m.counters is None else 1)
    return [ok, in_sync, drift, running, expected, table]


def _counter_pair(name: str, what: str, label: str, dmzs: list[DMZMetrics], pick) -> list:
    packets = CounterMetricFamily(f"dmzctl_{name}_packets", f"Packets {what}", labels=["dmz", label])
    octets = CounterMetricFamily(f"dmzctl_{name}_bytes", f"Bytes {what}", labels=["dmz", label])
    for m in dmzs:
        if m.counters is None:
            continue
        for key, count in sorted(pick(m.counters).items()):
            packets.add_metric([m.dmz, key], count.packets)
            octets.add_metric([m.dmz, key], count.bytes)
    return [packets, octets]


def _verify_and_guard(dmzs: list[DMZMetrics], guard: Optional[GuardInfo]) -> list:
    ok = _gauge("dmzctl_verify_ok", "1 when the last dmzctl verify matched on every probe", ["dmz"])
    when = _gauge("dmzctl_verify_timestamp_seconds", "When the last dmzctl verify finished", ["dmz"])
    restores = CounterMetricFamily("dmzctl_guard_restores", "Tables the guard restored since it started",
                                   labels=["dmz"])
    for m in dmzs:
        if m.verify_ok is not None:
            ok.add_metric([m.dmz], 1 if m.verify_ok else 0)
        if m.verify_timestamp is not None:
            when.add_metric([m.dmz], m.verify_timestamp)
        if m.guard_restores is not None:
            restores.add_metric([m.dmz], m.guard_restores)
    families = [ok, when, restores]
    if guard is not None:
        running = _gauge("dmzctl_guard_running", "1 when dmzctl guard runs", [])
        running.add_metric([], 1 if guard.running else 0)
        families.append(running)
    return families


def families(dmzs: Iterable[DMZMetrics], guard: Optional[GuardInfo] = None) -> list:
    dmzs = list(dmzs)
    return (_state_families(dmzs)
            + _counter_pair("dropped", "the DMZ's table dropped, by reason", "reason", dmzs, lambda c: c.drops)
            + _counter_pair("hole_accepted", "accepted by each hole (dns, allow[N])", "hole", dmzs,
                            lambda c: c.holes)
            + _counter_pair("publish_accepted", "accepted by each counted publish rule", "publish", dmzs,
                            lambda c: c.published)
            + _verify_and_guard(dmzs, guard))


class Collector:
    """A prometheus-client collector that computes the families on each collection (each scrape)."""

    def __init__(self, gather):
        self.gather = gather  # () -> (list[DMZMetrics], Optional[GuardInfo])

    def collect(self):
        dmzs, guard = self.gather()
        yield from families(dmzs, guard)


def registry_of(gather) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(gather))
    return registry


def text(dmzs: Iterable[DMZMetrics], guard: Optional[GuardInfo] = None) -> str:
    """The Prometheus text format."""
    dmzs = list(dmzs)
    return generate_latest(registry_of(lambda: (dmzs, guard))).decode()
