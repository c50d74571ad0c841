"""`tollgate meter`: the host agent, one per host (SPEC 6)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import typer

from infra.settings import Settings
from tollgate import logs

HELP = """Meter this host: network bytes (LAN/WAN, in/out, per workload namespace or per host),
CPU, memory and GPU time of the workloads in the spool directory; obey termination commands.

Workloads are made known by a JSON file each in STATE_DIR/workloads (see
services/meter/spool.py for its fields). The state directory keeps the epoch, so a restart
continues counting where it stopped; only a reboot or a recreated chain starts a new epoch.
"""


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/tollgate/meter")
    return Path.home() / ".local/state/tollgate/meter"


def register(app: typer.Typer) -> None:
    @app.command(help=HELP)
    def meter(
        host: str | None = typer.Option(
            None, help="host name (default: TOLLGATE_HOST or hostname)"
        ),
        state_dir: Path = typer.Option(
            None,
            envvar="TOLLGATE_METER_STATE_DIR",
            show_default="/var/lib/tollgate/meter as root",
            help="where the epoch, seq, baselines and the workload spool live",
        ),
        interval: float = typer.Option(10.0, min=0.05, help="seconds between samples"),
        lan_cidr: list[str] = typer.Option(
            [],
            envvar="TOLLGATE_LAN_CIDRS",
            help="a network counted as LAN (repeatable or comma-separated; default: SPEC 6 list)",
        ),
        chain_prefix: str = typer.Option("TOLLGATE", help="name prefix of our iptables chains"),
        host_network: bool = typer.Option(
            True, help="count the host's own traffic (INPUT/OUTPUT), beside workload namespaces"
        ),
        host_subject: str | None = typer.Option(
            None, help="who the host's traffic is charged to (default: host name)"
        ),
        host_workload: str | None = typer.Option(
            None, help="workload id of the host's traffic (default: host name)"
        ),
        host_interface: list[str] = typer.Option(
            [], help="count host traffic on these interfaces only (default: all but lo and tgw*)"
        ),
        iptables: bool = typer.Option(True, help="meter network bytes with iptables/ip6tables"),
        cgroup_net: str = typer.Option(
            "auto",
            help="network bytes of workloads without a netns, by their cgroup: auto (eBPF, "
            "else the iptables cgroup match, egress only), bpf, iptables or off",
        ),
        gpu: bool = typer.Option(True, help="meter GPU time through NVML when present"),
    ) -> None:
        from services.meter.agent import AgentOptions, MeterAgent
        from services.meter.cgroupnet import CHOICES
        from services.meter.gpu import open_gpus
        from tollgate.commands.run import checked_seed_file, lan_list

        if cgroup_net not in CHOICES:
            raise typer.BadParameter(
                f"{cgroup_net!r} is not one of {', '.join(CHOICES)}", param_hint="--cgroup-net"
            )

        logs.configure()
        logging.getLogger("infra.bus").setLevel(logging.ERROR)
        settings = Settings().with_endpoints()
        if not settings.nats_url:
            typer.echo(
                "tollgate meter: Tollgate does not know where NATS is. Start the stack with "
                f"`tollgate up` (it writes {settings.endpoints_file}), or set TOLLGATE_NATS_URL.",
                err=True,
            )
            raise typer.Exit(2)
        options = AgentOptions(
            nats_url=settings.nats_url,
            prefix=settings.prefix,
            host=host or settings.host or socket.gethostname(),
            state_dir=state_dir or _default_state_dir(),
            interval=interval,
            lan=lan_list(lan_cidr),
            chain_prefix=chain_prefix,
            host_network=host_network,
            host_subject=host_subject,
            host_workload=host_workload,
            host_interfaces=tuple(host_interface),
            iptables=iptables,
            cgroup_net=cgroup_net,
            nats_seed_file=checked_seed_file(settings),
        )
        typer.echo(
            f"tollgate meter: metering {options.host} every {interval:g} s; workloads are "
            f"read from {options.state_dir / 'workloads'}",
            err=True,
        )

        async def main() -> None:
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: state saved, chains kept
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            await MeterAgent(options, gpus=open_gpus() if gpu else None).run(stop)

        asyncio.run(main())
