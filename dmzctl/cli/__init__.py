"""The command line: Typer commands that parse options, call plain modules (ops/, verify/, explain),
and turn DmzctlError into one line on stderr and an exit code. No logic lives here.

The commands are in three modules by family (lifecycle, inspect, service), registered on
the one app below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import DEFAULT_CONFIG_DIR, DMZ, default_config_paths, load_all
from ..errors import ConfigError, DmzctlError, HostError
from ..settings import Settings

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
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """The run's settings, from the environment and the options, once: passed down from here."""
    try:
        ctx.obj = Settings.from_environment(debug=debug or None)
    except DmzctlError as error:
        fail(error)


def settings_of(ctx: typer.Context, connect: Optional[str] = None) -> Settings:
    from dataclasses import replace

    settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_environment()
    return replace(settings, uri=connect) if connect else settings


def fail(error: DmzctlError) -> None:
    message = str(error)
    prefix = "dmzctl: "
    if isinstance(error, ConfigError):
        for line in error.problems:
            typer.echo(f"{prefix}{line}", err=True)
    else:
        typer.echo(f"{prefix}{message}", err=True)
    raise typer.Exit(code=error.exit_code)


def run(action, debug: bool = False):
    """Call action(); a DmzctlError becomes a message and its exit code (a traceback with --debug)."""
    try:
        return action()
    except DmzctlError as error:
        if debug:
            raise
        fail(error)
    except Exception as error:
        # A libvirt error that escaped host/virt.py's translation is still no answer to show as a
        # traceback: one line, exit code 3 (the host), like every other host error.
        if type(error).__name__ != "libvirtError" or debug:
            raise
        from ..host.objects import describe

        fail(HostError(f"libvirt: {describe(error)}"))
    except KeyboardInterrupt:
        typer.echo("dmzctl: interrupted", err=True)
        raise typer.Exit(code=130) from None


def load_configs(paths: Optional[list[Path]]) -> list[DMZ]:
    if not paths:
        paths = default_config_paths()
        if not paths:
            raise ConfigError([f"{DEFAULT_CONFIG_DIR}: no *.toml files; give a config file on the command line"])
    return load_all(list(paths))


VmOpt = Annotated[Optional[list[str]], typer.Option("--vm", help="Only this VM (repeatable)")]


def say(message: str) -> None:
    typer.echo(message)


def print_outcome(outcome, verb: str) -> None:
    from ..ops.common import summary_lines

    for line in summary_lines(outcome, verb):
        typer.echo(line)


def print_reports(items, as_json: bool, text: str, ok: bool = True) -> None:
    """With --json each item's to_dict(), else the text; then exit 1 unless ok."""
    if as_json:
        typer.echo(json.dumps([item.to_dict() for item in items], indent=2))
    else:
        typer.echo(text, nl=False)
    if not ok:
        raise typer.Exit(code=1)


def each_dmz(settings: Settings, configs, work):
    """Run work(virt, dmz) for each DMZ under its lock, with one libvirt connection."""
    from ..host.lock import dmz_lock
    from ..host.virt import Virt

    dmzs = load_configs(configs)
    with Virt(settings.uri) as virt:
        for dmz in dmzs:
            with dmz_lock(settings.run_dir, dmz.name, say=say):
                work(virt, dmz)


def _one_dmz(configs):
    dmzs = load_configs(configs)
    if len(dmzs) != 1:
        raise ConfigError([f"{len(dmzs)} DMZs configured ({', '.join(d.name for d in dmzs)}); "
                           f"give the one config file to use"])
    return dmzs[0]


def main() -> None:
    from typer.completion import completion_init

    from ..host.virt import silence_libvirt

    # libvirt prints its own errors to stderr unless told otherwise; dmzctl says them once, its way.
    silence_libvirt()
    # Shell completion without --install-completion/--show-completion on every command line: the
    # scripts come from `_DMZCTL_COMPLETE=source_bash dmzctl` (scripts/install.sh installs bash's).
    completion_init()
    app(prog_name="dmzctl")


from . import inspect, lifecycle, metrics, report, service  # noqa: E402,F401  registers the commands
