"""Commands for the host's services: guard, boot, install."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConfigError
from . import ConfigArgs, ConnectOpt, app, run, say, settings_of


@app.command()
def guard(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    interval: Annotated[float, typer.Option(
        "--interval", help="Seconds between safety re-checks of every DMZ (events act at once)")] = 60.0,
    no_libvirt: Annotated[bool, typer.Option("--no-libvirt", help="Do not listen to libvirt events")] = False,
    metrics: Annotated[Optional[str], typer.Option(
        "--metrics", help="Serve dmzctl metrics' Prometheus metrics on this loopback ADDR:PORT (e.g. 127.0.0.1:9839)",
        metavar="ADDR:PORT")] = None,
    connect: ConnectOpt = None,
) -> None:
    """Watch nftables (nft monitor), the host's addresses and libvirt events; restore a DMZ's firewall
    table the moment it is removed, altered or made stale. Runs until SIGTERM/SIGINT; SIGHUP re-reads the
    configs."""
    from ..ops.guard import Guard
    from ..ops.common import require_root
    from ..ops.metrics import parse_listen

    settings = settings_of(ctx, connect)

    def action():
        listen = parse_listen(metrics) if metrics is not None else None
        require_root()
        if interval < 1:
            raise ConfigError(["--interval: must be at least 1 second"])
        code = Guard(configs, settings, say, interval, use_libvirt=not no_libvirt, metrics=listen).run()
        raise typer.Exit(code=code)

    run(action, settings.debug)


@app.command()
def boot(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    stop: Annotated[bool, typer.Option("--stop", help="Take every DMZ down (the unit's ExecStop)")] = False,
    connect: ConnectOpt = None,
) -> None:
    """What dmzctl.service runs: `up` for every DMZ (each on its own: one failure does not stop the
    others), or `down` with --stop. No config at all is not an error."""
    from ..ops.boot import boot as boot_all

    settings = settings_of(ctx, connect)

    def action():
        code = boot_all(configs, settings, stop, say)
        if code:
            raise typer.Exit(code=code)

    run(action, settings.debug)


@app.command()
def install(
    ctx: typer.Context,
    systemd: Annotated[Optional[bool], typer.Option(
        "--systemd/--no-systemd", help="systemd units (default: only when systemd runs this machine)",
        show_default=False)] = None,
    hooks: Annotated[bool, typer.Option("--hooks/--no-hooks", help="libvirt qemu and network hooks")] = True,
    uninstall: Annotated[bool, typer.Option("--uninstall", help="Remove what install put there")] = False,
    hooks_dir: Annotated[Path, typer.Option("--hooks-dir", help="libvirt's hook directory")] = Path(
        "/etc/libvirt/hooks"),
    unit_dir: Annotated[Path, typer.Option("--unit-dir", help="systemd's unit directory")] = Path(
        "/etc/systemd/system"),
) -> None:
    """Install the boot units (dmzctl.service, dmzctl-guard.service) and the libvirt hooks; say what was
    done and what was skipped. Both name this dmzctl: the units its script, the hooks its interpreter."""
    from ..ops.install import install as install_all
    from ..ops.common import require_root

    def action():
        if hooks_dir == Path("/etc/libvirt/hooks") or unit_dir == Path("/etc/systemd/system"):
            require_root()
        for line in install_all(systemd, hooks, hooks_dir, unit_dir, remove=uninstall).lines:
            typer.echo(line)

    run(action, settings_of(ctx).debug)
