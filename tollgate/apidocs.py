"""The contract as documents: AsyncAPI 3.0 for NATS (built with FastStream), OpenAPI for HTTP.

FastStream describes channels from typed publishers and subscribers, so the AsyncAPI documents
come from the services' own declarations (their app modules), built on brokers that never
connect:

- docs/asyncapi.yaml, the services' side: the API's channels (`services.api.bus`), and,
  until the ledger and the policy declare theirs on FastStream, a description of their
  channels here (`_not_yet_declared`; each part goes as its service declares it);
- docs/asyncapi-meter.yaml, a host's side: `services.meter.app.document_broker`, the very
  publishers and subscribers `tollgate run`, the agent and the JupyterHub hooks use.

`tollgate docs` writes the files to docs/; a test fails when the committed files drift.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from contracts._base import DEFAULT_PREFIX
from contracts.commands import (
    SpawnBlock,
    TerminateWorkload,
    block_subject,
    commands_stream,
    terminate_subject,
    unblock_subject,
)
from contracts.dlq import DeadLetterReason, dlq_stream, dlq_wildcard
from contracts.errors import ErrorReply
from contracts.notice import TerminationCancelled, TerminationScheduled, notice_subject
from contracts.quota_events import (
    QuotaExceeded,
    QuotaForecast,
    QuotaWarning,
    events_stream,
    quota_events_subject,
)
from contracts.samples import CounterBatch, samples_stream, samples_subject
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from contracts.usage import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    UsageBatch,
    UsageRecorded,
    usage_stream,
    usage_subject,
)
from contracts.workloads import (
    WorkloadStarted,
    WorkloadStopped,
    workloads_stream,
    workloads_subject,
)
from infra.broker import TollgateBroker
from services.api.bus import SCOPE_MARK, TARGET_MARK, ApiChannels
from services.meter.app import HOST_MARK, document_broker

# Subject parameters: built with the real builders from a marker, then named AsyncAPI-style.
_MARK = "PARAM"


def _param(builder: Callable[..., str], name: str, prefix: str) -> str:
    return builder(_MARK, prefix).replace(_MARK, "{" + name + "}")


def _stored(stream: str, extra: str = "") -> str:
    return f"Stored in JetStream stream `{stream}` (file storage, `sync_interval: always`).{extra}"


# What the services' declarations name their subject parameters (subject builders keep
# these tokens as they are; the braces they would %-encode).
_MARKS = {HOST_MARK: "{host}", SCOPE_MARK: "{scope}", TARGET_MARK: "{target}"}


def _specification(broker: NatsBroker, title: str, description: str) -> dict[str, Any]:
    spec = AsyncAPI(
        broker, title=title, version="1", description=description, schema_version="3.0.0"
    )
    text = spec.to_specification().to_json()
    for mark, param in _MARKS.items():
        text = text.replace(mark, param)
    doc: dict[str, Any] = json.loads(text)
    return doc


def _sorted(doc: dict[str, Any]) -> dict[str, Any]:
    # FastStream keeps channels in no fixed order; a stable file diffs cleanly.
    for key in ("channels", "operations"):
        doc[key] = dict(sorted(doc[key].items()))
    for key in ("messages", "schemas"):
        doc["components"][key] = dict(sorted(doc["components"][key].items()))
    return doc


def asyncapi_document(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The NATS contract (SPEC §2) as an AsyncAPI 3.0 document, from the services' point of
    view: they receive samples, workload lifecycle and spawn checks, and send the rest."""
    broker = TollgateBroker(
        "nats://nats:4222",
        name="tollgate-docs",
        description="NATS with JetStream. Every payload is JSON with a `schema` field naming "
        "type and version; consumers ignore unknown fields.",
    )
    ApiChannels(broker, prefix)  # the API: grant cues (its spawn-check requests: see below)
    _not_yet_declared(broker, prefix)
    doc = _specification(
        broker,
        "Tollgate NATS contract",
        "Subjects, payloads and streams of Tollgate's wire contract v1 (SPEC §2), as the "
        "services (ledger, policy, api) use them; a host's side is asyncapi-meter.yaml. HTTP "
        "is described by openapi.json beside this file.",
    )
    _add_message(doc, "workloads", WorkloadStopped)
    # Per-event messages: what a stream written before usage_batch.v1 still holds.
    _add_message(doc, "usage", UsageRecorded)
    _add_message(doc, "quota-events", QuotaExceeded)
    _add_message(doc, "quota-events", QuotaForecast)
    _add_message(doc, "notice", TerminationCancelled)
    _add_message(doc, "quota-events", TerminationScheduled)
    _add_message(doc, "quota-events", TerminationCancelled)
    _add_spawn_reply(doc, "spawn-check")
    _add_parameters(doc)
    return _sorted(doc)


def meter_asyncapi_document(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """A host's side of the contract, from the meter's own FastStream declarations."""
    doc = _specification(
        document_broker(prefix),
        "Tollgate NATS contract: a host's side",
        "What `tollgate run`, `tollgate meter` (the host agent) and the JupyterHub hooks "
        "publish, ask and read (SPEC §2), generated from their FastStream declarations "
        "(services/meter/app.py). The services' side is asyncapi.yaml.",
    )
    _add_spawn_reply(doc, "spawn-check")
    _add_parameters(doc)
    return _sorted(doc)


def _not_yet_declared(broker: NatsBroker, prefix: str) -> None:
    """The ledger's and the policy's channels, described here until their services declare
    them on FastStream (then the part goes, and their declaration is called instead)."""

    def receives(subject: str, title: str, model: type[BaseModel], description: str) -> None:
        async def handler(message: Any) -> None:
            """Described only: the ledger and the policy consume with nats-py (for now)."""

        # The real model, not the string `from __future__ import annotations` would leave.
        handler.__annotations__ = {"message": model, "return": None}
        broker.subscriber(subject, title=title, description=description)(handler)

    def sends(subject: str, title: str, model: type[BaseModel], description: str) -> None:
        broker.publisher(subject, title=title, description=description, schema=model)

    receives(
        _param(samples_subject, "host", prefix),
        "samples",
        CounterBatch,
        "Cumulative counter samples from a meter agent or `tollgate run`. Header "
        "`Nats-Msg-Id: <host>:<epoch>:<seq>`. The host in the subject is the authority. "
        + _stored(
            samples_stream(prefix),
            " With TOLLGATE_PARTITIONS=N > 1 the stream stores it as "
            "`...samples.{host}.{partition}` by NATS deterministic subject mapping.",
        ),
    )
    receives(
        _param(workloads_subject, "host", prefix),
        "workloads",
        WorkloadStarted,
        "Workload lifecycle from hosts: `tollgate.workload_started.v1` and "
        "`tollgate.workload_stopped.v1`. " + _stored(workloads_stream(prefix)),
    )
    receives(
        spawn_check_subject(prefix),
        "spawn-check",
        SpawnRequest,
        "Request/reply: send a `tollgate.spawn_request.v1`, the reply is a "
        "`tollgate.spawn_decision.v1` (schema SpawnDecision), or a `tollgate.error.v1` "
        "(schema ErrorReply) naming the bad field when the request cannot be decided. "
        "Same as POST /v1/spawn-checks.",
    )
    sends(
        _param(usage_subject, "subject", prefix),
        "usage",
        UsageBatch,
        "Every committed usage event, after commit, in ledger order, gap-free, many to a "
        "message: a `tollgate.usage_batch.v1` envelope per (ledger batch, subject, chunk of at "
        f"most {MAX_BATCH_EVENTS} events and {MAX_BATCH_BYTES // 1024} KiB) holds the "
        "consecutive seqs `first_seq`..`last_seq` of one subject, and the next envelope on the "
        "stream starts at `last_seq + 1`; header `Nats-Msg-Id: usage:<first_seq>-<last_seq>`. "
        "Each event expands to a `tollgate.usage_recorded.v1` (schema UsageRecorded: the "
        "envelope's subject, batch_id, batch_hash and recorded_at with the event; an event's "
        "fields at their default, null, false or no labels, are left out), the one-event "
        "form `GET /v1/events` and `tollgate replay --after` give; a stream written before the "
        "envelopes also holds such per-event messages (`Nats-Msg-Id: usage:<seq>`). "
        "Replayable from sequence 1. " + _stored(usage_stream(prefix)),
    )
    sends(
        _param(terminate_subject, "host", prefix),
        "terminate",
        TerminateWorkload,
        "Terminate a workload over quota: SIGTERM, grace_seconds, then SIGKILL. One effective "
        "command per crossing (`Nats-Msg-Id` = command_id). Only the policy may publish. "
        + _stored(commands_stream(prefix)),
    )
    sends(
        _param(notice_subject, "host", prefix),
        "notice",
        TerminationScheduled,
        "Notice before termination (quota `termination.notice_seconds` > 0; SPEC addition): "
        "`tollgate.termination_scheduled.v1` at the crossing (the workload stops at "
        "`terminate_at` if still over), `tollgate.termination_cancelled.v1` when it will not "
        "(a grant, a raised limit, usage falling). `tollgate run` prints `message` on the "
        "workload's stderr. The same messages go to the quota events subject. "
        + _stored(commands_stream(prefix)),
    )
    sends(
        _param(block_subject, "subject", prefix),
        "block",
        SpawnBlock,
        "The subject may not spawn until `until` (or an unblock). "
        + _stored(commands_stream(prefix)),
    )
    sends(
        _param(unblock_subject, "subject", prefix),
        "unblock",
        SpawnBlock,
        "The subject may spawn again. " + _stored(commands_stream(prefix)),
    )
    sends(
        _param(quota_events_subject, "subject", prefix),
        "quota-events",
        QuotaWarning,
        "`tollgate.quota_warning.v1` once per threshold per window, "
        "`tollgate.quota_exceeded.v1`, and `tollgate.quota_forecast.v1` when the recent "
        "rate would use the quota up within its window. " + _stored(events_stream(prefix)),
    )
    reasons = ", ".join(f"`{r.value}`" for r in DeadLetterReason)
    broker.publisher(
        dlq_wildcard(prefix).replace("*", "{reason}"),
        title="dead-letters",
        description=f"Malformed or unauthorised messages, body unchanged, with headers "
        f"`Tollgate-Dlq-Reason`, `Tollgate-Dlq-Detail`, `Tollgate-Original-Subject`, "
        f"`Tollgate-Original-Stream-Seq`. Reasons: {reasons}. " + _stored(dlq_stream(prefix)),
    )


def _add_schema(doc: dict[str, Any], model: type[BaseModel]) -> str:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = doc["components"]["schemas"]
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema
    return f"#/components/schemas/{model.__name__}"


def _add_message(doc: dict[str, Any], channel: str, model: type[BaseModel]) -> None:
    """A second message type on a channel (one subject carrying two event types)."""
    name = f"{channel}:{model.__name__}"
    doc["components"]["messages"][name] = {
        "title": name,
        "payload": {"$ref": _add_schema(doc, model)},
    }
    doc["channels"][channel]["messages"][model.__name__] = {"$ref": f"#/components/messages/{name}"}
    doc["operations"][channel]["messages"].append(
        {"$ref": f"#/channels/{channel}/messages/{model.__name__}"}
    )


_PARAMETERS = {
    "host": "The host's name (one subject token; the meter's TOLLGATE_HOST).",
    "subject": "The user or service account usage is charged to (one subject token).",
    "reason": "Why the message was refused.",
    "scope": "`subject` or `group` (a `per: group` pool).",
    "target": "The subject, or the group, the grant is for (one subject token).",
}


def _add_parameters(doc: dict[str, Any]) -> None:
    for channel in doc["channels"].values():
        address = channel.get("address") or ""
        found = {p: {"description": d} for p, d in _PARAMETERS.items() if f"{{{p}}}" in address}
        if found:
            channel["parameters"] = found


def _add_spawn_reply(doc: dict[str, Any], operation: str) -> None:
    """FastStream has no reply schema for request/reply; AsyncAPI 3.0 does (`reply`)."""
    doc["components"]["messages"]["spawn-check:Reply"] = {
        "title": "spawn-check:Reply",
        "payload": {"$ref": _add_schema(doc, SpawnDecision)},
    }
    doc["components"]["messages"]["spawn-check:Error"] = {
        "title": "spawn-check:Error",
        "summary": "The request could not be decided: `field` names what to fix.",
        "payload": {"$ref": _add_schema(doc, ErrorReply)},
    }
    doc["channels"]["spawn-check-reply"] = {
        "address": None,
        "description": "The requester's inbox (the NATS reply subject).",
        "messages": {
            "Reply": {"$ref": "#/components/messages/spawn-check:Reply"},
            "Error": {"$ref": "#/components/messages/spawn-check:Error"},
        },
    }
    doc["operations"][operation]["reply"] = {
        "channel": {"$ref": "#/channels/spawn-check-reply"},
        "messages": [
            {"$ref": "#/channels/spawn-check-reply/messages/Reply"},
            {"$ref": "#/channels/spawn-check-reply/messages/Error"},
        ],
    }


def asyncapi_yaml(prefix: str = DEFAULT_PREFIX) -> str:
    return yaml.safe_dump(asyncapi_document(prefix), sort_keys=False, allow_unicode=True)


def meter_asyncapi_yaml(prefix: str = DEFAULT_PREFIX) -> str:
    return yaml.safe_dump(meter_asyncapi_document(prefix), sort_keys=False, allow_unicode=True)


def openapi_json() -> str:
    """The API's OpenAPI document, from the app itself (no server, no connections)."""
    from infra.settings import Settings
    from services.api.app import create_app
    from services.api.options import ApiOptions

    app = create_app(Settings(token_secret="docs-only"), options=ApiOptions())
    return json.dumps(app.openapi(), indent=2, sort_keys=False) + "\n"
