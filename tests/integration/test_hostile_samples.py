"""Samples and workload events as a hostile integrator writes them, to a real ledger and policy.

Every name that becomes a NATS subject token or a Postgres text is tried with the characters
that break one or the other: subject separators and wildcards, whitespace, control characters,
NUL, lone surrogates, bytes that are not UTF-8, and 1,000 characters. Each message is either
stored safely (its name travels %-encoded as one subject token) or dead-lettered with a reason;
the service never stops, and a good message behind the bad ones is counted.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts import encode_token
from contracts.dlq import DETAIL_HEADER, REASON_HEADER, STREAM_SEQ_HEADER, dlq_stream, dlq_wildcard
from contracts.samples import samples_stream, samples_subject
from contracts.usage import usage_subject
from contracts.workloads import workloads_subject
from infra.bus import ensure_streams
from infra.settings import Settings
from services.ledger.app import LedgerService
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json, total
from tests.integration.test_policy_support import RunningPolicy

pytest_plugins = ["tests.integration.test_policy_support"]

# Names the contract carries safely: each is one %-encoded subject token.
SAFE = ["a.b", "a*", "a>", "a b", "jane.doe@example.org", "j\u00f6rg", "x%2Ey"]
# Names no service can carry: each is a dead letter `invalid_name`.
UNSAFE = {
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "escape": "a\x1b[31mb",
    "c1_control": "a\x85b",
    "line_separator": "a\u2028b",
    "lone_surrogate": "a\ud800b",
    "leading_space": " a",
    "trailing_space": "a ",
    "thousand_characters": "x" * 1000,
    "empty": "",
}


def counter(subject: str, workload: str = "w1", **extra: Any) -> dict[str, Any]:
    return {"subject": subject, "workload": workload, "metric": "log.bytes", "value": 7, **extra}


async def dead_letters(nc: Client, prefix: str) -> tuple[dict[int, Msg], Any]:
    """Dead letters by the stream sequence of the message they replace."""
    found: dict[int, Msg] = {}

    async def keep(msg: Msg) -> None:
        found[int(msg.headers[STREAM_SEQ_HEADER])] = msg

    sub = await nc.jetstream().subscribe(dlq_wildcard(prefix), stream=dlq_stream(prefix), cb=keep)
    return found, sub


async def test_hostile_names_in_samples_are_stored_safely_or_dead_lettered_and_never_stop_the_ledger(  # noqa: E501
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    js = nc.jetstream()
    host = unique("host")
    feed: list[str] = []

    async def on_usage(msg: Msg) -> None:  # one entry per event of the envelope
        feed.extend([msg.subject] * len(json.loads(msg.data)["events"]))

    # Everything under the usage prefix, so a name that split into two tokens would show.
    usage_sub = await nc.subscribe(usage_subject("x", prefix).rsplit(".", 1)[0] + ".>", cb=on_usage)
    dead, dlq_sub = await dead_letters(nc, prefix)
    expect_dead: dict[int, tuple[str, str]] = {}
    seq = 0

    async def send(body: bytes, what: str, reason: str | None, subject: str | None = None) -> None:
        nonlocal seq
        ack = await js.publish(subject or samples_subject(host, prefix), body)
        if reason:
            expect_dead[ack.seq] = (reason, what)

    def batch(*counters: dict[str, Any], **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        data = json.loads(batch_json(host, "e1", seq, list(counters)))
        data.update(fields)
        return json.dumps(data).encode()

    stored: list[tuple[str, str]] = []
    for i, name in enumerate(SAFE):
        subject, workload = f"{unique('s')}-{name}", f"{name}-{i}"
        await send(batch(counter(subject, workload)), f"safe {name!r}", None)
        stored.append((subject, workload))
    for case, name in UNSAFE.items():
        await send(batch(counter(name)), f"subject {case}", "invalid_name")
        await send(batch(counter(unique("s"), workload=name)), f"workload {case}", "invalid_name")
        labelled = counter(unique("s"), labels={f"k{name}" if name else "": "v"})
        await send(batch(labelled), f"label key {case}", "invalid_name")
        if case not in ("leading_space", "trailing_space", "empty"):
            await send(
                batch(counter(unique("s"), labels={"k": f"v{name}"})), f"label value {case}",
                "invalid_payload",
            )  # fmt: skip
        epoch = batch(counter(unique("s")), epoch=name)
        await send(epoch, f"epoch {case}", "invalid_payload")
        await send(
            batch(counter(unique("s"), metric=f"log.{name}.bytes")), f"metric {case}",
            "invalid_payload",
        )  # fmt: skip
    # A bad label value under a key no encoder can carry: the detail names the key safely.
    both = counter(unique("s"), labels={"\ud800\n": "v\x00"})
    await send(batch(both), "bad key and value", "invalid_payload")
    # A host name that cannot be one (in the payload, on its own subject token).
    bad_host = "h\x00st"
    await send(
        batch_json(bad_host, "e1", 1, [counter(unique("s"))]), "host nul", "invalid_name",
        subject=samples_subject(bad_host, prefix),
    )  # fmt: skip
    # Subject tokens a publisher wrote by hand: bad escapes, bytes that are not UTF-8, and a
    # second spelling of a name (lower-case hex), which must not pass for the host itself.
    base = samples_subject("x", prefix).rsplit(".", 1)[0]
    for token, what in [("h%ZZ", "bad escape"), ("h%FF", "not UTF-8"), ("h%2", "cut escape")]:
        body = batch_json(host, "e1", 1, [counter(unique("s"))])
        await send(body, f"subject token {what}", "invalid_name", subject=f"{base}.{token}")
    dotted = f"{host}.x"
    await send(
        batch_json(dotted, "e1", 1, [counter(unique("s"))]), "non-canonical token",
        "invalid_name", subject=f"{base}.{encode_token(dotted).replace('%2E', '%2e')}",
    )  # fmt: skip
    # Not UTF-8 inside the JSON itself.
    raw = batch_json(host, "e1", 99, [counter("PLACEHOLDER")]).replace(b"PLACEHOLDER", b"a\xffb")
    await send(raw, "non-UTF-8 body", "invalid_json")
    # Nested beyond any parser's recursion limit.
    deep = b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # under the fixture's 64 KiB
    await send(deep, "deep nesting", "invalid_json")

    good = unique("good")
    await send(batch(counter(good)), "good", None)

    async def good_counted() -> bool:
        return await total(pool, good, "log.bytes") == 7

    await wait_until(good_counted, 60, "the good sample behind the hostile ones to be counted")

    async def all_dead() -> bool:
        return set(expect_dead) <= set(dead)

    await wait_until(all_dead, 30, "a dead letter for every hostile message")
    wrong = {
        what: (dead[s].headers[REASON_HEADER], dead[s].headers[DETAIL_HEADER])
        for s, (reason, what) in expect_dead.items()
        if dead[s].headers[REASON_HEADER] != reason
    }
    assert not wrong, wrong
    for s, _ in expect_dead.items():
        assert dead[s].headers[DETAIL_HEADER], "a dead letter says why"
    # Nothing that was expected to be stored went to the DLQ, and all of it was stored.
    assert not set(dead) - set(expect_dead), [dead[s].headers[DETAIL_HEADER] for s in dead]
    for subject, workload in stored:
        assert await total(pool, subject, "log.bytes") == 7, subject
        stored_workload = await pool.fetchval(
            "SELECT workload FROM usage_events WHERE subject = $1", subject
        )
        assert stored_workload == workload

    async def fed() -> bool:
        return len(feed) >= len(stored) + 1

    await wait_until(fed, 30, "the usage feed to publish every stored event")
    usage_prefix_tokens = len(usage_subject("x", prefix).split("."))
    assert all(len(s.split(".")) == usage_prefix_tokens for s in feed), feed
    assert {usage_subject(s, prefix) for s, _ in stored} <= set(feed)
    await usage_sub.unsubscribe()
    await dlq_sub.unsubscribe()


async def test_a_sample_repeating_a_msg_id_with_other_content_is_the_duplicate_it_claims_to_be(
    nc: Client, prefix: str, pool: asyncpg.Pool, monkeypatch: Any
) -> None:
    # A window short enough to outlive in a test, set the way an operator sets it.
    monkeypatch.setenv("TOLLGATE_DUPLICATE_WINDOW_SECONDS", "1")
    js = nc.jetstream()
    await ensure_streams(js, prefix, Settings().duplicate_window_seconds)
    assert (await js.stream_info(samples_stream(prefix))).config.duplicate_window == 1
    service = LedgerService(nc, pool, prefix=prefix, batch=100, fetch_timeout=0.2)
    await service.subscribe()
    assert service._sub is not None
    host, ivy, probe = unique("host"), unique("ivy"), unique("probe")
    dead, dlq_sub = await dead_letters(nc, prefix)

    async def publish(body: bytes, msg_id: str) -> Any:
        headers = {"Nats-Msg-Id": msg_id}
        return await js.publish(samples_subject(host, prefix), body, headers=headers)

    async def fold_all() -> None:
        while True:
            try:
                msgs = await service._sub.fetch(100, timeout=0.5)  # type: ignore[union-attr]
            except TimeoutError:
                return
            await service.handle(msgs)

    def sample(seq: int, value: int, subject: str = ivy) -> bytes:
        return batch_json(host, "e1", seq, [counter(subject) | {"value": value}])

    first = await publish(sample(1, 10), f"{host}:e1:1")
    # Within the window: other values, even another seq, under the same id are dropped.
    again = await publish(sample(1, 99), f"{host}:e1:1")
    other_seq = await publish(sample(2, 500), f"{host}:e1:1")
    assert not first.duplicate and again.duplicate and other_seq.duplicate
    await fold_all()
    assert await total(pool, ivy, "log.bytes") == 10

    async def outlive_window() -> None:
        # A probe published now stops being a duplicate once every earlier id has aged out.
        probe_id = unique(f"{host}:probe")
        await publish(sample(1, 1, probe), probe_id)

        async def window_over() -> bool:
            return not (await publish(sample(1, 1, probe), probe_id)).duplicate

        await wait_until(window_over, 30, "the 1 s duplicate window to pass")

    await outlive_window()
    late_same_seq = await publish(sample(1, 99), f"{host}:e1:1")
    await outlive_window()
    late_other_seq = await publish(sample(2, 500), f"{host}:e1:1")
    assert not late_same_seq.duplicate and not late_other_seq.duplicate
    await fold_all()
    # The series keys make the same seq add zero; a payload that is not the sample its id
    # names is refused rather than counted under a name that JetStream could drop.
    assert await total(pool, ivy, "log.bytes") == 10

    async def refused() -> bool:
        return late_other_seq.seq in dead

    await wait_until(refused, 30, "the mismatching sample to be dead-lettered")
    assert dead[late_other_seq.seq].headers[REASON_HEADER] == "msg_id_mismatch"
    assert late_same_seq.seq not in dead
    # The next real sample still counts.
    await publish(sample(2, 15), f"{host}:e1:2")
    await fold_all()
    assert await total(pool, ivy, "log.bytes") == 15
    await dlq_sub.unsubscribe()


async def test_hostile_workload_events_are_dead_lettered_and_the_policy_keeps_following(
    nc: Client, prefix: str, ledger: LedgerService, policy_for: Any
) -> None:
    running: RunningPolicy = await policy_for("quotas: []\n")
    js = nc.jetstream()
    host, alice = unique("node"), unique("alice")
    dead, dlq_sub = await dead_letters(nc, prefix)

    def started(**fields: Any) -> bytes:
        event = {
            "schema": "tollgate.workload_started.v1", "workload": unique("w"), "subject": alice,
            "groups": [], "host": host, "started_at": "2026-11-22T10:00:00Z",
        }  # fmt: skip
        return json.dumps(event | fields).encode()

    cases = {
        "not json": (b"{nope", "invalid_json"),
        "not an object": (b"[1]", "invalid_json"),
        "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        "unknown schema": (b'{"schema": "tollgate.workload_started.v9"}', "unknown_schema"),
        "missing subject": (started(subject=None), "invalid_payload"),
        "negative cpus": (started(resources={"cpus": -1}), "invalid_payload"),
        "nul in workload": (started(workload="w\x00"), "invalid_name"),
        "surrogate in subject": (started(subject="a\ud800"), "invalid_name"),
        "long subject": (started(subject="s" * 1000), "invalid_name"),
        "nul in a group": (started(groups=["g\x00"]), "invalid_name"),
        "control in gpu_model": (started(resources={"gpu_model": "H\x00100"}), "invalid_payload"),
        "other host": (started(host=unique("elsewhere")), "host_mismatch"),
    }
    expect: dict[int, tuple[str, str]] = {}
    for what, (body, reason) in cases.items():
        ack = await js.publish(workloads_subject(host, prefix), body)
        expect[ack.seq] = (reason, what)
    good = unique("w-good")
    await js.publish(workloads_subject(host, prefix), started(workload=good))
    book = running.service.live.book

    async def followed() -> bool:
        return good in book.running

    await wait_until(followed, 30, "the good workload event behind the bad ones")

    async def all_dead() -> bool:
        return set(expect) <= set(dead)

    await wait_until(all_dead, 30, "a dead letter for every hostile workload event")
    got = {what: dead[s].headers[REASON_HEADER] for s, (_, what) in expect.items()}
    assert got == {what: reason for _, (reason, what) in expect.items()}
    assert all(alice == w.subject for w in book.running.values() if w.workload == good)

    # Another host may not stop it (the host in the subject is the authority, as for samples).
    stop = {"schema": "tollgate.workload_stopped.v1", "workload": good,
            "stopped_at": "2026-11-22T11:00:00Z"}  # fmt: skip
    forged = await js.publish(workloads_subject(unique("other"), prefix), json.dumps(stop).encode())

    async def refused() -> bool:
        return forged.seq in dead

    await wait_until(refused, 30, "the stop from another host to be dead-lettered")
    assert dead[forged.seq].headers[REASON_HEADER] == "host_mismatch"
    assert good in book.running
    await js.publish(workloads_subject(host, prefix), json.dumps(stop).encode())

    async def stopped() -> bool:
        return good not in book.running

    await wait_until(stopped, 30, "its own host's stop to be followed")
    await dlq_sub.unsubscribe()
