"""Commands that show: the topology as a picture, and the one-file audit report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import ConfigArgs, ConnectOpt, app, load_configs, run, settings_of


@app.command()
def diagram(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="FILE.svg, FILE.png or FILE.dot (default: DOT text on stdout)")] = None,
    live: Annotated[bool, typer.Option(
        "--live", help="Read the host: its name, uplink, subnets and the other DMZs' networks")] = False,
) -> None:
    """Draw what each DMZ can reach (Graphviz): holes, blocked directions, the LAN and the host."""
    from ..ops.report import write_diagram

    def action():
        dot_text = write_diagram(load_configs(configs), output, live)
        if output is None:
            typer.echo(dot_text, nl=False)
        else:
            typer.echo(f"diagram written to {output}")

    run(action, settings_of(ctx).debug)


@app.command()
def report(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write")] = Path("report.html"),
    offline: Annotated[bool, typer.Option(
        "--offline", help="From the configs alone: no host networks, no live state")] = False,
    connect: ConnectOpt = None,
) -> None:
    """One self-contained HTML page: the diagram, each DMZ's policy in decision order, the live state
    (on the host), the last verify results, each VM's console exposure, disks and limits."""
    from ..ops.report import write_report

    settings = settings_of(ctx, connect)

    def action():
        size = write_report(load_configs(configs), output, settings, offline)
        typer.echo(f"report written to {output} ({size // 1024} KiB)")

    run(action, settings.debug)
