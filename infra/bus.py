"""NATS connection and the JetStream streams of the contract, created idempotently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import nats.errors
import nkeys  # type: ignore[import-untyped]
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BadRequestError

from contracts.commands import commands_stream, commands_wildcard
from contracts.dlq import dlq_stream, dlq_wildcard
from contracts.partitions import partition_subjects_transform
from contracts.quota_events import events_stream, events_wildcard
from contracts.samples import samples_stream, samples_wildcard
from contracts.usage import usage_stream, usage_wildcard
from contracts.workloads import workloads_stream, workloads_wildcard

log = logging.getLogger("infra.bus")
DAY = 86_400
_PARTITION_RE = re.compile(r"\{\{\s*partition\((\d+)")


class CredentialsError(Exception):
    """The NATS nkey seed file is missing, unreadable or not a user seed."""


def seed_public_key(seed_file: Path) -> str:
    """The public user key (`U...`) of an nkey seed file, or a CredentialsError saying why."""
    where = f"{seed_file} (TOLLGATE_NATS_NKEY_SEED_FILE)"
    try:
        seed = bytearray(seed_file.read_bytes().strip())
    except OSError as exc:
        raise CredentialsError(
            f"cannot read the NATS nkey seed file {where}: {exc.strerror or exc}. Point the "
            "variable at the seed `tollgate nats-config` wrote for this host or service "
            "(readable by this user), or unset it for a NATS server without authentication."
        ) from None
    try:
        key_pair = nkeys.from_seed(seed)
        public = str(key_pair.public_key.decode())
        key_pair.wipe()
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise CredentialsError(
            f"the NATS nkey seed file {where} does not hold an nkey seed ({exc}); it should be "
            "one line starting with 'SU', as written by `tollgate nats-config`"
        ) from None
    if not public.startswith("U"):
        raise CredentialsError(
            f"the NATS nkey seed file {where} holds a seed for a {public[:1]}-key, not a user "
            "('SU...'); use the seed `tollgate nats-config` wrote for this identity"
        )
    return public


def inbox_prefix_for(public_key: str) -> str:
    """The reply-inbox prefix of an identity: `_INBOX.<its public key>`.

    `tollgate nats-config` lets each identity subscribe only below its own prefix, so no
    one reads another's replies (JetStream acks, spawn decisions, fetched messages).
    """
    return f"_INBOX.{public_key}"


def _whose(seed_file: Path | None) -> str:
    if seed_file is None:
        return (
            "to let us in without credentials: set TOLLGATE_NATS_NKEY_SEED_FILE to the seed "
            "`tollgate nats-config` wrote for this host or service"
        )
    return (
        f"the nkey in {seed_file} (TOLLGATE_NATS_NKEY_SEED_FILE): it is not in the server's "
        "auth.conf. Add this identity with `tollgate nats-config` and reload the server, or "
        "use the seed written for this host or service"
    )


def _allowed(seed_file: Path | None) -> str:
    if seed_file is None:
        return "the server's permissions for unauthenticated clients forbid it"
    return (
        f"the identity in {seed_file} may not do it: a host may publish only as the host "
        "`tollgate nats-config` made its seed for, so check TOLLGATE_HOST / --host"
    )


async def connect(url: str, name: str, seed_file: Path | None = None) -> Client:
    """Connect with endless reconnects: a NATS restart is an outage, not a crash.

    With `seed_file`, authenticate with that nkey and use the identity's own reply inbox.
    An outage is logged once when it starts and once when it ends, not at every retry.
    """
    auth: dict[str, str] = {}
    if seed_file is not None:
        auth = {
            "nkeys_seed": str(seed_file),
            "inbox_prefix": inbox_prefix_for(seed_public_key(seed_file)),
        }
    nc = Client()
    down = refused = forbidden = False

    async def _disconnected() -> None:
        nonlocal down
        if not (nc.is_closed or nc.is_draining or down):  # our own close is not an outage
            down = True
            log.warning("%s: lost NATS at %s; reconnecting in the background", name, url)

    async def _reconnected() -> None:
        nonlocal down
        down = False
        log.info("%s: reconnected to NATS", name)

    async def _error(exc: Exception) -> None:
        nonlocal refused, forbidden, down
        if "authorization violation" in str(exc).lower():
            if not refused:  # said once: the client retries every half second
                refused = True
                log.error("%s: NATS at %s refused %s; retrying", name, url, _whose(seed_file))
            return
        if "permissions violation" in str(exc).lower():
            # A deployment error, not an outage: said loudly once, then as a warning.
            level = logging.WARNING if forbidden else logging.ERROR
            forbidden = True
            log.log(level, "%s: NATS refused this: %s (%s)", name, exc, _allowed(seed_file))
            return
        if isinstance(exc, OSError) and not (down or nc.is_connected or nc.is_closed):
            # Not there at our first attempt (nats-py retries inside connect): said once.
            down = True
            log.warning("%s: cannot reach NATS at %s yet (%s); retrying", name, url, exc)
            return
        # An EOF is the server going away: the disconnect callback says so, once.
        quiet = down or isinstance(exc, nats.errors.UnexpectedEOF)
        log.log(logging.DEBUG if quiet else logging.WARNING, "%s: NATS error: %s", name, exc)

    await nc.connect(
        # A cluster: `nats://a:4222,nats://b:4222,...`; any one of them lets us in.
        [u.strip() for u in url.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
        **auth,
    )
    if down:
        down = False
        log.info("%s: connected to NATS", name)
    return nc


async def close_quietly(nc: Client | None, timeout: float = 2.0) -> None:
    """Close a connection that may be in any state: connected, reconnecting, server gone.

    nats-py's close flushes what is pending and so raises ConnectionResetError when the
    server went away meanwhile; at shutdown that is no news, and must not hang or trace.
    """
    if nc is None or nc.is_closed:
        return
    closing = asyncio.ensure_future(nc.close())
    # Cut short (Ctrl-C's grace ran out), the close may still end in an error later: taken
    # here, so asyncio does not print it as "Task exception was never retrieved".
    closing.add_done_callback(_taken)
    try:
        await asyncio.wait_for(closing, timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        log.debug("closing the NATS connection: %s", exc)


def _taken(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing the NATS connection: %s", task.exception())


def stream_configs(
    prefix: str, duplicate_window: float, replicas: int = 1, partitions: int = 1
) -> list[StreamConfig]:
    """The streams of the contract, all on file storage, each on `replicas` servers.

    With `partitions` > 1 the samples stream stores `<prefix>.v1.samples.<host>.<p>`, p
    being NATS's deterministic `partition(N)` of the host token; hosts still publish on
    `<prefix>.v1.samples.<host>`, and each ledger instance consumes one `p`.
    """
    common = {
        "storage": StorageType.FILE,
        "retention": RetentionPolicy.LIMITS,
        "num_replicas": replicas,
    }
    transform = None
    if partitions > 1:
        src, dest = partition_subjects_transform(prefix, partitions)
        transform = SubjectTransform(src=src, dest=dest)
    return [
        StreamConfig(
            name=samples_stream(prefix),
            subjects=[samples_wildcard(prefix)],
            subject_transform=transform,
            duplicate_window=duplicate_window,
            max_age=14 * DAY,
            discard=DiscardPolicy.OLD,
            **common,
        ),
        StreamConfig(
            name=usage_stream(prefix),
            subjects=[usage_wildcard(prefix)],
            duplicate_window=duplicate_window,
            **common,
        ),
        StreamConfig(
            name=workloads_stream(prefix),
            subjects=[workloads_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=90 * DAY,
            **common,
        ),
        StreamConfig(
            name=commands_stream(prefix),
            subjects=[commands_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=30 * DAY,
            **common,
        ),
        StreamConfig(
            name=events_stream(prefix),
            subjects=[events_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=90 * DAY,
            **common,
        ),
        StreamConfig(
            name=dlq_stream(prefix),
            subjects=[dlq_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=30 * DAY,
            **common,
        ),
    ]


def stored_partitions(config: StreamConfig) -> int:
    """How many partitions a samples stream's config maps hosts into (1: no transform)."""
    found = _PARTITION_RE.search(config.subject_transform.dest if config.subject_transform else "")
    return int(found.group(1)) if found else 1


async def ensure_streams(
    js: JetStreamContext,
    prefix: str,
    duplicate_window: float,
    replicas: int = 1,
    partitions: int = 1,
) -> None:
    """Create the streams, or bring an existing stream's config up to date."""
    for config in stream_configs(prefix, duplicate_window, replicas, partitions):
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            # Exists with a different config (e.g. a changed duplicate window): update it.
            if exc.err_code != 10058:
                raise
            if config.name == samples_stream(prefix):
                await _warn_on_repartition(js, config, partitions)
            await js.update_stream(config)


async def _warn_on_repartition(js: JetStreamContext, config: StreamConfig, n: int) -> None:
    assert config.name is not None
    before = stored_partitions((await js.stream_info(config.name)).config)
    if before != n:
        # Messages already stored keep their old subject, which the new partitions'
        # consumers do not match: they would sit in the stream, never folded.
        log.warning(
            "stream %s is partitioned %d way(s) and is being changed to %d (TOLLGATE_PARTITIONS)."
            " Repartitioning needs a drained stream: samples stored before the change are not"
            " seen by the new partitions' ledger consumers. Stop the publishers or wait until"
            " every ledger consumer has nothing pending before changing the partition count.",
            config.name, before, n,
        )  # fmt: skip


async def durable_pull(
    js: JetStreamContext,
    *,
    stream: str,
    subject: str,
    durable: str,
    ack_wait: float,
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    max_ack_pending: int = 1000,
) -> JetStreamContext.PullSubscription:
    """Create or update a durable pull consumer, then bind to it.

    Create-or-update rather than plain subscribe, so a changed ack_wait or backlog limit
    takes effect on a consumer that already exists.
    """
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=deliver_policy,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
        ),
    )
    return await js.pull_subscribe_bind(durable=durable, stream=stream)


# How long to look for more once one message is in hand: one round trip, not a wait.
_TOP_UP_SECONDS = 0.005


async def fetch_ready(
    sub: JetStreamContext.PullSubscription, batch: int, timeout: float
) -> list[Msg]:
    """Up to `batch` messages, returned as soon as any are there.

    nats-py's `fetch(batch)` on a drained consumer waits for all `batch` messages until
    `timeout`, so one sample arriving at an idle ledger waited the whole timeout (0.5 s).
    Here we wait for one, then take whatever else is already there. Raises TimeoutError
    when nothing arrived within `timeout`, like `fetch`.
    """
    msgs = await sub.fetch(1, timeout=timeout)
    if len(msgs) < batch:
        with contextlib.suppress(TimeoutError):  # nothing more right now: go with what we have
            msgs += await sub.fetch(batch - len(msgs), timeout=_TOP_UP_SECONDS)
    return msgs
