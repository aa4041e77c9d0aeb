"""`dmzctl report`: one self-contained HTML page, valid HTML (html5lib, strict), its policy tables read
off the rendered table in order, every value escaped; rendered by a real headless chromium (no
console error, the diagram loaded, readable at 1280 px and printed); on the host, check's findings
and the last verify run of a real DMZ (names rp-…, 10.219.0.0/24, LAN 10.220.0.0/24, no VM)."""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import html5lib
import pytest
from lxml import html as lxml_html

from test_render import load
from dmzctl.host.graphviz import draw, png_size
from dmzctl.render.nft import render_table
from dmzctl.report.diagram import build_graph
from dmzctl.report.dot import to_dot
from dmzctl.report.html import ConfigDigest, Footer, LiveState, ReportInput, render_report
from dmzctl.report.policy import CHAINS
from dmzctl.verify import Report
from dmzctl.verify.record import read_record, record, record_path

ROOT = Path(__file__).resolve().parents[1]
DEMO, PUB = ROOT / "examples" / "demo.toml", ROOT / "examples" / "web-and-mail.toml"
WHEN = datetime(2026, 11, 30, 9, 41, 7, tzinfo=timezone.utc)
LIVE_TOML = """\
[dmz]
name = "rp-live"
mode = "route"
gateway = "10.219.0.1/24"
protected = ["10.220.0.0/24"]
dns = "10.220.0.53"
"""


def _verify_record(dmz_name: str) -> dict:
    return {"dmz": dmz_name, "ok": True, "finished_at": WHEN.isoformat(timespec="seconds"),
            "counts": {"probes": 2, "ok": 2, "blocked_as_expected": 1, "allowed_as_expected": 1},
            "probes": [{"status": "ok", "expected": "drop", "observed": "timeout", "dst": "10.214.0.1", "proto": "tcp",
                        "port": 22, "rule": "to protected"},
                       {"status": "ok", "expected": "accept", "observed": "reply", "dst": "10.214.0.53",
                        "proto": "udp", "port": 53, "rule": "hole dns"}],
            "notes": [], "problems": []}


def make_input(dmzs, **changes) -> ReportInput:
    svg = draw(to_dot(build_graph(dmzs)), "svg")
    data = ReportInput(tuple(dmzs), svg, "image/svg+xml",
                       Footer("0.1.0", "testhost", "2026-11-30 09:41:07 UTC",
                              tuple(ConfigDigest(str(d.source), d.config_hash) for d in dmzs)),
                       live={d.name: LiveState(False, "not on the host (not run as root)") for d in dmzs},
                       verify={dmzs[0].name: _verify_record(dmzs[0].name)},
                       verify_paths={d.name: f"/var/lib/dmzctl/verify/{d.name}.json" for d in dmzs})
    return dataclasses.replace(data, **changes)


def strict_parse(text: str):
    """html5lib's strict parser raises on the first parse error: the page is valid HTML."""
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)


@pytest.fixture(scope="module")
def both():
    return [load(DEMO), load(PUB)]


@pytest.fixture(scope="module")
def page(both) -> str:
    return render_report(make_input(both))


def test_valid_html_and_self_contained(page):
    strict_parse(page)
    tree = lxml_html.fromstring(page)
    sources = tree.xpath("//@src | //@href")
    assert sources and all(s.startswith(("data:", "#")) for s in sources), sources
    assert not tree.xpath("//script | //link | //iframe"), "no script, no external style sheet"
    image = tree.get_element_by_id("diagram-image")
    assert image.get("src").startswith("data:image/svg+xml;base64,")
    assert "reaches dns: udp port 53 to 10.214.0.53/32" in image.get("alt")


def test_policy_tables_are_the_rendered_rules_in_order(page, both):
    tree = lxml_html.fromstring(page)
    for dmz in both:
        section = tree.get_element_by_id(f"dmz-{dmz.name}")
        rules = [c["add"]["rule"] for c in render_table(dmz) if "rule" in c.get("add", {})]
        expected = [r["comment"] for chain in CHAINS for r in rules if r["chain"] == chain]
        cells = [row.xpath("string(td[2])").strip() for row in section.xpath(".//table[@class='policy']/tbody/tr")]
        assert [cell.rsplit(" ", 1)[0] for cell in cells] == expected  # the comment, then explain's kind
    demo = tree.get_element_by_id("dmz-demo").text_content()
    assert 'drop, logged "dmzctl demo to-protected:"' in demo and "ip daddr @protected4 {10.214.0.0/24}" in demo


def test_live_state_verify_vms_and_footer(page, both):
    tree = lxml_html.fromstring(page)
    demo = " ".join(tree.get_element_by_id("dmz-demo").text_content().split())
    assert "Live state not read: not on the host (not run as root)." in demo
    assert "OK at 2026-11-30T09:41:07+00:00: 2 probes: 1 blocked and 1 allowed as expected" in demo
    assert "serial console: through libvirt only" in demo and "no graphical console" in demo
    assert "CPU: no cap" in demo and "new flows: 2000/second, burst 4000" in demo
    pub = " ".join(tree.get_element_by_id("dmz-pub").text_content().split())
    assert "No recorded run of dmzctl verify (looked for /var/lib/dmzctl/verify/pub.json)" in pub
    assert "/var/lib/dmzctl/web.qcow2 (qcow2) ← /var/lib/dmzctl/base/debian-12.qcow2 (qcow2)" in pub
    assert "VNC: a UNIX socket only libvirt hands out" in pub
    footer = " ".join(tree.get_element_by_id("footer").text_content().split())
    for dmz in both:
        assert f"{dmz.source} sha256 {dmz.config_hash}" in footer
    assert "testhost" in footer and "2026-11-30 09:41:07 UTC" in footer


def test_every_value_is_escaped(both):
    hostile = dataclasses.replace(both[0], source=Path("/etc/dmzctl/<script>alert(1)</script>.toml"))
    page = render_report(make_input([hostile], live={"demo": LiveState(True, "", False, ("VM <b>x</b>: gone",))}))
    strict_parse(page)
    tree = lxml_html.fromstring(page)
    assert not tree.xpath("//script | //b")
    assert "<script>alert(1)</script>" in tree.text_content() and "VM <b>x</b>: gone" in tree.text_content()


def test_a_vm_console_on_tcp_is_flagged(both):
    pub = both[1]
    web = dataclasses.replace(pub.vms[0], graphics_listen="localhost")
    page = render_report(make_input([dataclasses.replace(pub, vms=(web,) + pub.vms[1:])]))
    warned = lxml_html.fromstring(page).xpath("//li[@class='warn']/text()")
    assert any("TCP on 127.0.0.1" in text for text in warned)


def test_verify_records_its_last_run(tmp_path):
    report = Report(dmz="rp-x", bridge="dz-rp-x", src4="10.219.0.126", notes=["a note"])
    path = record(report, tmp_path, WHEN)
    assert path == record_path(tmp_path, "rp-x") == tmp_path / "verify" / "rp-x.json"
    data = read_record(tmp_path, "rp-x")
    assert data["finished_at"] == "2026-11-30T09:41:07+00:00" and data["ok"] and data["notes"] == ["a note"]
    assert data["dmzctl_version"] and oct(path.stat().st_mode)[-3:] == "644"
    assert [p.name for p in path.parent.iterdir()] == ["rp-x.json"], "no scratch file left"
    assert read_record(tmp_path, "nobody") is None
    (tmp_path / "verify" / "bad.json").write_text("{")
    assert read_record(tmp_path, "bad") is None


def _dmzctl(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmzctl.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_offline_report(tmp_path):
    out = tmp_path / "report.html"
    result = _dmzctl("report", str(DEMO), "--offline", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"report written to {out}" in result.stdout
    page = out.read_text()
    strict_parse(page)
    assert "report made with --offline" in page
    result = _dmzctl("report", str(DEMO), "-o", str(tmp_path / "nowhere" / "r.html"), "--offline")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot write" in result.stderr


# --- a real browser --------------------------------------------------------------------

WIDTH, HEIGHT = 1280, 900


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through its chromedriver (scripts/setup.sh installs both), as root: no sandbox."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("needs chromium and chromium-driver (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def _errors(driver) -> list:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR", "WARNING")]


def test_the_browser_renders_it_without_errors_and_the_diagram_loads(browser, both, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(render_report(make_input(both)))
    browser.get(path.as_uri())
    loaded = browser.execute_script(
        "const i = document.getElementById('diagram-image');"
        "return {complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width,"
        " scroll: document.documentElement.scrollWidth, inner: window.innerWidth};")
    assert loaded["complete"] and loaded["w"] > 0 and loaded["h"] > 0, loaded
    assert 0 < loaded["shown"] <= WIDTH, "the diagram fits the page"
    assert loaded["scroll"] <= loaded["inner"], "no horizontal scrolling at 1280 px"
    assert not _errors(browser), _errors(browser)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert png_size(shot.read_bytes()) == (WIDTH, HEIGHT) and shot.stat().st_size > 10_000
    # Printed: the navigation goes, the diagram still fits the page, and chromium makes a PDF of it.
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    assert browser.execute_script("return getComputedStyle(document.querySelector('nav')).display") == "none"
    pdf = browser.execute_cdp_cmd("Page.printToPDF", {"printBackground": True})["data"]
    assert len(pdf) > 10_000
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert not _errors(browser), _errors(browser)


# --- on the host ---------------------------------------------------------------------

def _everything_but(*ours: str) -> list[str]:
    """--skip prefixes covering every address outside ours: verify probes nothing else."""
    skip = []
    for family in ("0.0.0.0/0", "::/0"):
        rest = [ipaddress.ip_network(family)]
        for own in map(ipaddress.ip_network, ours):
            rest = [piece for net in rest for piece in
                    (net.address_exclude(own) if own.version == net.version and own.subnet_of(net) else [net])]
        skip += [str(net) for net in rest]
    return skip


@pytest.mark.host
def test_on_the_host_check_findings_and_the_last_verify_run(tmp_path):
    if os.geteuid() != 0 or shutil.which("virsh") is None:
        pytest.skip("needs root and libvirt")
    config = tmp_path / "rp-live.toml"
    config.write_text(LIVE_TOML)
    env = dict(os.environ, DMZCTL_STATE_DIR=str(tmp_path / "state"))
    try:
        result = _dmzctl("up", str(config), env=env)
        assert result.returncode == 0, result.stderr
        skip = [arg for prefix in _everything_but("10.219.0.0/24") for arg in ("--skip", prefix)]
        verified = _dmzctl("verify", str(config), "--timeout", "1.5", "--json", *skip, env=env)
        assert verified.returncode in (0, 1), verified.stderr
        kept = json.loads((tmp_path / "state" / "verify" / "rp-live.json").read_text())
        assert kept["finished_at"] and kept["probes"] and all(p["dst"].startswith("10.219.0.") for p in kept["probes"])
        out = tmp_path / "report.html"
        result = _dmzctl("report", str(config), "-o", str(out), env=env)
        assert result.returncode == 0, result.stderr
        page = out.read_text()
        strict_parse(page)
        tree = lxml_html.fromstring(page)
        text = " ".join(tree.text_content().split())
        # check's findings: in sync, unless other tests on this machine changed the host's networks meanwhile
        # (then the sets of implicit blocks are stale, and the report says so, line by line).
        findings = tree.xpath("//section[@id='dmz-rp-live']//h3[.='Live state']/following-sibling::ul[1]/li/text()")
        assert ("In sync: network, nwfilters, firewall table, VMs and hooks are as configured" in text
                or "Drifted:" in text and findings and all(" is stale: " in f for f in findings)), text
        assert "Live state not read" not in text
        assert f"at {kept['finished_at']}:" in text and "No VM in this DMZ." in text
        # Drawn and rendered from the live view: the host by name, the policy with the host's networks.
        svg = base64.b64decode(tree.get_element_by_id("diagram-image").get("src").split(",", 1)[1]).decode()
        assert f"host {socket.gethostname()}" in svg and "the host's networks" in text
    finally:
        _dmzctl("destroy", str(config), env=env)
