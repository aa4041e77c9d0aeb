"""Smoke test for scripts/bench_lifecycle.py: one quick run, checked for shape, never for speed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_lifecycle.py"

pytestmark = [pytest.mark.host, pytest.mark.guest]

SECTIONS = ["Machine", "1. `down` after the guest powered off", "2. `up` control plane (without the guest's boot)",
            "3. `status`", "Notes"]
CELL = re.compile(r"^(n/a|[-\d.]+ (ms|s)) / [-\d.]+ (ms|s) / [-\d.]+ (ms|s)$")  # min / median / max


def _sections(text: str) -> dict[str, list[list[list[str]]]]:
    """The Markdown tables (rows of cells, header first, separator dropped) under each '## ' heading."""
    sections: dict[str, list[list[list[str]]]] = {}
    current = None
    in_table = False
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
            in_table = False
            continue
        if current is None:
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(c and set(c) <= set("-: ") for c in cells):
                continue
            if not in_table:
                sections[current].append([])
                in_table = True
            sections[current][-1].append(cells)
        else:
            in_table = False
    return sections


def _leftovers() -> list[str]:
    found = []
    if subprocess.run(["virsh", "-q", "dominfo", "bl-web"], capture_output=True).returncode == 0:
        found.append("domain bl-web")
    if subprocess.run(["virsh", "-q", "net-info", "bl"], capture_output=True).returncode == 0:
        found.append("network bl")
    filters = subprocess.run(["virsh", "-q", "nwfilter-list"], capture_output=True, text=True).stdout
    found += [line.split()[1] for line in filters.splitlines()
              if len(line.split()) > 1 and line.split()[1].startswith("dmzctl-bl-")]
    if subprocess.run(["nft", "list", "table", "inet", "dmzctl-bl"], capture_output=True).returncode == 0:
        found.append("nft table dmzctl-bl")
    if Path("/sys/class/net/dmzbl0").exists():
        found.append("bridge dmzbl0")
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirt's system instance, nftables)")
    missing = [tool for tool in ("virsh", "nft", "qemu-img", "unshare") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"missing: {', '.join(missing)}")
    output = tmp_path_factory.mktemp("bench-lifecycle") / "bench.md"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--runs", "1", "--output", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script removes what it created on SIGTERM
        proc.communicate(timeout=120)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    text = output.read_text()
    assert text in stdout  # printed as well as written
    return text


def test_sections_in_order(report):
    headings = [line[3:].strip() for line in report.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS


def test_machine_description(report):
    rows = {row[0]: row[1] for row in _sections(report)["Machine"][0][1:]}
    for key in ("CPU", "Cores", "Memory", "Kernel", "libvirt", "QEMU", "Date", "Load average (1/5/15 min)"):
        assert rows.get(key), key


def test_down_section(report):
    section = report.split("## 1.")[1].split("## 2.")[0]
    assert "1.4 s" in section and "PID 1" in section  # the reaping note sits next to the figures
    first, *_ = _sections(report)[SECTIONS[1]]
    header, *rows = first
    assert header[:3] == ["variant", "runs", "return after shut off"]
    assert [row[0] for row in rows] == ["dmzctl down (CLI, event-driven)",
                                        "original's way, cold process (sleep 1 loop)",
                                        "dmzctl `lifecycle.down`, in-process (event-driven)",
                                        "original's way, in-process (sleep 1 loop)"]
    for row in rows:
        assert row[1] == "1"
        for cell in row[2:7]:
            assert CELL.match(cell), cell
    assert "Load average (1/5/15 min) at the start of this section" in section


def test_up_section(report):
    tables = _sections(report)[SECTIONS[2]]
    summary = {row[0]: row[1] for row in tables[0][1:]}
    for key in ("`dmzctl up` (CLI, cold process)", "`lifecycle.up` in-process (open connection)",
                "raw libvirt + libnftables calls in-process (open connection)",
                "second, no-op `dmzctl up` (CLI, cold process)", "second, no-op `lifecycle.up` in-process"):
        assert CELL.match(summary[key]), key
    raw_steps = [row[0] for row in tables[1][1:]]
    assert raw_steps[:3] == ["open connection", "networkDefineXML", "network create (no setAutostart)"]
    assert "domain create" in raw_steps and "nft apply (libnftables json_cmd)" in raw_steps
    breakdown_rows = " ".join(row[0] for row in tables[2][1:])
    for part in ("lifecycle.preflight", "nft.kernel_form", "images.check_disks", "Virt.start_domain"):
        assert part in breakdown_rows, part
    assert len(tables) == 4  # summary, raw steps, first up, no-op up


def test_status_section(report):
    header, *rows = _sections(report)[SECTIONS[3]][0]
    assert header == ["what", "runs", "min / median / max"]
    assert len(rows) == 3 and all(row[1] == "1" and CELL.match(row[2]) for row in rows)


def test_nothing_left_behind(report):
    assert _leftovers() == []
