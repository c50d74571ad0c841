"""`tollgate run --subject alice -- CMD ...`: run one command, metered (SPEC 5)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import typer
from pydantic import ValidationError

from contracts._base import utcnow
from contracts.workloads import Resources, WorkloadStarted
from infra.bus import CredentialsError, seed_public_key
from infra.settings import Settings
from services.meter.addresses import V4_POOL, V6_POOL, Pools
from services.meter.domain import EXIT_NO_SERVERS, new_workload_id, parse_size
from services.meter.netrules import LanList, RuleError
from services.meter.run import RunOptions, run_workload

HELP = """Run CMD metered: ask for a spawn decision, pass its output through, report usage.

Exits with CMD's status (128+N if signal N killed it, or if Tollgate terminated it: a
termination command for this workload, or --log-quota-per-hour; the reason is printed), or
without running CMD: 2 when NATS is unknown, 3 when the spawn was denied, 4 when
--fail-closed and no decision came, 5 when --netns could not make the namespace.
"""


def lan_list(cidrs: list[str]) -> LanList:
    """The LAN networks from repeated/comma-separated options, or SPEC 6's default list."""
    texts = [t for c in cidrs for t in c.split(",") if t.strip()]
    try:
        return LanList.parse(texts) if texts else LanList.default()
    except RuleError as exc:
        raise typer.BadParameter(str(exc), param_hint="--lan-cidr") from None


def _configure_logging() -> None:
    # Our lines share the terminal with the command's output: short, prefixed, warnings up.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tollgate: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(os.environ.get("TOLLGATE_LOG_LEVEL", "WARNING").upper())
    # The meter reports an outage once; these would repeat it on every reconnect attempt.
    logging.getLogger("infra.bus").setLevel(logging.ERROR)
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)


def _resources(cpus: str | None, mem: str | None, gpus: int) -> Resources:
    try:
        cpu_count = Decimal(cpus) if cpus else Decimal(0)
    except InvalidOperation:
        raise typer.BadParameter(f"{cpus!r} is not a number", param_hint="--cpus") from None
    try:
        mem_bytes = parse_size(mem) if mem else 0
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mem") from None
    try:
        return Resources(cpus=cpu_count, mem_bytes=mem_bytes, gpus=gpus)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise typer.BadParameter(error["msg"], param_hint=f"--{error['loc'][0]}") from None


def _check_names(options: RunOptions) -> None:
    # The same models the wire uses, so a bad name fails here and not halfway through a run.
    try:
        WorkloadStarted(
            workload=options.workload,
            subject=options.subject,
            host=options.host,
            groups=list(options.groups),
            resources=options.resources,
            started_at=utcnow(),
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise typer.BadParameter(f"{where}: {error['msg']}") from None


def checked_seed_file(settings: Settings) -> Path | None:
    """TOLLGATE_NATS_NKEY_SEED_FILE, checked before anything runs."""
    if settings.nats_nkey_seed_file is not None:
        try:
            seed_public_key(settings.nats_nkey_seed_file)
        except CredentialsError as exc:
            typer.echo(f"tollgate: not running anything: {exc}", err=True)
            raise typer.Exit(EXIT_NO_SERVERS) from None
    return settings.nats_nkey_seed_file


def register(app: typer.Typer) -> None:
    @app.command(
        help=HELP,
        context_settings={"allow_interspersed_args": False},
        no_args_is_help=True,
    )
    def run(
        cmd: list[str] = typer.Argument(..., metavar="CMD", show_default=False),
        subject: str = typer.Option(..., "--subject", "-s", help="who is charged, e.g. alice"),
        workload: str | None = typer.Option(None, help="workload id (default: run-<random>)"),
        host: str | None = typer.Option(
            None, help="host name (default: TOLLGATE_HOST or hostname)"
        ),
        cpus: str | None = typer.Option(None, help="CPUs allocated, e.g. 2 or 0.5"),
        mem: str | None = typer.Option(None, help="memory allocated, e.g. 4GiB or 512MB"),
        gpus: int = typer.Option(0, min=0, help="GPUs allocated"),
        group: list[str] = typer.Option([], help="a group the subject belongs to (repeatable)"),
        interval: float = typer.Option(10.0, min=0.05, help="seconds between usage reports"),
        fail_closed: bool = typer.Option(
            False, "--fail-closed", help="do not run CMD when no spawn decision arrives (exit 4)"
        ),
        cgroup: bool = typer.Option(
            True, help="measure CPU in a cgroup of its own when possible (else process tree)"
        ),
        spawn_timeout: float = typer.Option(
            2.0, min=0.1, help="seconds to wait for a spawn decision"
        ),
        flush_timeout: float = typer.Option(
            10.0, min=0, help="seconds to keep trying to deliver the final report"
        ),
        netns: bool = typer.Option(
            False,
            "--netns",
            help="run CMD in a network namespace of its own, NATed to the host, so its LAN "
            "and WAN bytes in and out are counted (needs root)",
        ),
        cgroup_net: bool = typer.Option(
            True,
            help="without --netns: count CMD's LAN and WAN bytes by its cgroup (eBPF both "
            "ways; else iptables, what it sends only; needs root and cgroup v2)",
        ),
        lan_cidr: list[str] = typer.Option(
            [],
            envvar="TOLLGATE_LAN_CIDRS",
            help="a network counted as LAN (repeatable or comma-separated; default: private, "
            "link-local, loopback and CGNAT ranges); everything else is WAN",
        ),
        log_quota_per_hour: str = typer.Option(
            "0",
            help="kill CMD once it logs more than this in one hour of its run, e.g. 50MB "
            "(counted after ANSI stripping; 0 disables)",
        ),
        netns_pool_v4: str = typer.Option(V4_POOL, help="IPv4 addresses for --netns"),
        netns_pool_v6: str = typer.Option(V6_POOL, help="IPv6 addresses for --netns"),
    ) -> None:
        _configure_logging()
        resources = _resources(cpus, mem, gpus)
        lan = lan_list(lan_cidr)
        try:
            quota = parse_size(log_quota_per_hour)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--log-quota-per-hour") from None
        try:
            pools = Pools.parse(netns_pool_v4, netns_pool_v6)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--netns-pool-v4/v6") from None
        settings = Settings().with_endpoints()
        if not settings.nats_url:
            typer.echo(
                "tollgate: not running anything: Tollgate does not know where NATS is. Start the "
                f"stack with `tollgate up` (it writes {settings.endpoints_file}), or set "
                "TOLLGATE_NATS_URL.",
                err=True,
            )
            raise typer.Exit(EXIT_NO_SERVERS)
        options = RunOptions(
            nats_url=settings.nats_url,
            prefix=settings.prefix,
            subject=subject,
            host=host or settings.host or socket.gethostname(),
            workload=workload or new_workload_id(),
            resources=resources,
            groups=tuple(group),
            interval=interval,
            fail_closed=fail_closed,
            use_cgroup=cgroup,
            cgroup_net=cgroup_net,
            spawn_timeout=spawn_timeout,
            flush_timeout=flush_timeout,
            netns=netns,
            lan=lan,
            pools=pools,
            log_quota_per_hour=quota,
            nats_seed_file=checked_seed_file(settings),
        )
        _check_names(options)
        try:
            status = asyncio.run(run_workload(cmd, options))
        except KeyboardInterrupt:  # before the command started; after, the child decides
            status = 128 + signal.SIGINT
        raise typer.Exit(status)
