"""docs/threat-model.md maps every row to tests that exist: a renamed or removed test fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "threat-model.md"
REFERENCE = re.compile(r"`(?:(test_[a-z0-9_]+\.py))?::(test_[a-z0-9_]+)")


def rows() -> list[tuple[str, str]]:
    """(the row's attempt, its last cell) of every table row but the headers."""
    found = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("attempt", "---"):
            continue
        found.append((cells[0], cells[-1]))
    return found


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_row_names_tests_that_exist():
    assert len(rows()) >= 30
    missing = []
    for attempt, cell in rows():
        references = REFERENCE.findall(cell)
        assert references, f"row without a test: {attempt}"
        current = None
        for file_name, test in references:
            current = file_name or current
            assert current, f"{attempt}: '::{test}' names no file"
            if test not in functions_in(ROOT / "tests" / current):
                missing.append(f"{attempt}: {current}::{test}")
    assert not missing, "\n".join(missing)


def test_the_issue_s_attack_classes_all_have_a_row():
    text = DOC.read_text().lower()
    for topic in ("qcow2 header", "protected subnets", "fragmented", "tunnels", "forged mac", "arp reply",
                  "rogue dhcp", "dhcp pool exhaustion", "conntrack exhaustion", "another dmzctl dmz",
                  "link-local", "metadata", "console", "serial console", "hooks", "attacker on the lan",
                  "hypervisor escapes"):
        assert topic in text, topic
