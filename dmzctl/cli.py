"""The command line: Typer commands that parse options, call plain modules, and turn
DmzctlError into one line on stderr and an exit code. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import DEFAULT_CONFIG_DIR, DMZ, default_config_paths, load_all
from .errors import ConfigError, DmzctlError, HostError
from .settings import Settings

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
        from .host.virt import describe

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


@app.command()
def validate(ctx: typer.Context, configs: ConfigArgs = None) -> None:
    """Check config files; print every problem, one line each (exit 2 if any)."""

    def action():
        for dmz in load_configs(configs):
            typer.echo(f"{dmz.source}: ok (DMZ {dmz.name}, {len(dmz.vms)} VM(s), "
                       f"{len(dmz.protected)} protected subnet(s), {len(dmz.holes)} hole(s))")

    run(action, settings_of(ctx).debug)


@app.command()
def render(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    what: Annotated[str, typer.Option(
        "--what", help="network | nwfilter | nft | domain:NAME | all")] = "all",
    virt_type: Annotated[Optional[str], typer.Option(
        "--virt-type", help="Render domains as kvm or qemu (default: qemu; `up` asks the host)")] = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Leave the host's networks out (they are read-only looked at otherwise)")] = False,
) -> None:
    """Print what `up` would apply, touching nothing."""
    from .host.facts import host_view
    from .implicit import HostView
    from .render_cli import render_text

    def show():
        view = HostView() if offline else host_view()
        typer.echo(render_text(load_configs(configs), what, virt_type, view), nl=False)

    run(show, settings_of(ctx).debug)


VmOpt = Annotated[Optional[list[str]], typer.Option("--vm", help="Only this VM (repeatable)")]


def say(message: str) -> None:
    typer.echo(message)


def print_outcome(outcome, verb: str) -> None:
    from .ops.lifecycle import summary_lines

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
    from .host.lock import dmz_lock
    from .host.virt import Virt

    dmzs = load_configs(configs)
    with Virt(settings.uri) as virt:
        for dmz in dmzs:
            with dmz_lock(settings.run_dir, dmz.name, say=say):
                work(virt, dmz)


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
) -> None:
    """Bring DMZs up: hooks, network, filters, firewall, then the VMs (never a VM without its firewall)."""
    from .ops import lifecycle

    settings = settings_of(ctx, connect)
    run(lambda: each_dmz(settings, configs, lambda virt, dmz: print_outcome(
        lifecycle.up(virt, dmz, settings, vm, restart_changed, say=say, hooks=not no_hooks), "up")),
        settings.debug)


@app.command()
def down(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Seconds of ACPI grace before destroy (default: each VM's shutdown_timeout)")] = None,
    keep_network: Annotated[bool, typer.Option(
        "--keep-network", help="Stop the VMs but keep network, filters and firewall")] = False,
    connect: ConnectOpt = None,
) -> None:
    """ACPI shutdown of the VMs (destroy after the timeout), then remove what dmzctl created."""
    from .ops import lifecycle

    settings = settings_of(ctx, connect)

    def action():
        if timeout is not None and timeout < 0:
            raise ConfigError(["--timeout: must be 0 or more seconds"])
        each_dmz(settings, configs, lambda virt, dmz: print_outcome(
            lifecycle.down(virt, dmz, settings, vm, timeout, keep_network, say=say), "down"))

    run(action, settings.debug)


@app.command()
def restart(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="ACPI grace in seconds")] = None,
    connect: ConnectOpt = None,
) -> None:
    """Stop the VMs gracefully (network and firewall stay up) and start them again."""
    from .ops import lifecycle

    settings = settings_of(ctx, connect)

    def work(virt, dmz):
        stopped, started = lifecycle.restart(virt, dmz, settings, vm, timeout, say=say)
        print_outcome(stopped, "stop")
        print_outcome(started, "start")

    run(lambda: each_dmz(settings, configs, work), settings.debug)


@app.command()
def kill(ctx: typer.Context, configs: ConfigArgs = None, vm: VmOpt = None, connect: ConnectOpt = None) -> None:
    """Destroy the VMs now, without waiting for the guest (the original's forcekill)."""
    from .ops import lifecycle

    settings = settings_of(ctx, connect)
    run(lambda: each_dmz(settings, configs, lambda virt, dmz: print_outcome(
        lifecycle.kill(virt, dmz, settings, vm, say), "kill")), settings.debug)


@app.command()
def status(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Network, firewall, hooks and VMs of each DMZ against its config; exit 0 only when all is as
    configured."""
    from .host.virt import Virt
    from .ops.inspect import dmz_status, format_status

    settings = settings_of(ctx, connect)

    def action():
        dmzs = load_configs(configs)
        with Virt(settings.uri) as virt:
            statuses = [dmz_status(virt, dmz, settings) for dmz in dmzs]
        print_reports(statuses, as_json, "\n".join(format_status(s) for s in statuses) + "\n",
                      ok=all(s.ok for s in statuses))

    run(action, settings.debug)


@app.command()
def console(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="VM name")],
    connect: ConnectOpt = None,
) -> None:
    """Attach to a VM's serial console (as `virsh console`; leave with Ctrl+])."""
    from .host.console import attach
    from .host.virt import Virt

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
    from .host.lock import dmz_lock
    from .ops import lifecycle

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
    from .ops import lifecycle

    settings = settings_of(ctx, connect)

    def work(virt, dmz):
        print_outcome(lifecycle.firewall_down(virt, dmz, settings, force, say=lambda m: typer.echo(m, err=True)),
                      "firewall down")

    run(lambda: each_dmz(settings, configs, work), settings.debug)


@firewall_app.command("show")
def firewall_show(ctx: typer.Context, configs: ConfigArgs = None) -> None:
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

    run(action, settings_of(ctx).debug)


def _one_dmz(configs):
    dmzs = load_configs(configs)
    if len(dmzs) != 1:
        raise ConfigError([f"{len(dmzs)} DMZs configured ({', '.join(d.name for d in dmzs)}); "
                           f"give the one config file to use"])
    return dmzs[0]


@app.command()
def explain(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    source: Annotated[str, typer.Option("--from", help="A VM of the DMZ, or an address")] = ...,
    target: Annotated[str, typer.Option("--to", help="ADDR, ADDR:PORT or [IPv6]:PORT")] = ...,
    proto: Annotated[Optional[str], typer.Option(
        "--proto", help="tcp | udp | sctp | icmp | icmpv6 | gre | a number (default: tcp with a port)")] = None,
    icmp_type: Annotated[Optional[int], typer.Option("--icmp-type", help="ICMP/ICMPv6 type number")] = None,
    outside: Annotated[bool, typer.Option(
        "--outside", help="--from is beyond the DMZ (LAN, internet), not a forged source inside it")] = False,
    flood: Annotated[bool, typer.Option(
        "--flood", help="The sending VM is over its caps (max_new_flows, max_flows)")] = False,
    host_address: Annotated[Optional[list[str]], typer.Option(
        "--host-address", help="An address of this host besides the gateways (repeatable)")] = None,
    no_read_host: Annotated[bool, typer.Option(
        "--no-read-host", help="Do not read the host's addresses, networks and br_netfilter state")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Say whether a flow from the DMZ would be allowed and which rule decides; sends nothing."""
    from .explain import explain as explain_flow, format_decision, make_flow

    def action():
        dmz = _one_dmz(configs)
        flow = make_flow(dmz, source, target, proto, icmp_type, outside, flood)
        hosts, bridge_netfilter, blocks = list(host_address or []), None, None
        if not no_read_host:
            from .host.facts import host_view
            from .implicit import blocks_for
            from .verify import read_bridge_netfilter, read_host_addresses

            hosts += [str(a) for a in read_host_addresses()]
            bridge_netfilter = read_bridge_netfilter()
            blocks = blocks_for(dmz, host_view())
        try:
            decision = explain_flow(dmz, flow, hosts, bridge_netfilter, blocks)
        except ValueError as error:
            raise ConfigError([f"--host-address: {error}"]) from None
        if as_json:
            typer.echo(json.dumps(dict(decision.to_dict(), dmz=dmz.name, flow=flow.describe()), indent=2))
        else:
            typer.echo(format_decision(dmz, flow, decision), nl=False)

    run(action, settings_of(ctx).debug)


@app.command()
def verify(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    target: Annotated[Optional[list[str]], typer.Option(
        "--target", help="Also probe ADDR[:PORT] (tcp, default 443, and ICMP echo); the only way to test "
                         "egress (repeatable)")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", help="Never probe inside ADDR/PREFIX (repeatable)")] = None,
    address: Annotated[Optional[str], typer.Option(
        "--address", help="The probe's IPv4 DMZ address (default: a free one atop the non-DHCP half)")] = None,
    address6: Annotated[Optional[str], typer.Option("--address6", help="The probe's IPv6 DMZ address")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for each answer")] = 4.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Prove the isolation with real packets from a temporary namespace on the DMZ bridge (exit 0 only
    when every probe matched the policy)."""
    from .host.lock import dmz_lock
    from .verify import format_report, verify as verify_dmz

    settings = settings_of(ctx)

    def action():
        if timeout <= 0 or timeout > 60:
            raise ConfigError(["--timeout: must be more than 0 and at most 60 seconds"])
        reports = []
        for dmz in load_configs(configs):
            with dmz_lock(settings.run_dir, dmz.name, say=say):
                reports.append(verify_dmz(dmz, target or [], skip or [], address=address, address6=address6,
                                          timeout=timeout, say=(lambda m: None) if as_json else say))
        print_reports(reports, as_json, "".join(format_report(r) for r in reports), ok=all(r.ok for r in reports))

    run(action, settings.debug)


# --- drift and boot integration: plan, check, guard, boot, install ---------------

@app.command()
def plan(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    restart_changed: Annotated[bool, typer.Option(
        "--restart-changed", help="Plan as for `up --restart-changed`")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    connect: ConnectOpt = None,
) -> None:
    """What `up` would change, as a diff (decided as `up` decides it); changes nothing."""
    from .host.virt import Virt
    from .ops.plan import compute, format_plan

    settings = settings_of(ctx, connect)

    def action():
        dmzs = load_configs(configs)
        with Virt(settings.uri) as virt:
            plans = [compute(virt, dmz, settings, vm, restart_changed) for dmz in dmzs]
        print_reports(plans, as_json, "".join(format_plan(p) for p in plans))

    run(action, settings.debug)


@app.command()
def check(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    fix: Annotated[bool, typer.Option("--fix", help="Re-apply what drifted (as `up`), then check again")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Compare what is live (network, filters, firewall table, VMs, hooks) with the configs: one line per
    difference, then a one-line summary. Exit 0 in sync, 1 drifted (for cron and monitoring)."""
    from .host.virt import Virt
    from .ops.inspect import check_dmz, fix as fix_dmz, format_check, summary

    settings = settings_of(ctx, connect)

    def action():
        dmzs = load_configs(configs)
        results = []
        with Virt(settings.uri) as virt:
            for dmz in dmzs:
                result = check_dmz(virt, dmz, settings)
                if fix and not result.in_sync:
                    result = fix_dmz(virt, dmz, result, settings, say=lambda m: typer.echo(m, err=True))
                results.append(result)
        line = summary(results, fixed=fix)
        if as_json:
            typer.echo(json.dumps({"summary": line, "in_sync": all(r.in_sync for r in results),
                                   "dmzs": [r.to_dict() for r in results]}, indent=2))
        else:
            for result in results:
                typer.echo(format_check(result))
            typer.echo(line)
        if not all(r.in_sync for r in results):
            raise typer.Exit(code=1)

    run(action, settings.debug)


@app.command()
def guard(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    interval: Annotated[float, typer.Option(
        "--interval", help="Seconds between safety re-checks of every DMZ (events act at once)")] = 60.0,
    no_libvirt: Annotated[bool, typer.Option("--no-libvirt", help="Do not listen to libvirt events")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Watch nftables (nft monitor), the host's addresses and libvirt events; restore a DMZ's firewall
    table the moment it is removed, altered or made stale. Runs until SIGTERM/SIGINT; SIGHUP re-reads the
    configs."""
    from .ops.guard import Guard
    from .ops.lifecycle import require_root

    settings = settings_of(ctx, connect)

    def action():
        require_root()
        if interval < 1:
            raise ConfigError(["--interval: must be at least 1 second"])
        code = Guard(configs, settings, say, interval, use_libvirt=not no_libvirt).run()
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
    from .ops.boot import boot as boot_all

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
    done and what was skipped."""
    from .ops.install import install as install_all
    from .ops.lifecycle import require_root

    def action():
        if hooks_dir == Path("/etc/libvirt/hooks") or unit_dir == Path("/etc/systemd/system"):
            require_root()
        for line in install_all(systemd, hooks, hooks_dir, unit_dir, remove=uninstall).lines:
            typer.echo(line)

    run(action, settings_of(ctx).debug)


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
