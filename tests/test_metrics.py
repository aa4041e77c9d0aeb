"""dmzctl metrics and guard --metrics: the Prometheus text, judged by prometheus-client's own parser;
the table's counters moved by real drops from a namespace on a DMZ bridge (tests/mtworld.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmzctl.config import load_dmz
from dmzctl.errors import ConfigError
from dmzctl.metrics import Count, DMZMetrics, GuardInfo, TableCounters, read_counters, text
from dmzctl.ops import metrics as ops_metrics
from dmzctl.render.nft import render_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples").glob("*.toml")) + sorted((ROOT / "tests" / "configs").glob("**/*.toml"))


def samples(content: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}, through prometheus-client's parser."""
    found = {}
    for family in text_string_to_metric_families(content):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


# --- pure ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_drop_and_every_hole_accept_in_the_table_carries_a_counter(path):
    for command in render_table(load_dmz(path)):
        rule = command.get("add", {}).get("rule")
        if rule is None:
            continue
        keys = {key for expr in rule["expr"] for key in expr}
        if "drop" in keys or rule["comment"].startswith("hole "):
            assert "counter" in keys, rule["comment"]
        if "drop" in keys:
            assert rule["comment"].startswith("drop "), f"the drop reason marker is missing: {rule['comment']}"


def _rule(chain, comment, *expr):
    return {"rule": {"family": "inet", "table": "dmzctl-x", "chain": chain, "comment": comment, "expr": list(expr)}}


def test_counters_are_found_by_their_marker_not_by_a_list():
    counter = lambda p, b: {"counter": {"packets": p, "bytes": b}}  # noqa: E731
    listing = {"nftables": [
        {"metainfo": {}},
        _rule("protected", "log to-protected", {"log": {"prefix": "dmzctl x to-protected: "}}),
        _rule("protected", "drop to-protected", counter(3, 180), {"drop": None}),
        # a reason no list names (issue 12's inbound), found by its comment
        _rule("inbound", "drop inbound", counter(2, 120), {"drop": None}),
        # no comment marker: the chain's log prefix names it
        _rule("egress", "log egress", {"log": {"prefix": "dmzctl x egress: "}}),
        _rule("egress", "", counter(1, 60), {"drop": None}),
        _rule("from_dmz", "hole dns", counter(4, 240), {"accept": None}),
        _rule("to_host", "hole dns", counter(1, 60), {"accept": None}),
        _rule("to_dmz", "publish[0] web tcp/443", counter(7, 700), {"accept": None}),
        _rule("caps", "new flows over max_new_flows", counter(9, 900), {"jump": {"target": "flood"}}),
        _rule("forward", "replies", {"accept": None}),
    ]}
    found = read_counters(listing)
    assert {k: (c.packets, c.bytes) for k, c in found.drops.items()} == \
        {"to-protected": (3, 180), "inbound": (2, 120), "egress": (1, 60)}
    assert {k: c.packets for k, c in found.holes.items()} == {"dns": 5}
    assert {k: c.packets for k, c in found.published.items()} == {"publish[0] web tcp/443": 7}
    assert read_counters(None) is None


def test_the_text_parses_and_names_every_family():
    counters = TableCounters(drops={"to-protected": Count(3, 180), "spoofed": Count(1, 60)},
                             holes={"allow[0]": Count(2, 100)})
    ok = DMZMetrics("a", in_sync=False, drift={"table-rules-altered": 2}, vms_running=1, vms_expected=2,
                    counters=counters, verify_ok=True, verify_timestamp=1700000000.0, guard_restores=4)
    broken = DMZMetrics("b", read_ok=False, error="libvirt: no")
    found = samples(text([ok, broken], GuardInfo(running=True)))
    assert value(found, "dmzctl_dmz_in_sync", dmz="a") == 0
    assert value(found, "dmzctl_dmz_drift", dmz="a", kind="table-rules-altered") == 2
    assert value(found, "dmzctl_vms_running", dmz="a") == 1 and value(found, "dmzctl_vms_expected", dmz="a") == 2
    assert value(found, "dmzctl_dropped_packets_total", dmz="a", reason="to-protected") == 3
    assert value(found, "dmzctl_dropped_bytes_total", dmz="a", reason="spoofed") == 60
    assert value(found, "dmzctl_hole_accepted_packets_total", dmz="a", hole="allow[0]") == 2
    assert value(found, "dmzctl_verify_ok", dmz="a") == 1
    assert value(found, "dmzctl_verify_timestamp_seconds", dmz="a") == 1700000000.0
    assert value(found, "dmzctl_guard_restores_total", dmz="a") == 4
    assert value(found, "dmzctl_guard_running") == 1
    assert value(found, "dmzctl_dmz_read_ok", dmz="b") == 0
    assert not [key for key in found if dict(key[1]).get("dmz") == "b" and key[0] != "dmzctl_dmz_read_ok"]


@pytest.mark.parametrize("given, expected", [("127.0.0.1:9839", ("127.0.0.1", 9839)),
                                             ("[::1]:9839", ("::1", 9839)), ("localhost:80", ("127.0.0.1", 80)),
                                             ("127.0.0.2:1", ("127.0.0.2", 1))])
def test_loopback_addresses_are_served(given, expected):
    assert ops_metrics.parse_listen(given) == expected


@pytest.mark.parametrize("given", ["0.0.0.0:9839", "10.225.0.1:9839", "[::]:9839", "9839", "host:9839",
                                   "127.0.0.1:0", "127.0.0.1:99999"])
def test_anything_but_loopback_is_refused_in_one_line(given):
    with pytest.raises(ConfigError) as caught:
        ops_metrics.parse_listen(given)
    assert len(caught.value.problems) == 1 and given in caught.value.problems[0]


def test_guard_refuses_a_non_loopback_address_in_one_line_and_starts_nothing():
    result = subprocess.run([sys.executable, "-m", "dmzctl.cli", "guard", "--metrics", "0.0.0.0:9839",
                             str(ROOT / "examples" / "demo.toml")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip().splitlines() == [
        "dmzctl: --metrics 0.0.0.0:9839: the guard serves metrics on loopback only (127.0.0.1 or ::1); "
        "let node_exporter or a reverse proxy expose them"]


def test_textfile_is_replaced_atomically(tmp_path):
    """A reader polling the file while it is rewritten sees only whole versions, and nothing else stays."""
    versions = [f"# version {n}\n" + "dmzctl_x 1\n" * 20000 + f"# end {n}\n" for n in range(40)]
    ops_metrics.write_textfile(tmp_path, versions[0])
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add((tmp_path / "dmzctl.prom").read_text())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for content in versions[1:]:
            ops_metrics.write_textfile(tmp_path, content)
    finally:
        stop.set()
        thread.join()
    assert seen and seen <= set(versions), "a reader saw a partly written file"
    assert [p.name for p in tmp_path.iterdir()] == ["dmzctl.prom"]
    assert oct((tmp_path / "dmzctl.prom").stat().st_mode & 0o777) == "0o644"


def test_guard_state_round_trip(tmp_path):
    ops_metrics.record_guard(tmp_path, {"a": 2})
    guard, restores = ops_metrics.read_guard(tmp_path)
    assert restores == {"a": 2}
    assert guard.running == (b"dmzctl" in Path(f"/proc/{os.getpid()}/cmdline").read_bytes())
    (tmp_path / "guard.json").write_text(json.dumps({"pid": 999999999, "restores": {"a": 1}}))
    assert ops_metrics.read_guard(tmp_path)[0].running is False
    assert ops_metrics.read_guard(tmp_path / "none") == (GuardInfo(running=False), {})


def _promtool() -> str:
    import shutil

    found = shutil.which("promtool") or (str(ROOT / ".venv" / "bin" / "promtool")
                                         if (ROOT / ".venv" / "bin" / "promtool").exists() else None)
    assert found, "promtool is missing: scripts/setup.sh takes it from Debian's prometheus package"
    return found


def test_the_alert_rules_pass_promtool_s_check_and_its_unit_tests():
    check = subprocess.run([_promtool(), "check", "rules", str(ROOT / "docs" / "alerts.yml")], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    tests = subprocess.run([_promtool(), "test", "rules", str(ROOT / "tests" / "promtool" / "alerts_test.yml")],
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_the_text_passes_promtool_s_metrics_lint():
    """Prometheus' own conventions (counter names, units, help texts), judged by promtool."""
    counters = TableCounters(drops={"to-protected": Count(3, 180)}, holes={"dns": Count(1, 60)},
                             published={"publish[0]": Count(1, 60)})
    content = text([DMZMetrics("a", drift={"vm-missing": 1}, counters=counters, verify_ok=True,
                               verify_timestamp=1.0, guard_restores=0)], GuardInfo(running=True))
    lint = subprocess.run([_promtool(), "check", "metrics"], input=content, capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr


def test_the_alert_rules_name_only_metrics_dmzctl_writes():
    import re

    written = {f.name for f in text_string_to_metric_families(text([DMZMetrics("a")], GuardInfo()))}
    written |= {name + "_total" for name in written}
    used = set(re.findall(r"\bdmzctl_[a-z_]+", (ROOT / "docs" / "alerts.yml").read_text()))
    assert used and used <= written, used - written


# --- on the host: real drops move the right counters ----------------------------------

host = pytest.mark.host


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import mtworld

    if os.geteuid() != 0:
        pytest.fail("the metrics host tests need root")
    with mtworld.Site(tmp_path_factory.mktemp("metrics")) as site:
        yield site
    assert not mtworld.leftovers(), mtworld.leftovers()


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, DMZCTL_STATE_DIR=str(tmp_path / "state"), DMZCTL_RUN_DIR=str(tmp_path / "run"))


def _metrics(site, env) -> dict:
    import mtworld

    return samples(mtworld.dmzctl("metrics", str(site.config), env=env).stdout)


def _dropped(found, reason):
    return value(found, "dmzctl_dropped_packets_total", dmz="mt-m", reason=reason)


@host
def test_real_drops_move_the_right_counters(site, tmp_path):
    import mtworld

    env = _env(tmp_path)
    before = _metrics(site, env)
    assert value(before, "dmzctl_table_present", dmz="mt-m") == 1
    assert value(before, "dmzctl_vms_expected", dmz="mt-m") == 1 and value(before, "dmzctl_vms_running", dmz="mt-m") == 0
    steps = [
        ("to-protected", [{"id": "p", "proto": "udp", "dst": mtworld.LAN_IP, "port": 5000, "timeout": 0.3},
                          {"id": "p6", "proto": "udp", "dst": mtworld.LAN_IP6, "port": 5000, "timeout": 0.3}], 2),
        ("spoofed", [{"id": "s", "proto": "udp", "dst": mtworld.LAN_IP, "port": 5000, "timeout": 0.3,
                      "src": mtworld.FORGED}], 1),
        ("to-host", [{"id": "h", "proto": "udp", "dst": mtworld.GATEWAY, "port": 7000, "timeout": 0.3}], 1),
    ]
    for reason, specs, at_least in steps:
        was, now = _step(site, env, specs)
        assert _dropped(now, reason) - _dropped(was, reason) >= at_least, \
            (reason, _dropped(was, reason), _dropped(now, reason), site.probe_results)
        assert now[("dmzctl_dropped_bytes_total", (("dmz", "mt-m"), ("reason", reason)))] > \
            was.get(("dmzctl_dropped_bytes_total", (("dmz", "mt-m"), ("reason", reason))), 0)
        for other in ("to-protected", "spoofed"):
            if other != reason:
                assert _dropped(now, other) == _dropped(was, other), f"{reason} moved {other}"
    was, now = _step(site, env, [{"id": "d", "proto": "udp", "dst": mtworld.LAN_DNS, "port": 53, "timeout": 0.3,
                                  "src": mtworld.VM_IP}])
    assert value(now, "dmzctl_hole_accepted_packets_total", dmz="mt-m", hole="allow[1]") > \
        value(was, "dmzctl_hole_accepted_packets_total", dmz="mt-m", hole="allow[1]")
    assert _dropped(now, "to-protected") == _dropped(was, "to-protected")
    # The backstop's counters are there, and still: the main table dropped everything first.
    assert _dropped(now, "backstop-protected") == 0 and _dropped(now, "backstop-host") == 0


def _step(site, env, specs, attempts: int = 3) -> tuple[dict, dict]:
    """Metrics before and after the probes. Another DMZ's `up` on this machine replaces this table
    whole when the host's networks changed (its counters start from zero): a step that saw a counter
    go down is sent again."""
    for _ in range(attempts):
        was = _metrics(site, env)
        site.probe(specs)
        now = _metrics(site, env)
        counted = [key for key in was if key[0].endswith("_total")]
        if all(now.get(key, 0) >= was[key] for key in counted):
            return was, now
    raise AssertionError("the table was replaced during every attempt")


@host
def test_verify_s_record_and_the_textfile(site, tmp_path):
    import mtworld
    from dmzctl.verify import Report
    from dmzctl.verify.record import record

    env = _env(tmp_path)
    finished = datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc)
    record(Report(dmz="mt-m", bridge="mt-m0", problems=["one mismatch"]), Path(env["DMZCTL_STATE_DIR"]), finished)
    out = tmp_path / "textfile"
    mtworld.dmzctl("metrics", str(site.config), "--textfile", str(out), env=env)
    assert [p.name for p in out.iterdir()] == ["dmzctl.prom"]
    found = samples((out / "dmzctl.prom").read_text())
    lint = subprocess.run([_promtool(), "check", "metrics"], input=(out / "dmzctl.prom").read_text(),
                          capture_output=True, text=True)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    assert value(found, "dmzctl_verify_ok", dmz="mt-m") == 0
    assert value(found, "dmzctl_verify_timestamp_seconds", dmz="mt-m") == finished.timestamp()
    assert value(found, "dmzctl_dmz_read_ok", dmz="mt-m") == 1
    assert value(found, "dmzctl_dmz_drift", dmz="mt-m", kind="vm-missing") == 1  # the VM is never defined


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


@host
def test_guard_serves_the_same_families_on_loopback_and_counts_restores(site, tmp_path):
    import mtworld

    env = _env(tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log = open(tmp_path / "guard.log", "w")
    guard = subprocess.Popen([sys.executable, "-m", "dmzctl.cli", "guard", "--no-libvirt", "--metrics",
                              f"127.0.0.1:{port}", str(site.config)], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        import netns

        assert netns.wait_until(lambda: "watching 1 DMZ" in (tmp_path / "guard.log").read_text(), 60, 0.2), \
            (tmp_path / "guard.log").read_text()
        served = _scrape(url)
        printed = mtworld.dmzctl("metrics", str(site.config), env=env).stdout
        assert {f.name for f in text_string_to_metric_families(served)} == \
            {f.name for f in text_string_to_metric_families(printed)}
        start = value(samples(served), "dmzctl_guard_restores_total", dmz="mt-m")
        assert value(samples(served), "dmzctl_guard_running") == 1
        netns.run(["nft", "delete", "table", "inet", "dmzctl-mt-m"])
        assert netns.wait_until(lambda: netns.run(["nft", "list", "table", "inet", "dmzctl-mt-m"],
                                                  check=False).returncode == 0, 10)
        found = samples(_scrape(url))
        assert value(found, "dmzctl_guard_restores_total", dmz="mt-m") >= start + 1
        printed = samples(mtworld.dmzctl("metrics", str(site.config), env=env).stdout)
        assert value(printed, "dmzctl_guard_restores_total", dmz="mt-m") >= start + 1
        assert value(printed, "dmzctl_guard_running") == 1
    finally:
        guard.send_signal(signal.SIGTERM)
        try:
            guard.wait(20)
        except subprocess.TimeoutExpired:
            guard.kill()
            guard.wait()
        log.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
