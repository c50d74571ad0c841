"""Spawn checks as a hostile integrator sends them, over NATS and over HTTP.

Every bad request gets an answer naming the field (a `tollgate.error.v1` reply on NATS, a
422 over HTTP, never a 500 or silence), and the policy keeps deciding and storing decisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.errors import ERROR_SCHEMA, ErrorReply
from contracts.spawn import SpawnDecision, spawn_check_subject
from tests.conftest import unique, wait_until
from tests.integration.test_api_spawn import AS_ADMIN, client_for
from tests.integration.test_policy_support import decision_row

pytest_plugins = ["tests.integration.test_policy_support"]


def request(**fields: Any) -> bytes:
    return json.dumps({"subject": "hostile-user"} | fields).encode()


# (what, body, the field the answer must name; None: the body as a whole)
BAD: list[tuple[str, bytes, str | None]] = [
    ("garbage", b"\x00\xffnot json at all", None),
    ("empty body", b"", None),
    ("a JSON list", b"[1, 2]", None),
    ("a JSON string", b'"alice"', None),
    ("JSON null", b"null", None),
    ("NaN literal", b'{"subject": "a", "expected_seconds": NaN}', None),
    ("deep nesting", b'{"subject": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ("not UTF-8", b'{"subject": "a\xffb"}', None),
    ("no subject", b"{}", "subject"),
    ("subject a number", request(subject=7), "subject"),
    ("subject null", request(subject=None), "subject"),
    ("subject empty", request(subject=""), "subject"),
    ("subject with NUL", request(subject="a\x00b"), "subject"),
    ("subject with a newline", request(subject="alice\nroot"), "subject"),
    ("subject a lone surrogate", request(subject="a\ud800"), "subject"),
    ("subject 1000 characters", request(subject="s" * 1000), "subject"),
    ("subject padded", request(subject=" alice"), "subject"),
    ("workload with ESC", request(workload="w\x1b[2J"), "workload"),
    ("host 1000 characters", request(host="h" * 1000), "host"),
    ("wrong schema", request(schema="tollgate.spawn_request.v2"), "schema"),
    ("groups a string", request(groups="regular"), "groups"),
    ("groups of numbers", request(groups=[1, 2]), "groups.0"),
    ("10,000 groups", request(groups=[f"g{i}" for i in range(10_000)]), "groups"),
    ("a group with NUL", request(groups=["ok", "g\x00"]), "groups.1"),
    ("a group of 1000 characters", request(groups=["g" * 1000]), "groups.0"),
    ("resources a list", request(resources=[]), "resources"),
    ("negative cpus", request(resources={"cpus": -1}), "resources.cpus"),
    ("cpus NaN", request(resources={"cpus": "NaN"}), "resources.cpus"),
    ("cpus 1e-999999", request(resources={"cpus": "1e-999999"}), "resources.cpus"),
    ("negative memory", request(resources={"mem_bytes": -1}), "resources.mem_bytes"),
    ("memory as words", request(resources={"mem_bytes": "lots"}), "resources.mem_bytes"),
    ("fractional gpus", request(resources={"gpus": 1.5}), "resources.gpus"),
    ("gpu_model with NUL", request(resources={"gpu_model": "H\x00100"}), "resources.gpu_model"),
    ("negative expected_seconds", request(expected_seconds=-1), "expected_seconds"),
    ("expected_seconds 10^30", request(expected_seconds=10**30), "expected_seconds"),
    ("expected_seconds '1e30'", request(expected_seconds="1e30"), "expected_seconds"),
    ("expected_seconds 'NaN'", request(expected_seconds="NaN"), "expected_seconds"),
    ("expected_seconds 'Infinity'", request(expected_seconds="Infinity"), "expected_seconds"),
    ("expected_seconds '-Infinity'", request(expected_seconds="-Infinity"), "expected_seconds"),
    ("expected_seconds true", request(expected_seconds=True), "expected_seconds"),
    ("expected_seconds 'soon'", request(expected_seconds="soon"), "expected_seconds"),
    ("expected_seconds 1e-30", request(expected_seconds="1e-30"), "expected_seconds"),
]
CONFIG = """
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {rolling: 30d}
    applies_to: {all: true}
    enforce: [spawn]
"""


async def test_a_burst_of_bad_spawn_requests_gets_error_replies_naming_the_field_then_a_good_one_is_decided(  # noqa: E501
    nc: Client, prefix: str, pool: asyncpg.Pool, policy_for: Any
) -> None:
    await policy_for(CONFIG)
    wrong: dict[str, Any] = {}
    for what, body, field in BAD:
        msg = await nc.request(spawn_check_subject(prefix), body, timeout=10)
        data = json.loads(msg.data)
        if data.get("schema") != ERROR_SCHEMA:
            wrong[what] = data
            continue
        reply = ErrorReply.model_validate(data)
        names_it = field is None or reply.message.startswith(f"{field}:")
        if (reply.error, reply.field) != ("invalid_request", field) or not names_it:
            wrong[what] = data
    assert not wrong, wrong

    # The policy still answers, and its decisions are still stored.
    alice = unique("alice")
    msg = await nc.request(
        spawn_check_subject(prefix),
        request(subject=alice, groups=["regular"], expected_seconds=0),
        timeout=10,
    )
    decision = SpawnDecision.model_validate_json(msg.data)
    assert decision.allowed

    async def stored() -> bool:
        return await decision_row(pool, decision.decision_id) is not None

    await wait_until(stored, 30, "the good decision to be stored")


@pytest.mark.parametrize(("what", "body", "field"), BAD, ids=[b[0] for b in BAD])
async def test_a_bad_spawn_check_over_http_is_a_422_naming_the_field(
    pool: asyncpg.Pool, tmp_path: Path, what: str, body: bytes, field: str | None
) -> None:
    async with client_for(tmp_path, pool, None, "tollgate") as c:
        r = await c.post(
            "/v1/spawn-checks",
            content=body,
            headers={**AS_ADMIN, "Content-Type": "application/json"},
        )

    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    if field is not None:
        assert detail.startswith(f"{field}:"), detail


async def test_a_policy_that_fails_is_a_502_over_http_and_a_refusal_a_422(
    nc: Client, pool: asyncpg.Pool, prefix: str, tmp_path: Path
) -> None:
    replies = [
        ErrorReply(error="internal_error", message="the policy could not decide").to_json(),
        ErrorReply(error="invalid_request", message="groups.0: bad", field="groups.0").to_json(),
    ]

    async def fake_policy(msg: Msg) -> None:
        await msg.respond(replies.pop(0))

    sub = await nc.subscribe(spawn_check_subject(prefix), cb=fake_policy)
    try:
        async with client_for(tmp_path, pool, nc, prefix) as c:
            failed = await c.post("/v1/spawn-checks", json={"subject": "x"}, headers=AS_ADMIN)
            refused = await c.post("/v1/spawn-checks", json={"subject": "x"}, headers=AS_ADMIN)
    finally:
        await sub.unsubscribe()

    assert failed.status_code == 502, failed.text
    assert "the policy could not decide" in failed.json()["detail"]
    assert refused.status_code == 422 and refused.json()["detail"] == "groups.0: bad"
