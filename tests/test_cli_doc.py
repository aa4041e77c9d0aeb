"""docs/cli.md is the Typer app's own reference: it fails here as soon as a command, argument, option or
help text changes without the document. Regenerate with: .venv/bin/python scripts/make-cli-doc.py"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/make-cli-doc.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_docs_cli_md_is_current():
    result = check()
    assert result.returncode == 0, (f"{result.stderr.strip()}\n(then read `git diff docs/cli.md` and commit it)")


def test_the_reference_does_not_depend_on_the_terminal_or_the_environment():
    # A narrow terminal, another hooks directory and another libvirt URI change nothing in the document.
    result = check(COLUMNS="40", TERM="dumb", DMZCTL_HOOKS_DIR="/nonexistent", LIBVIRT_DEFAULT_URI="test:///default")
    assert result.returncode == 0, result.stderr


def test_every_command_has_its_section():
    from typer.main import get_command

    from dmzctl.cli import app

    text = (ROOT / "docs" / "cli.md").read_text()
    group = get_command(app)
    ctx = group.context_class(group, info_name="dmzctl")
    for name in group.list_commands(ctx):
        assert f"### `dmzctl {name}`" in text, name
