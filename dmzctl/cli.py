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


VmOpt = Annotated[Optional[list[str]], typer.Option("--vm", help="Only this VM (repeatable)")]


def say(message: str) -> None:
    typer.echo(message)


def print_outcome(outcome, verb: str) -> None:
    if not outcome.changes and not outcome.pending:
        typer.echo(f"{outcome.dmz}: {verb}: nothing to change")
        return
    for pending in outcome.pending:
        typer.echo(f"{outcome.dmz}: PENDING: {pending}")


def each_dmz(configs, connect, work):
    """Run work(virt, dmz) for each DMZ under its lock, with one libvirt connection."""
    from .host.virt import Virt
    from .lifecycle import dmz_lock

    dmzs = load_configs(configs)
    with Virt(resolve_uri(connect)) as virt:
        for dmz in dmzs:
            with dmz_lock(dmz.name, say=say):
                work(virt, dmz)


@app.command()
def up(
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    restart_changed: Annotated[bool, typer.Option(
        "--restart-changed", help="Restart running VMs whose definition changed")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Bring DMZs up: network, filters, firewall, then the VMs (never a VM without its firewall)."""
    from . import lifecycle

    run(lambda: each_dmz(configs, connect, lambda virt, dmz: print_outcome(
        lifecycle.up(virt, dmz, vm, restart_changed, say=say), "up")))


@app.command()
def down(
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Seconds of ACPI grace before destroy (default: each VM's shutdown_timeout)")] = None,
    keep_network: Annotated[bool, typer.Option(
        "--keep-network", help="Stop the VMs but keep network, filters and firewall")] = False,
    connect: ConnectOpt = None,
) -> None:
    """ACPI shutdown of the VMs (destroy after the timeout), then remove what dmzctl created."""
    from . import lifecycle

    if timeout is not None and timeout < 0:
        run(lambda: (_ for _ in ()).throw(ConfigError(["--timeout: must be 0 or more seconds"])))
    run(lambda: each_dmz(configs, connect, lambda virt, dmz: print_outcome(
        lifecycle.down(virt, dmz, vm, timeout, keep_network, say=say), "down")))


@app.command()
def restart(
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="ACPI grace in seconds")] = None,
    connect: ConnectOpt = None,
) -> None:
    """Stop the VMs gracefully (network and firewall stay up) and start them again."""
    from . import lifecycle

    def work(virt, dmz):
        print_outcome(lifecycle.down(virt, dmz, vm, timeout, keep_network=True, say=say), "stop")
        print_outcome(lifecycle.up(virt, dmz, vm, say=say), "start")

    run(lambda: each_dmz(configs, connect, work))


@app.command()
def kill(configs: ConfigArgs = None, vm: VmOpt = None, connect: ConnectOpt = None) -> None:
    """Destroy the VMs now, without waiting for the guest (the original's forcekill)."""
    from . import lifecycle

    run(lambda: each_dmz(configs, connect, lambda virt, dmz: print_outcome(
        lifecycle.kill(virt, dmz, vm, say), "kill")))


@app.command()
def status(
    configs: ConfigArgs = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Network, firewall and VMs of each DMZ against its config; exit 0 only when all is as configured."""
    from .host.virt import Virt
    from .status import dmz_status, format_status

    def action():
        dmzs = load_configs(configs)
        with Virt(resolve_uri(connect)) as virt:
            statuses = [dmz_status(virt, dmz) for dmz in dmzs]
        if as_json:
            typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
        else:
            typer.echo("\n".join(format_status(s) for s in statuses))
        if not all(s.ok for s in statuses):
            raise typer.Exit(code=1)

    run(action)


@app.command()
def console(
    name: Annotated[str, typer.Argument(help="VM name")],
    connect: ConnectOpt = None,
) -> None:
    """Attach to a VM's serial console (as `virsh console`; leave with Ctrl+]).""" 
    import shutil

    from .host.virt import Virt, owner_of

    def action():
        uri = resolve_uri(connect)
        with Virt(uri) as virt:
            dom = virt.domain(name)
            if dom is None:
                raise DmzctlError(f"no VM named {name!r}")
            if owner_of(virt.domain_xml(dom, inactive=False)) is None:
                raise DmzctlError(f"VM {name!r} is not a dmzctl VM; use virsh console")
        virsh = shutil.which("virsh")
        if virsh is None:
            raise DmzctlError("virsh is needed for the console: apt-get install libvirt-clients")
        os.execv(virsh, [virsh, "-c", uri, "console", name])

    run(action)


@firewall_app.command("up")
def firewall_up(configs: ConfigArgs = None) -> None:
    """Apply each DMZ's nftables table (one atomic transaction)."""
    from . import lifecycle
    from .lifecycle import dmz_lock

    def action():
        for dmz in load_configs(configs):
            with dmz_lock(dmz.name, say=say):
                print_outcome(lifecycle.firewall_up(dmz, say), "firewall up")

    run(action)


@firewall_app.command("down")
def firewall_down(
    configs: ConfigArgs = None,
    force: Annotated[bool, typer.Option("--force", help="Even while the DMZ's VMs run")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Remove each DMZ's nftables table (refused while its VMs run, unless --force)."""
    from . import lifecycle

    def work(virt, dmz):
        print_outcome(lifecycle.firewall_down(virt, dmz, force, say=lambda m: typer.echo(m, err=True)),
                      "firewall down")

    run(lambda: each_dmz(configs, connect, work))


@firewall_app.command("show")
def firewall_show(configs: ConfigArgs = None) -> None:
    """Print each DMZ's live nftables table (exit 1 if one is absent)."""
    from .host import nft
    from .render.nft import table_name

    def action():
        missing = False
        for dmz in load_configs(configs):
            text = nft.list_table_text(table_name(dmz))
            if text is None:
                typer.echo(f"{dmz.name}: firewall table inet {table_name(dmz)} is absent")
                missing = True
            else:
                typer.echo(text, nl=False)
        if missing:
            raise typer.Exit(code=1)

    run(action)


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
