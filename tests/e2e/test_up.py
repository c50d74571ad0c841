"""The commands a user types: `tollgate up`, and the services one by one, as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import nats
import nats.js.errors

from tests.conftest import unique, wait_until
from tests.servers import TestServers
from tollgate.embedded import free_port

ADMIN = "e2e-admin-token"


def tollgate(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "tollgate.cli", *args],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes], log: Path) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not stop on Ctrl-C; log:\n{log.read_text()[-3000:]}") from None


async def publish_raw(nats_url: str, prefix: str, host: str, seq: int, subject: str, value: int):
    """What an integrator's own meter does: raw JSON on the samples subject."""
    body = json.dumps({
        "schema": "tollgate.counter_batch.v1", "host": host, "epoch": "e2e", "seq": seq,
        "sampled_at": datetime.now(UTC).isoformat(),
        "counters": [{"subject": subject, "workload": "job-1", "metric": "net.tx.wan.bytes",
                      "value": value}],
    }).encode()  # fmt: skip
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            f"{prefix}.v1.samples.{host}", body, headers={"Nats-Msg-Id": f"{host}:e2e:{seq}"}
        )
    finally:
        await nc.close()


async def usage_total(api: str, subject: str, metric: str) -> Decimal | None:
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            r = await client.get(
                f"{api}/v1/subjects/{subject}/usage",
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
        except httpx.TransportError:
            return None
    if r.status_code != 200:
        return None
    rows = [row for row in r.json()["rows"] if row.get("metric") == metric]
    return sum((Decimal(row["total"]) for row in rows), Decimal(0))


async def wait_logged(check, log: Path, what: str, timeout: float = 90) -> None:
    """wait_until, but a failure shows the end of the process's log."""
    try:
        await wait_until(check, timeout=timeout, what=what)
    except AssertionError as exc:
        tail = log.read_text()[-4000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}\n--- {log.name} ---\n{tail}") from None


async def ledger_listening(nats_url: str, prefix: str) -> bool:
    """The ledger has bound its durable consumer: samples published now will be folded."""
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().consumer_info(f"{prefix.upper()}_SAMPLES", "ledger")
        return True
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()


async def ready(api: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            return (await client.get(f"{api}/readyz")).status_code == 200
        except httpx.TransportError:
            return False


async def test_up_runs_everything_embedded_and_keeps_data_across_restarts(
    tmp_path: Path, procs: list
) -> None:
    data, port = tmp_path / "data", free_port()
    env = {"TOLLGATE_DATA_DIR": str(data), "TOLLGATE_API_PORT": str(port),
           "TOLLGATE_ADMIN_TOKEN": ADMIN}  # fmt: skip
    for key in ("TOLLGATE_NATS_URL", "TOLLGATE_DATABASE_URL", "TOLLGATE_CONFIG"):
        env[key] = ""
    log = tmp_path / "up.log"
    api = f"http://127.0.0.1:{port}"
    subject, host = unique("alice"), unique("node")

    procs.append(up := tollgate(["up"], env, log))
    await wait_logged(lambda: ready(api), log, "readyz")
    endpoints = json.loads((data / "endpoints.json").read_text())
    assert endpoints["api_url"] == api
    assert (data / "nats" / "jetstream").is_dir() and (data / "postgres" / "pgdata").is_dir()
    await publish_raw(endpoints["nats_url"], "tollgate", host, 1, subject, 1000)
    await publish_raw(endpoints["nats_url"], "tollgate", host, 2, subject, 4500)

    async def counted() -> bool:
        return await usage_total(api, subject, "net.tx.wan.bytes") == 4500

    await wait_logged(counted, log, "usage visible in the API", timeout=30)
    assert stop(up, log) == 0
    assert not (data / "endpoints.json").exists()

    procs.append(again := tollgate(["up"], env, log))
    await wait_logged(lambda: ready(api), log, "readyz after restart")
    assert await usage_total(api, subject, "net.tx.wan.bytes") == 4500
    # Counters continue in the same epoch after the restart: only the increase counts.
    endpoints = json.loads((data / "endpoints.json").read_text())
    await publish_raw(endpoints["nats_url"], "tollgate", host, 3, subject, 5000)

    async def continued() -> bool:
        return await usage_total(api, subject, "net.tx.wan.bytes") == 5000

    await wait_logged(continued, log, "usage after restart", timeout=30)
    assert stop(again, log) == 0


async def test_services_run_one_by_one_against_external_servers_in_any_order(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc
) -> None:
    port = free_port()  # `nc` deletes this test's streams afterwards
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_DATA_DIR": str(tmp_path / "data"),
    }  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    subject, host = unique("bob"), unique("node")
    # The api first, the ledger last: each migrates under the advisory lock if it is first.
    for name in ("api", "policy", "ledger"):
        procs.append(tollgate([name], env, tmp_path / f"{name}.log"))
    await wait_logged(lambda: ready(api), tmp_path / "api.log", "api readyz")
    await wait_logged(
        lambda: ledger_listening(servers.nats_url, prefix), tmp_path / "ledger.log", "ledger"
    )
    await publish_raw(servers.nats_url, prefix, host, 1, subject, 777)

    async def counted() -> bool:
        return await usage_total(api, subject, "net.tx.wan.bytes") == 777

    await wait_logged(counted, tmp_path / "ledger.log", "usage through separate services", 60)
    # Nothing embedded was started: no data directories for servers.
    assert not (tmp_path / "data" / "nats").exists()
    assert not (tmp_path / "data" / "postgres").exists()
    for p in procs:
        assert stop(p, tmp_path / "x.log") == 0


async def test_up_with_external_servers_starts_nothing_embedded(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc
) -> None:
    port = free_port()  # `nc` deletes this test's streams afterwards
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_DATA_DIR": str(tmp_path / "data"),
    }  # fmt: skip
    log = tmp_path / "up.log"
    procs.append(up := tollgate(["up"], env, log))
    api = f"http://127.0.0.1:{port}"
    await wait_logged(lambda: ready(api), log, "readyz")
    endpoints = json.loads((tmp_path / "data" / "endpoints.json").read_text())
    assert endpoints["nats_url"] == servers.nats_url
    assert endpoints["database_url"] == database_url
    assert not (tmp_path / "data" / "nats").exists()
    assert not (tmp_path / "data" / "postgres").exists()
    assert stop(up, log) == 0


async def test_up_killed_with_sigkill_mid_ingest_restarts_and_counts_exactly(
    tmp_path: Path, procs: list
) -> None:
    data, port = tmp_path / "data", free_port()
    env = {
        "TOLLGATE_DATA_DIR": str(data), "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_NATS_URL": "", "TOLLGATE_DATABASE_URL": "",
    }  # fmt: skip
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    subject, host = unique("carol"), unique("node")
    procs.append(up := tollgate(["up"], env, log))
    await wait_logged(lambda: ready(api), log, "readyz")
    nats_url = json.loads((data / "endpoints.json").read_text())["nats_url"]
    # The servers outlive the killed parent (own session); publishing keeps going meanwhile.
    for seq in range(1, 41):
        await publish_raw(nats_url, "tollgate", host, seq, subject, seq * 1000)
        if seq == 20:
            up.kill()
            up.wait(10)
    procs.append(again := tollgate(["up"], env, log))
    await wait_logged(lambda: ready(api), log, "readyz after kill -9")
    nats_url = json.loads((data / "endpoints.json").read_text())["nats_url"]
    for seq in range(41, 51):
        await publish_raw(nats_url, "tollgate", host, seq, subject, seq * 1000)

    async def exact() -> bool:
        return await usage_total(api, subject, "net.tx.wan.bytes") == 50_000

    await wait_logged(exact, log, "every acked sample counted once", timeout=60)
    assert stop(again, log) == 0
