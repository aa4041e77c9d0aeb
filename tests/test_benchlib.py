"""scripts/benchlib.py, the benchmarks' shared mechanics: formatting, statistics, tables, timers.

Pure: no host, no clock assertions (a timer is only checked to measure something, never how fast).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchlib  # noqa: E402
from benchlib import (Probe, Report, Stopwatch, Tally, duration, load_average, median, median_range,  # noqa: E402
                      ratio, repeat, spread, summary, table)


@pytest.mark.parametrize("seconds, coarse, shown", [
    (None, False, "n/a"),
    (0.00072, False, "0.7 ms"),
    (0.0185, False, "18.5 ms"),
    (0.3384, False, "338.4 ms"),
    (0.3384, True, "338 ms"),  # the lifecycle report's style: whole ms from 10 ms
    (0.0029, True, "2.9 ms"),
    (-0.0011, True, "-1.1 ms"),  # an observer can see a stop a hair before the waiter
    (2.913, False, "2.91 s"),
    (82.71, True, "82.71 s"),
    (6692.4, False, "6,692 s"),
])
def test_duration(seconds, coarse, shown):
    assert duration(seconds, coarse=coarse) == shown


def test_summary_and_median_leave_out_missing_values():
    assert summary([3.0, None, 1.0, 2.0]) == (1.0, 2.0, 3.0, 3)
    assert summary([None, None]) is None and summary([]) is None
    assert median([1.0, None, 4.0]) == 2.5
    assert median([None]) is None


def test_spread_is_min_median_max():
    assert spread([0.003, 0.001, None, 0.002]) == "1.0 ms / 2.0 ms / 3.0 ms"
    assert spread([0.3384, 1.5, 0.0007], lambda s: duration(s, coarse=True)) == "0.7 ms / 338 ms / 1.50 s"
    assert spread([]) == "n/a"
    assert spread([None], empty="–") == "–"


def test_median_range_shows_the_range_only_with_more_than_one_run():
    kpps = lambda v: f"{v / 1e3:.1f}"  # noqa: E731
    assert median_range([88500.0], kpps) == "88.5"
    assert median_range([81300.0, 95700.0, 88500.0], kpps) == "88.5 (81.3–95.7)"


@pytest.mark.parametrize("value, shown", [
    (1.0, "1.00"), (0.7, "0.70"), (0.063, "0.063"), (0.0053, "0.0053"), (0.00038, "0.00038"),
    (0.000021, "0.000021"), (14.72, "14.72"), (0.0, "0.00"),
])
def test_ratio_never_in_e_notation(value, shown):
    assert ratio(value) == shown


def test_load_average_given_or_now():
    assert load_average((4.3, 4.08, 3.08)) == "4.30 / 4.08 / 3.08"
    assert load_average((4.3, 4.08, 3.08), " ") == "4.30 4.08 3.08"
    assert len(load_average().split(" / ")) == 3


def test_table_header_alignment_rows():
    text = table(["N", "firewall", "TCP Gbit/s"], [[1, "none", "9.83"], ["1,000", "dmzctl", 7.3]], align="rlr")
    assert text.splitlines() == [
        "| N | firewall | TCP Gbit/s |",
        "|---:|---|---:|",
        "| 1 | none | 9.83 |",
        "| 1,000 | dmzctl | 7.3 |",
    ]
    assert not text.endswith("\n")


def test_table_defaults_and_empty_cells():
    assert table(["", ""], [("CPU", "AMD EPYC")]).splitlines() == ["| | |", "|---|---|", "| CPU | AMD EPYC |"]
    assert table(["what", "value"], []) == "| what | value |\n|---|---|"


def test_report_blocks_one_blank_line_apart():
    doc = Report()
    doc.add("# Title", "Some text.\n")
    doc.table(["a", "b"], [[1, 2]], align="rr")
    doc.add("- one\n- two")
    assert doc.text() == "# Title\n\nSome text.\n\n| a | b |\n|---:|---:|\n| 1 | 2 |\n\n- one\n- two\n"


def test_stopwatch_and_repeat_measure_something():
    with Stopwatch() as clock:
        sum(range(1000))
    assert clock.seconds >= 0
    with pytest.raises(ZeroDivisionError):
        with Stopwatch() as failed:
            1 / 0
    assert failed.seconds >= 0  # timed although the block raised
    calls = []
    times = repeat(lambda: calls.append(1), 3)
    assert len(times) == 3 and len(calls) == 3 and all(t >= 0 for t in times)


def test_tally_sums_per_label_and_counts_failed_calls():
    tally = Tally()
    assert tally.time("add", lambda a, b: a + b, 1, b=2) == 3
    tally.time("add", lambda: None)
    with pytest.raises(KeyError):
        tally.time("lookup", {}.__getitem__, "missing")
    tally.add("given", 0.5)
    totals, calls = tally.snapshot()
    assert calls == {"add": 2, "lookup": 1, "given": 1}
    assert set(totals) == set(calls) and totals["given"] == 0.5
    tally.reset()
    assert tally.snapshot() == ({}, {})


def test_probe_wraps_named_functions_and_puts_them_back():
    def up(x):
        return build(x) + 1

    module = types.SimpleNamespace(build=lambda x: x * 2)
    build = lambda x: module.build(x)  # noqa: E731  (called through the module, as dmzctl's code is)
    original = module.build
    probe = Probe()
    probe.wrap(module, "build", "build")
    probe.wrap(module, "gone", "gone")  # no such function: reported, nothing wrapped
    assert up(3) == 7 and up(4) == 9
    assert probe.calls == {"build": 2} and probe.totals["build"] >= 0
    assert len(probe.missing) == 1 and probe.missing[0].endswith(".gone")
    probe.restore()
    assert module.build is original
    up(5)
    assert probe.calls == {"build": 2}  # restored: no longer counted


def test_repo_is_the_working_tree():
    assert (benchlib.REPO / "dmzctl" / "__init__.py").is_file()
