"""The meter's NATS app: everything a host says and hears, declared on its FastStream broker.

`tollgate run`, the host agent and the JupyterHub hooks send samples and workload lifecycle
and ask for spawn decisions; the agent and `tollgate run` read their host's termination
commands and notices. `tollgate docs` builds docs/asyncapi-meter.yaml from these same
declarations (with `{host}` for the host), so the document is the code.
"""

from __future__ import annotations

import logging
from typing import Any

from faststream import AckPolicy
from faststream.middlewares import ExceptionMiddleware
from faststream.nats import PullSub
from faststream.nats.annotations import NatsMessage
from faststream.nats.publisher.usecase import LogicPublisher
from nats.js.api import ConsumerConfig
from pydantic import ValidationError

from contracts.commands import commands_stream, terminate_subject
from contracts.errors import describe, field_errors
from contracts.notice import notice_subject
from contracts.samples import CounterBatch, samples_stream, samples_subject
from contracts.spawn import SpawnRequest, spawn_check_subject
from contracts.workloads import (
    WorkloadStarted,
    WorkloadStopped,
    workloads_stream,
    workloads_subject,
)
from infra.broker import TollgateBroker, jstream

log = logging.getLogger("tollgate.meter")
# Subject parameters in the generated document: a marker token the subject builders keep
# as it is, replaced by `{host}` afterwards (the builders would %-encode the braces).
HOST_MARK = "PARAMhost"
FETCH_WAIT = 1.0  # one pull request waits this long for a command
FETCH_BATCH = 16


def _stored(stream: str) -> str:
    return f" Stored in JetStream stream `{stream}` (file storage, `sync_interval: always`)."


def unreadable_is_ignored() -> ExceptionMiddleware:
    """A command or notice the meter cannot read is logged in one line and acked, not retried."""
    middleware = ExceptionMiddleware()

    @middleware.add_handler(ValidationError)
    async def ignore(exc: ValidationError, message: NatsMessage) -> None:
        errors = [e.model_copy(update={"field": e.field.partition(".")[2] or "body"})
                  for e in field_errors(exc)]  # fmt: skip
        log.error("ignoring a message on %s that is not what the meter reads there: %s",
                  message.raw_message.subject, describe(errors))  # fmt: skip

    return middleware


class MeterChannels:
    """The publishers of a meter's connection (subjects are per host: given at publish)."""

    def __init__(self, broker: TollgateBroker, prefix: str) -> None:
        self.broker = broker
        self.prefix = prefix
        host = HOST_MARK
        self.samples: LogicPublisher = broker.publisher(
            samples_subject(host, prefix),
            stream=jstream(samples_stream(prefix)),
            schema=CounterBatch,
            title="samples",
            description="Cumulative counter samples from a meter agent or `tollgate run`. "
            "Header `Nats-Msg-Id: <host>:<epoch>:<seq>`. The host in the subject is the "
            "authority (a host may publish only as itself)." + _stored(samples_stream(prefix)),
        )
        self.workloads: LogicPublisher = broker.publisher(
            workloads_subject(host, prefix),
            stream=jstream(workloads_stream(prefix)),
            schema=WorkloadStarted | WorkloadStopped,
            title="workloads",
            description="Workload lifecycle: `tollgate.workload_started.v1` and "
            "`tollgate.workload_stopped.v1`; `Nats-Msg-Id: <host>:<event>`."
            + _stored(workloads_stream(prefix)),
        )
        self.spawn_check: LogicPublisher = broker.publisher(
            spawn_check_subject(prefix),
            schema=SpawnRequest,
            title="spawn-check",
            description="Request/reply: `tollgate run` asks before it starts the workload; "
            "the reply is a `tollgate.spawn_decision.v1` or a `tollgate.error.v1`.",
        )

    def publisher_for(self, subject: str) -> tuple[LogicPublisher, str]:
        """The declared publisher a message on `subject` goes out by, and its stream.

        From the subject itself: one link may publish under another prefix than the one
        it was declared with (the prefix is the subject's first token).
        """
        prefix = subject.partition(".")[0]
        if subject.startswith(samples_subject("", prefix)):
            return self.samples, samples_stream(prefix)
        return self.workloads, workloads_stream(prefix)

    def commands(self, host: str, prefix: str, config: ConsumerConfig) -> Any:
        """The pull subscriber of `host`'s termination commands (started by its listener)."""
        return self.broker.subscriber(
            terminate_subject(host, prefix),
            stream=jstream(commands_stream(prefix)),
            config=config,
            pull_sub=PullSub(batch_size=FETCH_BATCH, timeout=FETCH_WAIT),
            ack_policy=AckPolicy.ACK,
            title="terminate",
            description="Terminate a workload over quota: SIGTERM, grace_seconds, then "
            "SIGKILL. Read in order from the stream sequence after the last one handled, "
            "each `command_id` once. Only the policy may publish."
            + _stored(commands_stream(prefix)),
        )

    def notices(self, host: str, prefix: str, config: ConsumerConfig) -> Any:
        """The pull subscriber of `host`'s termination notices (started by its listener)."""
        return self.broker.subscriber(
            notice_subject(host, prefix),
            stream=jstream(commands_stream(prefix)),
            config=config,
            pull_sub=PullSub(batch_size=FETCH_BATCH, timeout=FETCH_WAIT),
            ack_policy=AckPolicy.ACK,
            title="notice",
            description="`tollgate.termination_scheduled.v1` / "
            "`tollgate.termination_cancelled.v1`: `tollgate run` prints `message` on the "
            "workload's stderr." + _stored(commands_stream(prefix)),
        )


def document_broker(prefix: str) -> TollgateBroker:
    """The meter's own declarations on a link that never connects, for `tollgate docs`."""
    from .commands import CommandListener, NoticeListener
    from .publisher import MeterLink

    link = MeterLink("nats://nats:4222", "tollgate-meter", prefix=prefix)
    link.broker.specification.description = (
        "NATS with JetStream, as a host's meter sees it (`tollgate run`, `tollgate meter`, "
        "the JupyterHub hooks). Every payload is JSON with a `schema` field naming type and "
        "version; consumers ignore unknown fields."
    )

    async def nothing(_: Any) -> None:
        return None

    CommandListener(link, prefix, HOST_MARK, nothing)
    NoticeListener(link, prefix, HOST_MARK, nothing)
    return link.broker
