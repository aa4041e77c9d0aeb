"""The command line: Typer commands that parse options, call plain modules, and turn
DmzctlError into one line on stderr and an exit code. No logic lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import DEFAULT_CONFIG_DIR, DMZ, default_config_paths, load_all
from .errors import ConfigError, DmzctlError

app = typer.Typer(
    name="dmzctl",
    help="Run public-facing VMs in a libvirt DMZ that provably cannot reach the LAN or the host.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
firewall_app = typer.Typer(help="The DMZ's nftables table alone (the original's startfirewall/stopfirewall).",
                           no_args_is_help=True)
app.add_typer(firewall_app, name="firewall")

STATE = {"debug": False, "uri": None}

ConfigArgs = Annotated[
    Optional[list[Path]],
    typer.Argument(help=f"DMZ config files (default: {DEFAULT_CONFIG_DIR}/*.toml)", show_default=False),
]
ConnectOpt = Annotated[
    Optional[str],
    typer.Option("--connect", "-c", help="libvirt URI (default: $LIBVIRT_DEFAULT_URI or qemu:///system)"),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    STATE["debug"] = debug


def fail(error: DmzctlError) -> None:
    message = str(error)
    prefix = "dmzctl: "
    if isinstance(error, ConfigError):
        for line in error.problems:
            typer.echo(f"{prefix}{line}", err=True)
    else:
        typer.echo(f"{prefix}{message}", err=True)
    raise typer.Exit(code=error.exit_code)


def run(action):
    """Call action(); a DmzctlError becomes a message and its exit code."""
    try:
        return action()
    except DmzctlError as error:
        if STATE["debug"]:
            raise
        fail(error)
    except KeyboardInterrupt:
        typer.echo("dmzctl: interrupted", err=True)
        raise typer.Exit(code=130) from None


def load_configs(paths: Optional[list[Path]]) -> list[DMZ]:
    if not paths:
        paths = default_config_paths()
        if not paths:
            raise ConfigError([f"{DEFAULT_CONFIG_DIR}: no *.toml files; give a config file on the command line"])
    return load_all(list(paths))


def resolve_uri(connect: Optional[str]) -> str:
    return connect or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


@app.command()
def validate(configs: ConfigArgs = None) -> None:
    """Check config files; print every problem, one line each (exit 2 if any)."""

    def action():
        for dmz in load_configs(configs):
            typer.echo(f"{dmz.source}: ok (DMZ {dmz.name}, {len(dmz.vms)} VM(s), "
                       f"{len(dmz.protected)} protected subnet(s), {len(dmz.holes)} hole(s))")

    run(action)


@app.command()
def render(
    configs: ConfigArgs = None,
    what: Annotated[str, typer.Option(
        "--what", help="network | nwfilter | nft | domain:NAME | all")] = "all",
    virt_type: Annotated[Optional[str], typer.Option(
        "--virt-type", help="Render domains as kvm or qemu (default: qemu; `up` asks the host)")] = None,
) -> None:
    """Print what `up` would apply, touching nothing."""
    from .render_cli import render_text

    run(lambda: typer.echo(render_text(load_configs(configs), what, virt_type), nl=False))


def main() -> None:
    # libvirt prints its own errors to stderr unless told otherwise; dmzctl says them once, its way.
    try:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    except ImportError:
        pass
    app(prog_name="dmzctl")


if __name__ == "__main__":
    sys.exit(main())
