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
    except KeyboardInterrupt:
        typer.echo("dmzctl: interrupted", err=True)
        raise typer.Exit(code=130) from None
    except Exception as error:
        known = _known(error, debug)
        if known is None:
            raise
        fail(known)


def _known(error: Exception, debug: bool) -> Optional[DmzctlError]:
    """The error as dmzctl says it; None for what keeps its traceback (anything with --debug).

    A libvirt error that escaped host/virt.py's translation is still no answer to show as a
    traceback: one line, exit code 3 (the host), like every other host error."""
    if debug:
        return None
    if isinstance(error, DmzctlError):
        return error
    if type(error).__name__ == "libvirtError":
        from ..host.objects import describe

        return HostError(f"libvirt: {describe(error)}")
    return None


JsonOpt = Annotated[bool, typer.Option(
    "--json", help="One JSON document on stdout: per DMZ what changed and what is pending, or the error "
                   "(progress goes to stderr)")]


def run_outcomes(settings: Settings, configs, as_json: bool, verb: str, work, before=None) -> None:
    """work(virt, dmz, say) -> Outcome, for each DMZ under its lock. Without --json each outcome is
    summed up as it comes; with it, one document at the end: {"changed", "dmzs": [...]} and, on a
    failure, "error" (one line) and "exit_code" too, with that exit code. The top "changed" is
    whether anything on the host changed (another DMZ's table refreshed included)."""
    talk = say_err if as_json else say
    outcomes = []

    def one(virt, dmz):
        outcome = work(virt, dmz, talk)
        outcomes.append(outcome)
        if not as_json:
            print_outcome(outcome, verb)

    def action():
        if before is not None:
            before()
        each_dmz(settings, configs, one, say=talk)

    if not as_json:
        return run(action, settings.debug)
    document = {"changed": False, "dmzs": outcomes}
    try:
        action()
    except KeyboardInterrupt:
        document.update(error="interrupted", exit_code=130)
    except Exception as error:
        known = _known(error, settings.debug)
        if known is None:
            raise
        document.update(error=one_line(known), exit_code=known.exit_code)
    document.update(changed=any(o.changed or o.refreshed for o in outcomes), dmzs=[o.to_dict() for o in outcomes])
    typer.echo(json.dumps(document, indent=2))
    if "exit_code" in document:
        raise typer.Exit(code=document["exit_code"])


def one_line(error: DmzctlError) -> str:
    """A config error's problems joined on one line; any other error's first line."""
    if isinstance(error, ConfigError):
        return "; ".join(error.problems)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_configs(paths: Optional[list[Path]]) -> list[DMZ]:
    if not paths:
        paths = default_config_paths()
        if not paths:
            raise ConfigError([f"{DEFAULT_CONFIG_DIR}: no *.toml files; give a config file on the command line"])
    return load_all(list(paths))


VmOpt = Annotated[Optional[list[str]], typer.Option("--vm", help="Only this VM (repeatable)")]


def say(message: str) -> None:
    typer.echo(message)


def say_err(message: str) -> None:
    typer.echo(message, err=True)


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


def each_dmz(settings: Settings, configs, work, say=say):
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
