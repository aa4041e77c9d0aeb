"""Commands that look and prove: validate, render, status, explain, verify, plan, check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ConfigError
from . import (ConfigArgs, ConnectOpt, VmOpt, _one_dmz, app, load_configs, print_reports, run, say, say_err,
               settings_of)


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
    from ..host.facts import host_view
    from ..implicit import HostView
    from ..render_cli import render_text

    def show():
        view = HostView() if offline else host_view()
        typer.echo(render_text(load_configs(configs), what, virt_type, view), nl=False)

    run(show, settings_of(ctx).debug)


@app.command()
def status(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    connect: ConnectOpt = None,
) -> None:
    """Network, firewall, hooks and VMs of each DMZ against its config; exit 0 only when all is as
    configured."""
    from ..host.virt import Virt
    from ..ops.inspect import dmz_status, format_status

    settings = settings_of(ctx, connect)

    def action():
        dmzs = load_configs(configs)
        with Virt(settings.uri) as virt:
            statuses = [dmz_status(virt, dmz, settings) for dmz in dmzs]
        print_reports(statuses, as_json, "\n".join(format_status(s) for s in statuses) + "\n",
                      ok=all(s.ok for s in statuses))

    run(action, settings.debug)


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
    resolved: Annotated[Optional[list[str]], typer.Option(
        "--resolved", help="A DNS name the VM looked up through the gateway, whose answer held --to "
                           "(an egress allowlist by name; repeatable)")] = None,
    host_address: Annotated[Optional[list[str]], typer.Option(
        "--host-address", help="An address of this host besides the gateways (repeatable)")] = None,
    no_read_host: Annotated[bool, typer.Option(
        "--no-read-host", help="Do not read the host's addresses, networks and br_netfilter state")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Say whether a flow from the DMZ would be allowed and which rule decides; sends nothing."""
    from ..explain import explain as explain_flow, format_decision, make_flow

    def action():
        dmz = _one_dmz(configs)
        flow = make_flow(dmz, source, target, proto, icmp_type, outside, flood, tuple(resolved or ()))
        hosts, bridge_netfilter, blocks = list(host_address or []), None, None
        if not no_read_host:
            from ..host.facts import host_view
            from ..implicit import blocks_for
            from ..verify import read_bridge_netfilter, read_host_addresses

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
    from_outside: Annotated[bool, typer.Option(
        "--from-outside", help="Probe the inbound edge instead: published ports and a sample of unpublished "
                               "ones, from a namespace outside the DMZ routed by the host (--address/--address6: "
                               "its source, default 198.18.255.254 / 2001:db8:ffff::fe)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Prove the isolation with real packets from a temporary namespace on the DMZ bridge (exit 0 only
    when every probe matched the policy)."""
    from ..host.lock import dmz_lock
    from ..verify import format_report, verify as verify_dmz

    settings = settings_of(ctx)

    def action():
        if timeout <= 0 or timeout > 60:
            raise ConfigError(["--timeout: must be more than 0 and at most 60 seconds"])
        reports = []
        for dmz in load_configs(configs):
            with dmz_lock(settings.run_dir, dmz.name, say=say_err if as_json else say):
                quiet = (lambda m: None) if as_json else say
                if from_outside:
                    from ..verify.outside import verify_outside

                    reports.append(verify_outside(dmz, address=address, address6=address6, timeout=timeout,
                                                  skip=skip or [], say=quiet))
                    continue
                reports.append(verify_dmz(dmz, target or [], skip or [], address=address, address6=address6,
                                          timeout=timeout, say=quiet))
            _keep(reports[-1], settings)
        print_reports(reports, as_json, "".join(format_report(r) for r in reports), ok=all(r.ok for r in reports))

    run(action, settings.debug)


def _keep(report, settings) -> None:
    """The run's results, for `dmzctl report` and monitoring; failing to keep them fails no proof."""
    from ..errors import HostError
    from ..verify.record import record

    try:
        record(report, settings.state_dir)
    except HostError as error:
        typer.echo(f"dmzctl: warning: {error}", err=True)


@app.command()
def plan(
    ctx: typer.Context,
    configs: ConfigArgs = None,
    vm: VmOpt = None,
    restart_changed: Annotated[bool, typer.Option(
        "--restart-changed", help="Plan as for `up --restart-changed`")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    config_path: Annotated[Optional[Path], typer.Option(
        "--config-path", help="Plan as though the one config file given were at this path (where a "
                              "tool such as Ansible is about to write it)")] = None,
    connect: ConnectOpt = None,
) -> None:
    """What `up` would change, as a diff (decided as `up` decides it); changes nothing."""
    from dataclasses import replace

    from ..host.virt import Virt
    from ..ops.plan import compute, format_plan

    settings = settings_of(ctx, connect)

    def action():
        dmzs = load_configs(configs)
        if config_path is not None:
            dmzs = [replace(_one_dmz(configs), source=config_path.resolve())]
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
    from ..host.virt import Virt
    from ..ops.inspect import check_dmz, fix as fix_dmz, format_check, summary

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
