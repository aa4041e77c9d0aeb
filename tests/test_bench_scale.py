"""scripts/bench_scale.py's pure parts, and its published figures (issue 14).

The benchmark itself restarts libvirtd and runs ~40 minutes: it is run by hand on a quiet host
(docs/benchmarks-scale.md says how). Here: the configs it writes are valid dmzctl configs, the
plain copies of dmzctl's domains carry libvirt's clean-traffic and nothing of dmzctl's, the report
and the plot come out of the figures, and the committed report is what its committed figures render.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
from lxml import etree

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_scale as bs  # noqa: E402

from dmzctl.config import parse_dmz  # noqa: E402
from dmzctl.desired import build  # noqa: E402
from dmzctl.render.base import to_string  # noqa: E402
from dmzctl.render.domain import HostFacts  # noqa: E402


def test_sizes_grow_and_keep_the_vms_per_dmz():
    assert bs.parse_sizes("1x5,5x5,20x5") == [(1, 5), (5, 5), (20, 5)]
    for bad in ("5x5,1x5", "1x5,5x4", "21x1", "1x6", "five"):
        with pytest.raises(ValueError):
            bs.parse_sizes(bad)


def test_its_configs_are_dmzctl_configs_on_subnets_of_their_own(tmp_path):
    guest = tmp_path / "guest"
    seen = set()
    for index in (0, 19):
        text = bs.dmz_toml(index, 5, guest, 80)
        dmz = parse_dmz(tomllib.loads(text), tmp_path / f"{bs.dmz_name(index)}.toml")
        assert [vm.name for vm in dmz.vms] == [bs.vm_name(index, slot) for slot in range(5)]
        assert str(dmz.subnet).startswith("10.211.") and all(str(n).startswith(("10.212.", "fdd0:212:"))
                                                            for n in dmz.protected4 + dmz.protected6)
        seen.add(dmz.bridge)
    assert len(seen) == 2


def test_plain_copies_carry_clean_traffic_only(tmp_path):
    dmz = parse_dmz(tomllib.loads(bs.dmz_toml(3, 2, tmp_path, 80)), tmp_path / "sc03.toml")
    desired = build(dmz, HostFacts(virt_type_override="qemu"))
    xml = to_string(desired.domains[bs.vm_name(3, 1)])
    plain = etree.fromstring(bs.plain_domain_xml(xml, bs.plain_name(3, 1)).encode())
    assert plain.findtext("name") == "scp-3-1"
    assert plain.find("uuid") is None and plain.find("metadata") is None
    refs = plain.findall("devices/interface/filterref")
    assert [r.get("filter") for r in refs] == ["clean-traffic"]
    assert [(p.get("name"), p.get("value")) for p in refs[0]] == [("IP", "10.211.3.11")]


def test_nwfilter_rules_are_counted_by_their_chains():
    ruleset = [{"rule": {"family": "bridge", "table": "nat", "chain": "I-vnet3-mac"}},
               {"rule": {"family": "bridge", "table": "nat", "chain": "libvirt-I-vnet3"}},
               {"rule": {"family": "ip", "table": "filter", "chain": "FI-vnet3"}},
               {"rule": {"family": "ip", "table": "filter", "chain": "DOCKER"}},
               {"rule": {"family": "inet", "table": "dmzctl-sc00", "chain": "forward"}}]
    assert bs.nwfilter_rule_count(ruleset) == 3


def synthetic() -> tuple[list, list]:
    sizes = []
    for dmzs in (1, 5):
        size = bs.Size(dmzs=dmzs, vms=4, up=5.0 + dmzs, status=0.5, check=0.6, guard_idle_cpu=0.1,
                       guard_churn_cpu=1.5, guard_restore=[0.2, 0.3], nft_rules=50 * dmzs, nft_sets=10 * dmzs,
                       nft_elements=12 * dmzs, nwfilter_rules=40 * 4 * dmzs, libvirt_filters=4 * dmzs + 1,
                       plain_rules=38 * 4 * dmzs, qemu_rss_mib=150.0)
        size.restart_dmzctl = [bs.Restart(0.1, 2.4 * 4 * dmzs, 2.5 * 4 * dmzs, 4 * dmzs)]
        size.restart_plain = [bs.Restart(0.1, 2.3 * 4 * dmzs, 2.4 * 4 * dmzs, 4 * dmzs)]
        sizes.append(size)
    return sizes, [bs.Restart(0.1, 1.0, 1.1, 0)]


def test_the_report_and_the_plot_come_out_of_the_figures(tmp_path):
    sizes, baseline = synthetic()
    before = {"label": "before", "revision": "abc", "sizes": [bs.asdict(s) for s in sizes],
              "baseline": [bs.asdict(r) for r in baseline]}
    text = bs.render_report(sizes, baseline, {"date": "2026-11-30", "revision": "def"}, "after", before)
    assert "## Before and after, in short" in text and "| after |" in text and "| before |" in text
    assert "2.5 s" in text  # 2.5 s per VM: the least-squares slope of the synthetic restarts
    plot = tmp_path / "scale.png"
    bs.draw_plot(sizes, baseline, plot, before, "after")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bs.slope(sizes, "restart_plain") == pytest.approx(2.4)


def test_the_published_report_is_what_its_figures_render(tmp_path):
    """docs/benchmarks-scale.md is rendered from docs/benchmarks-scale.json (and the earlier design's
    figures) by the script's --report-only: a stale report fails here."""
    docs = REPO / "docs"
    output = tmp_path / "report.md"
    assert bs.main(["--report-only", "--json", str(docs / "benchmarks-scale.json"),
                    "--before", str(docs / "benchmarks-scale-before.json"),
                    "--output", str(output), "--plot", str(tmp_path / "plot.png")]) == 0
    published = (docs / "benchmarks-scale.md").read_text()
    assert published.startswith(output.read_text()), "regenerate: scripts/bench_scale.py --report-only ..."
    data = json.loads((docs / "benchmarks-scale.json").read_text())
    assert max(s["dmzs"] * s["vms"] for s in data["sizes"]) >= 80
