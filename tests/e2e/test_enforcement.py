"""The whole loop, as real processes: meter -> ledger -> policy -> terminate -> meter."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import unique
from tests.e2e.test_up import ready, tollgate, wait_logged
from tests.servers import TestServers
from tollgate.embedded import free_port

QUOTAS = """
quotas:
  - name: cpu-burst
    metric: cpu.used.seconds
    limit: 1 core*s
    window: {lifetime: true}
    applies_to: {users: [SUBJECT]}
    per: workload
    enforce: [terminate]
    termination: {reason: compute_quota_exceeded, grace_seconds: 1}
"""


async def test_a_workload_that_crosses_its_quota_is_terminated_with_the_reason(
    servers: TestServers, database_url: str, tmp_path: Path, procs: list, prefix: str, nc
) -> None:
    subject, port = unique("ivy"), free_port()
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS.replace("SUBJECT", subject))
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": "e2e", "TOLLGATE_DATA_DIR": str(tmp_path / "data"),
        "TOLLGATE_CONFIG": str(config),
    }  # fmt: skip
    log = tmp_path / "up.log"
    procs.append(tollgate(["up"], env, log))
    await wait_logged(lambda: ready(f"http://127.0.0.1:{port}"), log, "readyz")
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", "run", "--subject", subject, "--interval", "0.5",
        "--", sys.executable, "-c", "while True: pass",
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(run.communicate(), 90)
    except TimeoutError:
        run.kill()
        raise AssertionError(f"never terminated; log:\n{log.read_text()[-3000:]}") from None
    assert run.returncode == 128 + 15, stderr.decode()
    assert "compute_quota_exceeded" in stderr.decode()
