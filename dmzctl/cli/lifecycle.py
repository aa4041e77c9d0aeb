"""Commands that change a DMZ: up, down, destroy, restart, kill, console, firewall up|down|show."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import ConfigError, DmzctlError
from . import (ConfigArgs, ConnectOpt, JsonOpt, VmOpt, app, each_dmz, firewall_app, load_configs, print_outcome, run,
               run_outcomes, say, settings_of)


@app.command()
def up(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    restart_changed: Annotated[bool, typer.Option(
        "--restart-changed", help="Restart running VMs whose definition changed")] = False,
    no_hooks: Annotated[bool, typer.Option(
        "--no-hooks", help="Do not install libvirt's hooks (then virsh or virt-manager can start a VM "
                           "without its firewall table; status and check report it)")] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring DMZs up: hooks, network, filters, firewall, then the VMs (never a VM without its firewall)."""
    from ..ops import lifecycle

    settings = settings_of(ctx, connect)
    run_outcomes(settings, configs, as_json, "up", lambda virt, dmz, talk: lifecycle.up(
        virt, dmz, settings, vm, restart_changed, say=talk, hooks=not no_hooks))


TimeoutOpt = Annotated[Optional[float], typer.Option(
    "--timeout", help="Seconds of ACPI grace before destroy (default: each VM's shutdown_timeout)")]


def _check_timeout(timeout: Optional[float]) -> None:
    if timeout is not None and timeout < 0:
        raise ConfigError(["--timeout: must be 0 or more seconds"])


@app.command()
def down(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: TimeoutOpt = None,
    keep_network: Annotated[bool, typer.Option(
        "--keep-network", help="Stop the VMs but keep network and firewall up")] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Halt: ACPI shutdown of the VMs (destroy after the timeout), stop the network, remove the firewall.
    The definitions stay (virt-manager shows the VMs "Shut off"); `destroy` removes them."""
    from ..ops import lifecycle

    settings = settings_of(ctx, connect)
    run_outcomes(settings, configs, as_json, "down", lambda virt, dmz, talk: lifecycle.down(
        virt, dmz, settings, vm, timeout, keep_network, say=talk), before=lambda: _check_timeout(timeout))


@app.command()
def destroy(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: TimeoutOpt = None,
    delete_volumes: Annotated[bool, typer.Option(
        "--delete-volumes", help="Also delete the volumes dmzctl made for these VMs (their data: gone)")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", help="Do not ask before deleting volumes (needed without a terminal)")] = False,
    connect: ConnectOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Halt as `down` does, then remove the definitions: VMs, nwfilters, network (all of the DMZ, or
    only --vm's). Volumes are kept unless --delete-volumes."""
    from ..ops import teardown

    settings = settings_of(ctx, connect)

    def before():
        _check_timeout(timeout)
        if delete_volumes and not yes:
            for dmz in load_configs(configs):  # every DMZ asked before any is touched
                confirm_volume_deletion(dmz, vm)

    run_outcomes(settings, configs, as_json, "destroy", lambda virt, dmz, talk: teardown.destroy(
        virt, dmz, settings, vm, timeout, delete_volumes, say=talk), before=before)


def confirm_volume_deletion(dmz, only: Optional[list[str]]) -> None:
    """Data goes only on an explicit word: --yes, or 'yes' typed at a terminal."""
    import sys

    from ..ops.common import selected_vms
    from ..ops.teardown import volumes_to_delete

    names = selected_vms(dmz, only) if only else [v.name for v in dmz.vms]
    volumes = [f"{pool}/{name}" for pool, name in volumes_to_delete(dmz, names)]
    if not volumes:
        return
    if not sys.stdin.isatty():
        raise DmzctlError(f"DMZ {dmz.name}: --delete-volumes deletes {', '.join(volumes)}; "
                          f"without a terminal, add --yes to confirm")
    answer = typer.prompt(f"Delete {', '.join(volumes)} (their data is lost)? Type yes", default="no")
    if answer.strip().lower() != "yes":
        raise DmzctlError(f"DMZ {dmz.name}: not confirmed; nothing was destroyed")


@app.command()
def restart(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="ACPI grace in seconds")] = None,
    connect: ConnectOpt = None,
) -> None:
    """Stop the VMs gracefully (network and firewall stay up) and start them again."""
    from ..ops import lifecycle

    settings = settings_of(ctx, connect)

    def work(virt, dmz):
        stopped, started = lifecycle.restart(virt, dmz, settings, vm, timeout, say=say)
        print_outcome(stopped, "stop")
        print_outcome(started, "start")

    run(lambda: each_dmz(settings, configs, work), settings.debug)


@app.command()
def kill(ctx: typer.Context, configs: ConfigArgs = None, vm: VmOpt = None, connect: ConnectOpt = None,
         as_json: JsonOpt = False) -> None:
    """Destroy the VMs now, without waiting for the guest (the original's forcekill)."""
    from ..ops import lifecycle

    settings = settings_of(ctx, connect)
    run_outcomes(settings, configs, as_json, "kill", lambda virt, dmz, talk: lifecycle.kill(
        virt, dmz, settings, vm, talk))


@app.command()
def console(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="VM name")],
    connect: ConnectOpt = None,
) -> None:
    """Attach to a VM's serial console (as `virsh console`; leave with Ctrl+])."""
    from ..host.console import attach
    from ..host.virt import Virt

    settings = settings_of(ctx, connect)

    def action():
        with Virt(settings.uri) as virt:
            if virt.domain_info(name) is None:
                raise DmzctlError(f"no VM named {name!r}")
            if virt.live_domain_owner(name) is None:
                raise DmzctlError(f"VM {name!r} is not a dmzctl VM; use virsh console")
        raise typer.Exit(code=attach(settings.uri, name))

    run(action, settings.debug)


@firewall_app.command("up")
def firewall_up(ctx: typer.Context, configs: ConfigArgs = None) -> None:
    """Apply each DMZ's nftables table (one atomic transaction)."""
    from ..host.lock import dmz_lock
    from ..ops import lifecycle

    settings = settings_of(ctx)

    def action():
        for dmz in load_configs(configs):
            with dmz_lock(settings.run_dir, dmz.name, say=say):
                print_outcome(lifecycle.firewall_up(dmz, settings, say), "firewall up")

    run(action, settings.debug)


@firewall_app.command("down")
def firewall_down(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    force: Annotated[bool, typer.Option("--force", help="Even while the DMZ's VMs run")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Remove each DMZ's nftables table (refused while its VMs run, unless --force)."""
    from ..ops import lifecycle

    settings = settings_of(ctx, connect)

    def work(virt, dmz):
        print_outcome(lifecycle.firewall_down(virt, dmz, settings, force, say=lambda m: typer.echo(m, err=True)),
                      "firewall down")

    run(lambda: each_dmz(settings, configs, work), settings.debug)


@firewall_app.command("show")
def firewall_show(ctx: typer.Context, configs: ConfigArgs = None) -> None:
    """Print each DMZ's live nftables table and its backstop (exit 1 if one is absent)."""
    from ..host import nft
    from ..render.nft import table_name

    def action():
        missing = False
        for dmz in load_configs(configs):
            text = nft.list_firewall_text(table_name(dmz))
            if text is None:
                typer.echo(f"{dmz.name}: firewall table inet {table_name(dmz)} is absent")
                missing = True
            else:
                typer.echo(text, nl=False)
        if missing:
            raise typer.Exit(code=1)

    run(action, settings_of(ctx).debug)
