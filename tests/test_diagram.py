"""`dmzctl diagram`: the topology as a graph (pure), its DOT text golden-tested for every example,
drawn by the real Graphviz; the README's picture checked against the DOT it was drawn from."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from test_render import load  # a fixed source path: goldens independent of the checkout
from dmzctl.host.graphviz import draw, png_digest, png_size
from dmzctl.report import diagram
from dmzctl.report.diagram import Edge, build_graph, class_id, protected_id, target_id
from dmzctl.report.dot import quote, to_dot

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
GOLDEN = Path(__file__).parent / "golden" / "diagram"
DEMO_PNG = ROOT / "docs" / "demo-diagram.png"


def dot_of(*paths: Path) -> str:
    return to_dot(build_graph([load(path) for path in paths]))


def _dmzctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmzctl.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_golden_dot(config, regenerate):
    text = dot_of(config)
    golden = GOLDEN / f"{config.stem}.dot"
    if regenerate:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing (run pytest --regenerate)"
    assert text == golden.read_text(), f"{golden.name} differs from golden (run pytest --regenerate, read the diff)"


def test_golden_dot_of_all_examples_together(regenerate):
    """Several DMZs in one picture: each is another's "other DMZ"."""
    text = dot_of(*EXAMPLES)
    golden = GOLDEN / "all-examples.dot"
    if regenerate:
        golden.write_text(text)
    assert text == golden.read_text()
    assert '"bridge:demo" -> "class:other-dmz"' in text and "192.168.100.0/24" in text


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.stem)
def test_deterministic_and_drawn_by_graphviz(config):
    assert dot_of(config) == dot_of(config)
    svg = draw(dot_of(config), "svg")
    root = etree.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    png = draw(dot_of(config), "png")
    width, height = png_size(png)
    assert width > 200 and height > 200
    assert png_digest(png) == hashlib.sha256(dot_of(config).encode()).hexdigest()


def test_the_demo_vm_reaches_the_dns_hole_and_nothing_else_of_the_lan():
    dmz = load(ROOT / "examples" / "demo.toml")
    graph = build_graph([dmz])
    lan = next(c for c in graph.clusters if c.kind == "lan")
    allowed_into_lan = [e for e in graph.edges if e.head in lan.nodes and e.kind == "allowed"]
    assert [(e.tail, e.head, e.label) for e in allowed_into_lan] == [
        ("bridge:demo", target_id(dmz.dns) + "/32", "DNS: udp/53, tcp/53")]
    blocked = {e.head for e in graph.edges if e.kind == "blocked" and e.tail == "bridge:demo"}
    assert blocked == {protected_id(dmz), "host", class_id("other-dmz"), class_id("host-net"), class_id("private")}
    assert Edge(protected_id(dmz), "bridge:demo", "LAN → DMZ\nallowed", "inbound") in graph.edges
    assert Edge("vm:demo/demo-web", "bridge:demo", "", "member") in graph.edges
    nodes = {n.id: n for n in graph.nodes}
    assert nodes["vm:demo/demo-web"].label == ("VM demo-web", "10.213.0.10", "fdd0:213::10")
    assert nodes[protected_id(dmz)].label[-1] == "everything else"


def test_a_hole_restricted_to_a_vm_starts_at_that_vm_and_isolation_is_said():
    graph = build_graph([load(ROOT / "examples" / "web-and-mail.toml")])
    by_head = {e.head: e for e in graph.edges if e.kind == "allowed"}
    assert by_head[target_id("192.168.1.25/32")].tail == "vm:pub/mail"
    assert by_head[target_id("fd42:1::25/128")].label == "allow[3]: tcp/587-588"
    assert by_head[target_id("192.168.1.10/32")].tail == "bridge:pub"
    assert "VMs isolated from each other" in next(c for c in graph.clusters[0].children).label


def test_a_new_kind_of_edge_is_one_more_builder(monkeypatch):
    """How published services and egress allowlists join the picture: a builder in EDGE_BUILDERS; a
    `target:` endpoint gets its node (in the LAN when protected) without more code."""
    def publish_edges(dmz, blocks):
        return [Edge(target_id("10.214.0.7/32"), "bridge:demo", "publish: tcp/443", "inbound")]

    monkeypatch.setattr(diagram, "EDGE_BUILDERS", diagram.EDGE_BUILDERS + (publish_edges,))
    graph = build_graph([load(ROOT / "examples" / "demo.toml")])
    assert any(e.label == "publish: tcp/443" for e in graph.edges)
    assert target_id("10.214.0.7/32") in {n.id for n in graph.nodes}
    assert target_id("10.214.0.7/32") in next(c for c in graph.clusters if c.kind == "lan").nodes


def test_live_host_info_names_the_host_and_its_uplink():
    import ipaddress

    dmz = load(ROOT / "examples" / "demo.toml")
    view = diagram.offline_view([dmz])
    host = diagram.HostInfo("box", "eth9", (ipaddress.ip_network("198.51.100.0/24"),))
    text = to_dot(build_graph([dmz], view, host))
    assert '"host box"' in text and '"uplink\\neth9\\n198.51.100.0/24"' in text


def test_dot_quoting():
    assert quote('a "b" \\ c\nd') == '"a \\"b\\" \\\\ c\\nd"'


def test_readme_picture_is_drawn_from_the_golden_dot():
    """docs/demo-diagram.png (scripts/make-diagram.sh) records the digest of the DOT it was drawn from."""
    golden = (GOLDEN / "demo.dot").read_text()
    assert dot_of(ROOT / "examples" / "demo.toml") == golden
    png = DEMO_PNG.read_bytes()
    assert png_digest(png) == hashlib.sha256(golden.encode()).hexdigest(), \
        "docs/demo-diagram.png is stale: run scripts/make-diagram.sh"
    assert "docs/demo-diagram.png" in (ROOT / "README.md").read_text()


# --- the command ---------------------------------------------------------------------

def test_cli_prints_dot_and_writes_svg_png_dot(tmp_path):
    demo = ROOT / "examples" / "demo.toml"
    result = _dmzctl("diagram", str(demo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('digraph "dmzctl" {') and '"target:10.214.0.53/32"' in result.stdout
    for suffix in ("svg", "png", "dot"):
        out = tmp_path / f"demo.{suffix}"
        result = _dmzctl("diagram", str(demo), "-o", str(out))
        assert result.returncode == 0, result.stderr
        assert out.stat().st_size > 500
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
    assert etree.parse(str(tmp_path / "demo.svg")).getroot().tag.endswith("svg")


def test_cli_bad_input_is_one_line_and_non_zero(tmp_path):
    result = _dmzctl("diagram", str(ROOT / "examples" / "demo.toml"), "-o", str(tmp_path / "demo.jpeg"))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ".svg, .png or .dot" in result.stderr and not (tmp_path / "demo.jpeg").exists()
    result = _dmzctl("diagram", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_live_diagram_reads_the_host():
    result = _dmzctl("diagram", str(ROOT / "examples" / "demo.toml"), "--live")
    assert result.returncode == 0, result.stderr
    assert '"host ' in result.stdout  # the host's name


EDGES = ROOT / "tests" / "configs" / "edges.toml"


def test_published_services_and_the_egress_allowlist_are_drawn(regenerate):
    """Issue 12's edges: published services come in from beyond the host, the rest of inbound is
    blocked; egress reaches only the allowlist (per VM where `from` says so), the rest blocked."""
    text = dot_of(EDGES)
    golden = GOLDEN / "edges.dot"
    if regenerate:
        golden.write_text(text)
    assert text == golden.read_text(), "edges.dot differs from golden (run pytest --regenerate, read the diff)"
    graph = build_graph([load(EDGES)])
    by_ends = {(e.tail, e.head, e.kind): e.label for e in graph.edges}
    published = by_ends[("internet", "vm:edges/web", "allowed")]
    assert "tcp/443 via 203.0.113.5:443" in published and "tcp/80 via every host address:8080" in published
    assert "tcp/22 from 198.51.100.0/24, 2001:db8:7::/48" in published
    assert "every other port" in by_ends[("internet", "bridge:edges", "blocked")]
    assert "deb.debian.org: tcp/80, tcp/443" in by_ends[("bridge:edges", "uplink", "allowed")]
    assert "relay.example.org: tcp/587" in by_ends[("vm:edges/web", "uplink", "allowed")]  # `from = "web"` only
    assert "not in the allowlist" in by_ends[("bridge:edges", "uplink", "blocked")]
