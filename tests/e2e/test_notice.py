"""Notice before termination, as real processes: `tollgate up` and `tollgate run`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path

import asyncpg
import httpx

from contracts.quota_events import quota_events_subject
from tests.conftest import unique
from tests.e2e.test_up import ready, tollgate, wait_logged
from tests.servers import TestServers
from tollgate.embedded import free_port

PER_WORKLOAD = """
quotas:
  - name: cpu-burst
    metric: cpu.used.seconds
    limit: 1 core*s
    window: {lifetime: true}
    applies_to: {users: [SUBJECT]}
    per: workload
    enforce: [terminate]
    termination: {reason: compute_quota_exceeded, grace_seconds: 1, notice_seconds: 3}
"""
# A long notice: the grant has all the time it needs to arrive before it runs out.
PER_SUBJECT = """
quotas:
  - name: cpu-day
    metric: cpu.used.seconds
    limit: 1 core*s
    window: {rolling: 1d}
    applies_to: {users: [SUBJECT]}
    enforce: [terminate]
    termination: {grace_seconds: 1, notice_seconds: 900}
"""


async def _up(servers, database_url, tmp_path, procs, prefix, quotas, subject) -> tuple[dict, str]:
    port = free_port()
    config = tmp_path / "quotas.yaml"
    config.write_text(quotas.replace("SUBJECT", subject))
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": "e2e", "TOLLGATE_DATA_DIR": str(tmp_path / "data"),
        "TOLLGATE_CONFIG": str(config),
    }  # fmt: skip
    log = tmp_path / "up.log"
    procs.append(tollgate(["up"], env, log))
    api = f"http://127.0.0.1:{port}"
    await wait_logged(lambda: ready(api), log, "readyz")
    return env, api


async def _events(nc, subject: str, prefix: str) -> asyncio.Queue[dict]:
    queue: asyncio.Queue[dict] = asyncio.Queue()

    async def got(msg) -> None:
        await queue.put(json.loads(msg.data))

    await nc.subscribe(quota_events_subject(subject, prefix), cb=got)
    return queue


async def _next(queue: asyncio.Queue[dict], schema: str) -> dict:
    while True:
        event = await asyncio.wait_for(queue.get(), 90)
        if event["schema"] == schema:
            return event


async def _line(stream: asyncio.StreamReader, seen: list[str], needle: str) -> str:
    while True:
        raw = await asyncio.wait_for(stream.readline(), 90)
        if not raw:
            raise AssertionError(f"stderr ended without {needle!r}:\n{''.join(seen)}")
        seen.append(raw.decode())
        if needle in seen[-1]:
            return seen[-1]


async def test_a_workload_over_a_quota_with_notice_is_told_then_terminated_when_it_runs_out(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc
) -> None:
    subject = unique("nora")
    env, _ = await _up(servers, database_url, tmp_path, procs, prefix, PER_WORKLOAD, subject)
    events = await _events(nc, subject, prefix)
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", "run", "--subject", subject, "--interval", "0.5",
        "--", sys.executable, "-c", "while True: pass",
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen: list[str] = []
    try:
        assert run.stderr is not None
        line = await _line(run.stderr, seen, "Tollgate: cpu-burst exceeded")
        assert "this job will be stopped at" in line and "unless usage falls or a grant" in line
        seen.append((await asyncio.wait_for(run.stderr.read(), 90)).decode())
        await asyncio.wait_for(run.wait(), 90)
    finally:
        if run.returncode is None:
            run.kill()
    stderr = "".join(seen)
    assert run.returncode == 128 + 15, stderr
    assert "compute_quota_exceeded" in stderr
    notice = await _next(events, "tollgate.termination_scheduled.v1")
    assert notice["quota"] == "cpu-burst" and notice["subject"] == subject
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT kind, decided_at, inputs, message FROM policy_decisions "
            "WHERE subject = $1 AND kind IN ('termination_scheduled', 'terminate') "
            "ORDER BY decided_at",
            subject,
        )
    finally:
        await conn.close()
    assert [r["kind"] for r in rows] == ["termination_scheduled", "terminate"]
    scheduled, terminate = rows
    terminate_at = json.loads(scheduled["inputs"])["terminate_at"]
    assert notice["notice_id"] == json.loads(terminate["inputs"])["notice_id"]
    # Terminated only once the notice ran out, and the decision says so.
    assert terminate["decided_at"].isoformat() >= terminate_at
    assert "ran out" in terminate["message"]


async def _page_row(client: httpx.AsyncClient, subject: str, workload: str) -> str:
    """The workload's row on the subject's web page, as the admin signed in sees it."""
    r = await client.get(
        "/", params={"subject": subject}, headers={"Cookie": "tollgate_session=e2e"}
    )
    assert r.status_code == 200, r.text
    row = r.text.split(f'data-workload="{html_escape(workload)}"', 1)[1]
    return row.split("</tr>", 1)[0]


async def test_a_grant_during_the_notice_cancels_the_termination_and_tells_the_workload(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc
) -> None:
    subject, workload = unique("otto"), unique("job")
    env, api = await _up(servers, database_url, tmp_path, procs, prefix, PER_SUBJECT, subject)
    events = await _events(nc, subject, prefix)
    flag = tmp_path / "done"
    burn = f"import os\nwhile not os.path.exists({str(flag)!r}): pass"
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", "run", "--subject", subject, "--interval", "0.5",
        "--workload", workload, "--", sys.executable, "-c", burn,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen: list[str] = []
    admin = {"Authorization": "Bearer e2e"}
    try:
        assert run.stderr is not None
        told = await _line(run.stderr, seen, "Tollgate: cpu-day exceeded")
        async with httpx.AsyncClient(base_url=api, headers=admin, timeout=30) as client:
            shown = (await client.get(f"/v1/workloads/{workload}")).json()
            assert shown["scheduled_termination"]["message"] == told.strip()
            # The user's page shows the same sentence beside the workload, until it is lifted.
            html = await _page_row(client, subject, workload)
            assert "stops " in html and html_escape(told.strip()) in html
            r = await client.post(
                f"/v1/subjects/{subject}/grants",
                json={"quota": "cpu-day", "amount": "100 core*h", "expires_in": "1d",
                      "reason": "deadline"},
            )  # fmt: skip
            assert r.status_code == 201, r.text
            line = await _line(run.stderr, seen, "is cancelled")
            assert line.startswith("Tollgate: the stop planned for ")
            assert line.strip().endswith("is cancelled: a grant raised cpu-day")
            shown = (await client.get(f"/v1/workloads/{workload}")).json()
            assert shown["scheduled_termination"] is None
            html = await _page_row(client, subject, workload)
            assert "pill ok" in html and "stops " not in html
        flag.touch()
        seen.append((await asyncio.wait_for(run.stderr.read(), 90)).decode())
        await asyncio.wait_for(run.wait(), 90)
    finally:
        if run.returncode is None:
            run.kill()
    assert run.returncode == 0, "".join(seen)
    cancelled = await _next(events, "tollgate.termination_cancelled.v1")
    assert (cancelled["workload"], cancelled["why"]) == (workload, "a grant raised cpu-day")
    conn = await asyncpg.connect(database_url)
    try:
        kinds = await conn.fetch(
            "SELECT kind, message FROM policy_decisions WHERE subject = $1 "
            "AND kind IN ('terminate', 'termination_scheduled', 'termination_cancelled') "
            "ORDER BY decided_at",
            subject,
        )
    finally:
        await conn.close()
    assert [k["kind"] for k in kinds] == ["termination_scheduled", "termination_cancelled"]
    assert "a grant raised cpu-day" in kinds[1]["message"]
