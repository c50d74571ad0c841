"""Enforcement that does not give up: a workload that outlives its terminate command is
commanded again, with backoff, each time under a command id of its own; one that obeys
is not; one whose usage comes after its stop is running again and terminated again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from nats.aio.client import Client
from prometheus_client import REGISTRY

from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import GIB_HOUR, Fleet, Inbox
from tollgate.commands.explain import explain_text

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
ADMIN, SECRET = "admin-reissue-token", "reissue-secret-0123456789abcdef"


def config(settle: str = "0s") -> str:
    # Backoff small enough for a test: 1 s, then 2 s, then 2 s ...
    return f"""
reissue: {{after: 1s, max: 2s, settle: {settle}}}
quotas:
  - name: memory-week
    metric: mem.alloc.byte_seconds
    limit: 10 GiB*h
    window: {{rolling: 7d}}
    enforce: [spawn, terminate]
    termination: {{grace_seconds: 0}}
"""


async def _count(inbox: Inbox, workload: str, n: int) -> bool:
    return len(inbox.terminations(workload)) >= n


class Defiant:
    """A host that keeps its workload running and its counters growing, whatever it is told."""

    def __init__(self, node: Fleet, subject: str, workload: str, start: int) -> None:
        self.node, self.subject, self.workload = node, subject, workload
        self.value = Decimal(start)
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.value += Decimal("0.01")
            await self.node.sample(
                datetime.now(UTC), (self.subject, self.workload, MEM, int(self.value * GIB_HOUR))
            )
            await asyncio.sleep(0.2)  # the host's sampling interval, not a wait for the test

    def __enter__(self) -> Defiant:
        self.task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # a host that crashed would make the test meaningless
        self.task.cancel()


def _reissued(host: str) -> float:
    value = REGISTRY.get_sample_value("tollgate_policy_terminate_reissued_total", {"host": host})
    return value or 0.0


@pytest.fixture
async def api(pool: asyncpg.Pool, nc: Client, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(config())))
    app = create_app(settings, deps=deps, options=ApiOptions())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def as_user(subject: str) -> dict[str, str]:
    token = issue_token(SECRET, subject, Role.USER, timedelta(hours=1))
    return {"Authorization": f"Bearer {token}"}


async def test_a_host_that_ignores_a_terminate_command_is_commanded_again_with_backoff(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox, api
) -> None:
    bob, host, nb = unique("bob"), unique("deaf-node"), unique("nb-")
    node = Fleet(nc, prefix, host)
    await policy_for(config())
    now = datetime.now(UTC)
    await node.started(bob, nb, now - timedelta(hours=1))
    await node.sample(now - timedelta(minutes=30), (bob, nb, MEM, 11 * GIB_HOUR))
    await wait_until(lambda: _count(inbox, nb, 1), what="the first terminate command")
    before = _reissued(host)

    with Defiant(node, bob, nb, 11):
        await wait_until(lambda: _count(inbox, nb, 3), 60, "two more terminate commands")

    first, second, third = inbox.terminations(nb)[:3]
    crossing = first["command_id"]
    assert [c["command_id"] for c in (first, second, third)] == [
        crossing, f"{crossing}-2", f"{crossing}-3",
    ]  # fmt: skip
    decided = [datetime.fromisoformat(c["decided_at"]) for c in (first, second, third)]
    # The policy waits its backoff (1 s, then 2 s) before each repeat.
    assert decided[1] - decided[0] >= timedelta(seconds=1)
    assert decided[2] - decided[1] >= timedelta(seconds=2)
    assert _reissued(host) - before >= 2

    # Each repeat is a stored decision with its inputs, naming the command it repeats.
    row = await pool.fetchrow(
        "SELECT * FROM policy_decisions WHERE decision_id = $1", f"{crossing}-2"
    )
    assert row is not None and row["kind"] == "terminate" and row["workload"] == nb
    inputs = json.loads(row["inputs"])
    assert (inputs["attempt"], inputs["crossing"], inputs["previous_command_id"]) == (
        2, crossing, crossing,
    )  # fmt: skip
    assert datetime.fromisoformat(inputs["usage_until"]) > decided[0]
    assert f"Terminate {nb} on {host} again (command 2)" in row["message"]

    text = await explain_text(pool, f"{crossing}-3")
    assert f"usage kept coming from host {host}" in text
    assert f"{crossing}-2" in text and "(this one)" in text

    r = await api.get(f"/v1/workloads/{nb}", headers=as_user(bob))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "running"
    assert body["terminate_commands"] >= 3 and body["ignored_commands"] >= 2
    assert f"terminate commands on host {host}" in body["state_detail"]
    token = as_user(bob)["Authorization"].removeprefix("Bearer ")
    api.cookies.set("tollgate_session", token)
    page = await api.get("/")
    assert page.status_code == 200, page.text
    assert "ignores terminate" in page.text
    assert f"terminate commands on host {host}" in page.text


async def test_a_workload_that_obeys_gets_no_second_command_even_if_its_final_sample_is_late(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox
) -> None:
    carol, node = unique("carol"), Fleet(nc, prefix, unique("good-node"))
    good, sentinel = unique("nb-"), unique("nb-")
    await policy_for(config(settle="30s"))
    now = datetime.now(UTC)
    await node.started(carol, good, now - timedelta(hours=1))
    await node.sample(now - timedelta(minutes=30), (carol, good, MEM, 11 * GIB_HOUR))
    await wait_until(lambda: _count(inbox, good, 1), what="the terminate command")

    # It obeys: the host reports the stop, and its final read arrives after the stop event.
    stopped = datetime.now(UTC)
    await node.stopped(carol, good, stopped)
    await node.sample(stopped, (carol, good, MEM, 11 * GIB_HOUR + GIB_HOUR // 10))

    # A second workload of carol's that ignores its command: its repeat is decided in an
    # evaluation of carol after the backoff, with the obeying one's final sample folded in.
    await node.started(carol, sentinel, datetime.now(UTC))
    with Defiant(node, carol, sentinel, 0):
        await wait_until(lambda: _count(inbox, sentinel, 1), 60, "the second one terminated")
        await wait_until(lambda: _count(inbox, sentinel, 2), 60, "the second one's repeat")
    assert len(inbox.terminations(good)) == 1
    state = await pool.fetchrow(
        "SELECT stopped_at, terminate_commands, ignored_commands FROM policy_workloads "
        "WHERE workload = $1",
        good,
    )
    assert state is not None and state["stopped_at"] is not None
    assert (state["terminate_commands"], state["ignored_commands"]) == (1, 0)


async def test_a_workload_whose_usage_comes_after_its_stop_runs_again_and_is_terminated_again(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox, api
) -> None:
    dave, host, nb = unique("dave"), unique("node"), unique("nb-")
    node = Fleet(nc, prefix, host)
    await policy_for(config())
    now = datetime.now(UTC)
    await node.started(dave, nb, now - timedelta(hours=1))
    await node.sample(now - timedelta(minutes=30), (dave, nb, MEM, 11 * GIB_HOUR))
    await wait_until(lambda: _count(inbox, nb, 1), what="the terminate command")
    stopped = datetime.now(UTC)
    await node.stopped(dave, nb, stopped)

    async def is_stopped() -> bool:
        at = await pool.fetchval("SELECT stopped_at FROM policy_workloads WHERE workload = $1", nb)
        return at is not None

    await wait_until(is_stopped, what="the stop recorded")
    # The host resumes it (a VM restored, a supervisor restarting it) and says nothing.
    await node.sample(stopped + timedelta(seconds=5), (dave, nb, MEM, 12 * GIB_HOUR))
    await wait_until(lambda: _count(inbox, nb, 2), 60, "a terminate command for the resumed one")
    first, again = inbox.terminations(nb)[:2]
    assert again["command_id"] == f"{first['command_id']}-2"

    row = await pool.fetchrow("SELECT * FROM policy_workloads WHERE workload = $1", nb)
    assert row["stopped_at"] is None and row["resumed_from"] == stopped
    r = await api.get(f"/v1/workloads/{nb}", headers=as_user(dave))
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running"
    assert "running again since" in r.json()["state_detail"]


async def test_a_workload_known_only_from_its_usage_is_recorded_when_terminated(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox, api
) -> None:
    erin, host, nb = unique("erin"), unique("raw-node"), unique("nb-")
    node = Fleet(nc, prefix, host)
    await policy_for(config())
    await node.sample(datetime.now(UTC), (erin, nb, MEM, 11 * GIB_HOUR))
    await wait_until(lambda: _count(inbox, nb, 1), what="the terminate command")

    async def recorded() -> bool:
        r = await api.get(f"/v1/workloads/{nb}", headers=as_user(erin))
        return r.status_code == 200 and r.json()["state"] == "running"

    # Was `unknown` for ever: now running (known from its usage) and counted.
    await wait_until(recorded, what="the workload recorded as running")
    body = (await api.get(f"/v1/workloads/{nb}", headers=as_user(erin))).json()
    assert "no workload_started" in body["state_detail"]
    assert (body["host"], body["terminate_commands"]) == (host, 1)


async def test_a_restarted_policy_goes_on_with_the_next_attempt_not_the_first(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox
) -> None:
    frank, node, nb = unique("frank"), Fleet(nc, prefix, unique("node")), unique("nb-")
    policy = await policy_for(config())
    now = datetime.now(UTC)
    await node.started(frank, nb, now - timedelta(hours=1))
    await node.sample(now - timedelta(minutes=30), (frank, nb, MEM, 11 * GIB_HOUR))
    with Defiant(node, frank, nb, 11):
        await wait_until(lambda: _count(inbox, nb, 2), 60, "the first repeat")
        await policy.halt()
        await policy_for(config(), path=policy.config_path)
        await wait_until(lambda: _count(inbox, nb, 3), 60, "the next repeat after the restart")
    crossing = inbox.terminations(nb)[0]["command_id"]
    ids = [c["command_id"] for c in inbox.terminations(nb)]
    assert ids[:3] == [crossing, f"{crossing}-2", f"{crossing}-3"]
    assert len(ids) == len(set(ids))
    stored = await pool.fetch(
        "SELECT decision_id FROM policy_decisions WHERE kind = 'terminate' AND workload = $1",
        nb,
    )
    # One decision per attempt, numbered without a gap or a repeat across the restart.
    expected = [crossing] + [f"{crossing}-{n}" for n in range(2, len(stored) + 1)]
    assert sorted(r["decision_id"] for r in stored) == sorted(expected)
