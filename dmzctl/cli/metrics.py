"""Commands for monitoring: metrics (Prometheus) and blocked (the drop log)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import ConfigArgs, ConnectOpt, app, load_configs, run, settings_of


@app.command()
def metrics(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    textfile: Annotated[Optional[Path], typer.Option(
        "--textfile", help="Write DIR/dmzctl.prom atomically (node_exporter's textfile collector) "
                           "instead of printing", metavar="DIR")] = None,
    connect: ConnectOpt = None,
) -> None:
    """Prometheus metrics per DMZ: in sync and drift by kind, VMs running/expected, packets and bytes
    dropped per reason and accepted per hole (the table's counters), the last verify, guard restores."""
    from ..ops.metrics import metrics_text, write_textfile

    settings = settings_of(ctx, connect)

    def action():
        content = metrics_text(load_configs(configs), settings)
        if textfile is None:
            typer.echo(content, nl=False)
        else:
            write_textfile(textfile, content)

    run(action, settings.debug)


@app.command()
def blocked(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    since: Annotated[Optional[str], typer.Option(
        "--since", help="Only attempts since: 30s, 10m, 1h, 2d, or an ISO 8601 time")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable groups")] = False,
) -> None:
    """Who in the DMZ tried to reach what: the table's logged drops (kernel log: the journal where one
    runs, else /dev/kmsg), grouped by VM, destination and reason, newest first."""
    from ..ops.blocked import blocked as read_blocked

    settings = settings_of(ctx)

    def action():
        groups, scope = read_blocked(load_configs(configs), since)
        if as_json:
            typer.echo(json.dumps([g.to_dict() for g in groups], indent=2))
        else:
            from ..blocked import format_groups

            typer.echo(format_groups(groups, scope), nl=False)

    run(action, settings.debug)
