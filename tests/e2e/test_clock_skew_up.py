"""The issue's story against `tollgate up` with the demo quotas: hosts whose clocks say 1970
and 2099 publish raw batches; every read path a person or integrator uses agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats

from tests.conftest import unique
from tests.e2e.test_up import ADMIN, ledger_listening, ready, stop, tollgate, wait_logged
from tests.servers import TestServers
from tollgate.embedded import free_port

GIB_HOUR = Decimal(2**30 * 3600)
MEM = "mem.alloc.byte_seconds"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
DEMO_QUOTAS = Path(__file__).parents[2] / "tollgate" / "demo-quotas.yaml"


async def publish(nats_url: str, prefix: str, host: str, seq: int, subject: str,
                  value: Decimal, sampled_at: str) -> None:  # fmt: skip
    body = json.dumps({
        "schema": "tollgate.counter_batch.v1", "host": host, "epoch": "e1", "seq": seq,
        "sampled_at": sampled_at,
        "counters": [{"subject": subject, "workload": f"{subject}-nb", "metric": MEM,
                      "value": str(value)}],
    }).encode()  # fmt: skip
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            f"{prefix}.v1.samples.{host}", body, headers={"Nats-Msg-Id": f"{host}:e1:{seq}"}
        )
    finally:
        await nc.close()


async def get(api: str, path: str, **params: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"{api}{path}", params=params, headers=AS_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def spawn_http(api: str, subject: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"{api}/v1/spawn-checks", headers=AS_ADMIN,
                         json={"subject": subject, "groups": ["regular"]})  # fmt: skip
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def spawn_nats(nats_url: str, prefix: str, subject: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        ask = {"schema": "tollgate.spawn_request.v1", "subject": subject, "groups": ["regular"]}
        reply = await nc.request(f"{prefix}.v1.spawn.check", json.dumps(ask).encode(), timeout=10)
    finally:
        await nc.close()
    body: dict[str, Any] = json.loads(reply.data)
    return body


def memory(decision: dict[str, Any]) -> dict[str, Any]:
    (q,) = [q for q in decision["quotas"] if q["name"] == "memory-30d"]
    return q


async def test_clocks_of_1970_and_2099_are_clamped_and_every_read_path_agrees_under_up(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc: Any
) -> None:
    port = free_port()  # `nc` deletes this test's streams afterwards
    data = tmp_path / "data"
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_API_PORT": str(port), "TOLLGATE_ADMIN_TOKEN": ADMIN,
        "TOLLGATE_DATA_DIR": str(data), "TOLLGATE_CONFIG": str(DEMO_QUOTAS),
        "TOLLGATE_MAX_CLOCK_SKEW": "5min",
    }  # fmt: skip
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    procs.append(up := tollgate(["up"], env, log))
    await wait_logged(lambda: ready(api), log, "readyz")
    await wait_logged(lambda: ledger_listening(servers.nats_url, prefix), log, "ledger")

    erin, dave = unique("erin"), unique("dave")
    h2, h3 = unique("h2"), unique("h3")
    for host, subject, year in ((h2, erin, 1970), (h3, dave, 2099)):
        for seq, value, minute in ((1, GIB_HOUR, "00"), (2, 6 * GIB_HOUR, "10")):
            when = f"{year}-01-01T00:{minute}:00Z"
            await publish(servers.nats_url, prefix, host, seq, subject, value, when)

    for subject in (erin, dave):

        async def counted(subject: str = subject) -> bool:
            usage = await get(api, f"/v1/subjects/{subject}/usage", metric=MEM)
            return [Decimal(r["total"]) for r in usage["rows"]] == [6 * GIB_HOUR]

        await wait_logged(counted, log, f"{subject}'s 6 GiB·h in the default usage range", 30)

        async def denied(subject: str = subject) -> bool:
            return not (await spawn_http(api, subject))["allowed"]

        await wait_logged(denied, log, f"the policy to deny {subject}", 30)
        over_http = await spawn_http(api, subject)
        over_nats = await spawn_nats(servers.nats_url, prefix, subject)

        # The groups a spawn check named reach the API with the decision's record (the
        # policy journals them behind its reply, within a tenth of a second).
        async def grouped(subject: str = subject) -> bool:
            quotas = await get(api, f"/v1/subjects/{subject}/quotas")
            return any(q["name"] == "memory-30d" for q in quotas["quotas"])

        await wait_logged(grouped, log, f"{subject}'s groups in the quotas endpoint", 30)
        quotas = await get(api, f"/v1/subjects/{subject}/quotas")
        (q,) = [q for q in quotas["quotas"] if q["name"] == "memory-30d"]
        for status in (memory(over_http), memory(over_nats), q):
            assert (status["used"], status["state"]) == ("6", "exceeded"), status
        assert memory(over_http)["retry_at"] == memory(over_nats)["retry_at"] == q["retry_at"]
        returns = datetime.fromisoformat(q["retry_at"])
        assert datetime.now(UTC) + timedelta(days=29) < returns < datetime.now(UTC) + timedelta(31)
        assert "You have used 6 of 2 GiB·h (memory-30d)" in over_nats["message"]
        assert over_nats["message"] == over_http["message"].replace(
            over_http["decision_id"], over_nats["decision_id"]
        )

    # `tollgate report`, as an admin types it, reads the same numbers.
    out = subprocess.run(
        [sys.executable, "-m", "tollgate.cli", "report", "--format", "json", "--metric", MEM],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    totals = {r["subject"]: Decimal(r["total"]) for r in report["rows"]}
    assert totals[erin] == totals[dave] == 6 * GIB_HOUR

    # The page shows the same 6 of 2 GiB·h.
    async with httpx.AsyncClient(timeout=10, cookies={"tollgate_session": ADMIN}) as c:
        page = (await c.get(f"{api}/", params={"subject": erin})).text
    assert '<span class="used">6<small> of 2 GiB·h</small>' in page

    # Four skewed samples counted; each host named once in the log.
    async with httpx.AsyncClient(timeout=10) as c:
        metrics = (await c.get(f"{api}/metrics")).text
    assert "tollgate_ledger_clock_skewed_samples_total 4.0" in metrics
    assert stop(up, log) == 0
    text = log.read_text()
    for host in (h2, h3):
        assert text.count(f"clock skew: host={host} ") == 1, text[-3000:]
