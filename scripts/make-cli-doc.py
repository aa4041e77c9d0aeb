#!/usr/bin/env python3
"""Write docs/cli.md, the command-line reference, from the Typer app itself (every command, its help,
arguments and options), through click's introspection of typer.main.get_command(app).

    .venv/bin/python scripts/make-cli-doc.py           # rewrite docs/cli.md
    .venv/bin/python scripts/make-cli-doc.py --check   # exit 1 when docs/cli.md is stale

The output depends only on the code: no terminal width, no environment, commands in --help's order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import typer.main

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "cli.md"
REGENERATE = ".venv/bin/python scripts/make-cli-doc.py"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def params_table(command, ctx, kind: str) -> list[str]:
    rows = []
    for param in command.get_params(ctx):
        if param.param_type_name != kind or getattr(param, "hidden", False) or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        name, description = record
        if kind == "argument" and not param.required:
            name += " (optional)"
        if getattr(param, "envvar", None):
            description += f" [env: {param.envvar}]"
        rows.append(f"| `{cell(name)}` | {cell(description) or ' '} |")
    if not rows:
        return []
    title = "Arguments" if kind == "argument" else "Options"
    return ["", f"**{title}**", "", f"| {title[:-1] if kind == 'argument' else 'Option'} | Description |",
            "|---|---|", *rows]


def section(command, ctx, path: str, depth: int) -> list[str]:
    lines = [f"{'#' * depth} `{path}`", "", "```", command.get_usage(ctx).removeprefix("Usage: "), "```"]
    if command.help:
        lines += ["", command.help.strip()]
    lines += params_table(command, ctx, "argument") + params_table(command, ctx, "option")
    return lines + [""]


def walk(command, ctx, path: str, depth: int) -> list[str]:
    """This command's section, then its subcommands' (a group's in --help's order)."""
    lines = section(command, ctx, path, depth)
    names = command.list_commands(ctx) if hasattr(command, "list_commands") else []
    if names:
        lines += ["| Command | What it does |", "|---|---|"]
        for name in names:
            sub = command.get_command(ctx, name)
            if not sub.hidden:
                anchor = f"{path} {name}".replace(" ", "-")
                lines.append(f"| [`{name}`](#{anchor}) | {cell(sub.get_short_help_str(limit=200))} |")
        lines.append("")
        for name in names:
            sub = command.get_command(ctx, name)
            if not sub.hidden:
                lines += walk(sub, sub.context_class(sub, info_name=name, parent=ctx), f"{path} {name}",
                              min(depth + 1, 3))
    return lines


def render() -> str:
    from dmzctl.cli import app

    command = typer.main.get_command(app)
    ctx = command.context_class(command, info_name="dmzctl", terminal_width=10_000, max_content_width=10_000)
    head = ["# dmzctl command-line reference", "",
            f"<!-- Generated from the Typer app by scripts/make-cli-doc.py: do not edit; run {REGENERATE} -->", "",
            "Every command accepts `--help`, which prints the same text. Bash completion: scripts/install.sh "
            "installs it (or `eval \"$(_DMZCTL_COMPLETE=source_bash dmzctl)\"`).", ""]
    body = walk(command, ctx, "dmzctl", 2)
    return "\n".join(head + body + exit_codes()).rstrip("\n") + "\n"


def exit_codes() -> list[str]:
    """The exit code of each error family (dmzctl/errors.py), as the commands turn them into codes."""
    from dmzctl import errors

    families = [value for value in vars(errors).values()
                if isinstance(value, type) and issubclass(value, errors.DmzctlError)]
    lines = ["## Exit codes", "", "| Code | Meaning |", "|---|---|",
             "| 0 | done; for `status`, `check` and `verify`: everything as configured |",
             "| 1 | `status`, `check`, `verify`: something differs from the config or the policy |"]
    for family in sorted(families, key=lambda f: (f.exit_code, f.__name__)):
        if family is errors.DmzctlError:
            continue  # the base: its subclasses name the causes
        doc = (family.__doc__ or "").strip().splitlines()[0]
        lines.append(f"| {family.exit_code} | `{family.__name__}`: {cell(doc)} |")
    return lines + ["| 130 | interrupted (Ctrl-C) |", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md differs, write nothing")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"docs/cli.md differs from the Typer app: regenerate it with {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
