"""`tollgate run`: ask for a spawn decision, run the command, meter it, report (SPEC 5, 6).

Metering is best-effort and never costs the workload anything: NATS may be down at the start,
in the middle or at the end, and the command still runs with its output flowing. Exit codes of
our own (2, 3, 4, 5) are in `domain`; otherwise we return the command's status, or 128 + N
when signal N killed it, by itself or because we terminated it (a termination command of the
policy for this workload, or the local hourly log quota), saying why in one line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from contracts._base import utcnow
from contracts.spawn import SpawnRequest
from contracts.workloads import Resources

from .addresses import Pools
from .child import Output
from .domain import EXIT_DENIED, EXIT_UNCHECKED
from .metered import Metered
from .netrules import LanList
from .publisher import MeterLink, NoDecision

log = logging.getLogger("tollgate.meter")
# Commands are looked for from a little before the run began: host and server clocks differ.
CLOCK_SLACK = timedelta(seconds=30)


@dataclass(frozen=True)
class RunOptions:
    """Who runs what where, and how the meter behaves."""

    nats_url: str
    prefix: str
    subject: str
    host: str
    workload: str
    resources: Resources = field(default_factory=Resources)
    groups: tuple[str, ...] = ()
    interval: float = 10.0
    fail_closed: bool = False
    use_cgroup: bool = True
    cgroup_net: bool = True  # without --netns: network bytes from the run's cgroup
    spawn_timeout: float = 2.0
    flush_timeout: float = 10.0
    netns: bool = False
    lan: LanList = field(default_factory=LanList.default)
    pools: Pools = field(default_factory=Pools)
    log_quota_per_hour: int = 0
    nats_seed_file: Path | None = None  # nkey seed from `tollgate nats-config`


async def run_workload(
    cmd: Sequence[str],
    options: RunOptions,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run `cmd` metered; return its exit status, or one of ours when it did not run."""
    link = MeterLink(options.nats_url, f"tollgate-run {options.workload}", options.nats_seed_file)
    link.start()
    began = utcnow()
    try:
        refusal = await _ask_to_spawn(link, options)
        if refusal is not None:
            return refusal
        outputs = (Output(stdout or sys.stdout.buffer), Output(stderr or sys.stderr.buffer))
        listener_start = began - CLOCK_SLACK
        return await Metered(options, link, outputs).run(cmd, listener_start)
    finally:
        await link.close()


async def _ask_to_spawn(link: MeterLink, options: RunOptions) -> int | None:
    request = SpawnRequest(
        subject=options.subject,
        groups=list(options.groups),
        workload=options.workload,
        host=options.host,
        resources=options.resources,
    )
    answer = await link.spawn_decision(options.prefix, request, options.spawn_timeout)
    if isinstance(answer, NoDecision):
        if options.fail_closed:
            log.error(
                "no spawn decision (%s); not starting, because of --fail-closed", answer.reason
            )
            return EXIT_UNCHECKED
        log.warning(
            "no spawn decision (%s); starting anyway (--fail-closed refuses)", answer.reason
        )
        return None
    if not answer.allowed:
        log.error("%s", answer.message)
        return EXIT_DENIED
    if any(quota.state != "ok" for quota in answer.quotas):
        log.warning("%s", answer.message)
    return None
