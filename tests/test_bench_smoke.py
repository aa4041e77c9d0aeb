"""Smoke test for scripts/bench_firewall.py: a tiny run, checked for shape, never for speed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_firewall.py"

pytestmark = pytest.mark.host


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Rows (header first, separator dropped) of the first Markdown table under each '## ' heading."""
    tables: dict[str, list[list[str]]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        if section and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(c and set(c) <= set("-: ") for c in cells):  # the separator row
                continue
            tables.setdefault(section, []).append(cells)
    return tables


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    missing = [t for t in ("ip", "nft", "iptables", "iptables-restore", "iperf3") if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing: {', '.join(missing)}")
    output = tmp_path_factory.mktemp("bench") / "bench.md"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--sizes", "1,10", "--runs", "1", "--iperf-time", "1",
         "--throughput-runs", "1", "--output", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script cleans up its namespaces on SIGTERM
        proc.communicate(timeout=60)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    text = output.read_text()
    assert text in stdout  # the table is printed as well as written
    return {"text": text, "pid": proc.pid}


@pytest.fixture
def report(run) -> str:
    return run["text"]


def test_machine_description(report):
    machine = {row[0]: row[1] for row in _tables(report)["Machine"][1:]}
    for key in ("CPU", "Cores", "Memory", "Kernel", "nft", "iptables", "Date", "Load average (1/5/15 min)"):
        assert machine.get(key), key


def test_apply_table(report):
    header, *rows = _tables(report)["1. Apply time"]
    assert header == ["N", "runs a/b/c/d", "(a) dmzctl apply", "(b) iptables per rule", "(c) nft -j -f",
                      "(d) iptables-restore", "a/b", "a/c", "load 1 min"]
    assert [row[0] for row in rows] == ["1", "10"]
    for row in rows:
        assert len(row) == len(header)
        assert row[1] == "1/1/1/1"
        for cell in row[2:6]:  # min / median / max, each with a unit
            assert len(cell.split(" / ")) == 3 and all(v.endswith(("ms", " s")) for v in cell.split(" / "))
        float(row[6]), float(row[7]), float(row[8])


def test_throughput_table(report):
    header, *rows = _tables(report)["2. Per-packet cost"]
    assert header == ["N", "firewall", "rules per packet", "TCP Gbit/s", "TCP vs none", "UDP kpps received",
                      "UDP vs none", "UDP kpps sent", "load 1 min"]
    assert [(row[0], row[1]) for row in rows] == [(n, kind) for n in ("1", "10")
                                                  for kind in ("none", "dmzctl", "iptables")]
    for row in rows:
        assert len(row) == len(header)
        assert float(row[3].split()[0]) > 0 and float(row[5].split()[0]) > 0  # "median (min–max)"
        if row[1] == "none":
            assert row[4] == row[6] == "1.00"
    # the linear rules a forwarded packet meets: 7 per prefix + 50 holes + anti-spoofing
    assert [row[2] for row in rows if row[1] == "iptables"] == ["58", "121"]


def test_size_table(report):
    header, *rows = _tables(report)["3. Size"]
    assert header[:2] == ["N", "dmzctl rules"] and "iptables rules" in header and "dmzctl set elements" in header
    by_n = {row[0]: dict(zip(header, row)) for row in rows}
    assert list(by_n) == ["1", "10"]
    # dmzctl: fixed rules, one set element per prefix (besides the implicit blocks' fixed ones, the
    # private ranges); original: 14 rules per prefix + 2 per hole + 10
    assert by_n["1"]["dmzctl rules"] == by_n["10"]["dmzctl rules"]
    assert [by_n[n]["dmzctl set elements"] for n in ("1", "10")] == ["8", "17"]  # N + the 7 private ranges
    assert [by_n[n]["iptables rules"] for n in ("1", "10")] == ["124", "250"]


def test_no_namespace_left_behind(run):
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    # the script names its namespaces dmzb-<its pid>-...
    assert not [line for line in listing.splitlines() if line.startswith(f"dmzb-{run['pid']}-")]
