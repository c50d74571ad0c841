"""A host that ignores its terminate commands, against `tollgate up` as a real process: it is
commanded again and again, and `tollgate explain` and the API name the host."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nats

from tests.conftest import unique, wait_until
from tests.e2e.test_up import ADMIN, ready, tollgate, wait_logged
from tests.servers import TestServers
from tollgate.embedded import free_port

QUOTAS = """
reissue: {after: 1s, max: 2s, settle: 0s}
quotas:
  - name: egress
    metric: net.tx.wan.bytes
    limit: 1 MB
    window: {rolling: 1d}
    applies_to: {users: [SUBJECT]}
    enforce: [spawn, terminate]
    termination: {grace_seconds: 0}
"""


async def _defiant_host(nats_url: str, prefix: str, host: str, subject: str, workload: str):
    """Publishes growing egress every 0.3 s and never stops, whatever it is told."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        for seq in range(1, 10_000):
            body = json.dumps({
                "schema": "tollgate.counter_batch.v1", "host": host, "epoch": "e2e", "seq": seq,
                "sampled_at": datetime.now(UTC).isoformat(),
                "counters": [{"subject": subject, "workload": workload,
                              "metric": "net.tx.wan.bytes", "value": 2_000_000 + seq * 1000}],
            }).encode()  # fmt: skip
            await js.publish(
                f"{prefix}.v1.samples.{host}", body, headers={"Nats-Msg-Id": f"{host}:e2e:{seq}"}
            )
            await asyncio.sleep(0.3)  # the host's sampling interval
    finally:
        await nc.close()


async def test_a_host_that_ignores_terminate_commands_is_commanded_again_and_named(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc
) -> None:
    subject, host, workload = unique("mallory"), unique("rogue-"), unique("job-")
    port = free_port()
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS.replace("SUBJECT", subject))
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_DATA_DIR": str(tmp_path / "data"),
        "TOLLGATE_CONFIG": str(config),
    }  # fmt: skip
    log = tmp_path / "up.log"
    procs.append(tollgate(["up"], env, log))
    api = f"http://127.0.0.1:{port}"
    await wait_logged(lambda: ready(api), log, "readyz")
    commands: list[dict] = []

    async def on_command(msg) -> None:
        commands.append(json.loads(msg.data))

    await nc.subscribe(f"{prefix}.v1.commands.terminate.{host}", cb=on_command)
    await nc.flush()
    rogue = asyncio.create_task(_defiant_host(servers.nats_url, prefix, host, subject, workload))
    try:

        async def three() -> bool:
            assert not rogue.done() or rogue.result() is None
            return len(commands) >= 3

        await wait_logged(three, log, "three terminate commands")
    finally:
        rogue.cancel()
    ids = [c["command_id"] for c in commands[:3]]
    assert ids == [ids[0], f"{ids[0]}-2", f"{ids[0]}-3"]
    assert f"host {host} does not obey" in log.read_text()

    explained = subprocess.run(
        [sys.executable, "-m", "tollgate.cli", "explain", ids[2]],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    assert f"usage kept coming from host {host} after" in explained.stdout

    async def named() -> bool:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(
                f"{api}/v1/workloads/{workload}", headers={"Authorization": f"Bearer {ADMIN}"}
            )
        body = r.json()
        return r.status_code == 200 and body["ignored_commands"] >= 2

    await wait_until(named, 30, "the API to count the ignored commands")
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(
            f"{api}/v1/workloads/{workload}", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        metrics = (await client.get(f"{api}/metrics")).text
    assert r.json()["state"] == "running"
    assert f"terminate commands on host {host}" in r.json()["state_detail"]
    assert f'tollgate_policy_terminate_reissued_total{{host="{host}"}}' in metrics
