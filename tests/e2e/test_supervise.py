"""`tollgate up` looks after the servers it started: kill -9, lost data, Ctrl-C in every state.

Each test runs the real command as a subprocess and does to its servers what a crash, an
operator or the OOM killer would. The figures (recovery after kill -9, time to stop) are
printed: run with `-s` to see them. No test holds them to a threshold.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
import psutil
import pytest

from contracts.spawn import SpawnRequest
from tests.conftest import unique, wait_until
from tests.e2e.test_up import ADMIN, ready, tollgate, usage_total, wait_logged
from tollgate.embedded import free_port

METRIC = "net.tx.wan.bytes"


def up_env(data: Path, port: int) -> dict[str, str]:
    return {
        "TOLLGATE_DATA_DIR": str(data), "TOLLGATE_API_PORT": str(port),
        "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_NATS_URL": "", "TOLLGATE_DATABASE_URL": "",
        "TOLLGATE_CONFIG": "",
    }  # fmt: skip


def server_pid(data: Path, server: str) -> int:
    """The pid the server itself wrote (new after each restart)."""
    pid_file = (
        data / "nats" / "nats.pid"
        if server == "nats-server"
        else data / "postgres" / "pgdata" / "postmaster.pid"
    )
    return int(pid_file.read_text().split()[0])


async def gone(pid: int) -> bool:
    """No such process any more, or only its exit status is left for a parent to collect
    (a server orphaned by a forced stop is reaped by init, if init reaps)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def reaped(pid: int) -> bool:
    """Not even a zombie is left: its parent, `tollgate up`, waited for it."""
    return not psutil.pid_exists(pid)


async def logged(log: Path, text: str) -> bool:
    return text in log.read_text()


async def logged_any(log: Path, texts: tuple[str, ...]) -> bool:
    found = log.read_text()
    return any(text in found for text in texts)


async def publish(nats_url: str, host: str, seq: int, subject: str, workload: str, value: int):
    """A raw counter batch, as any meter sends it; returns once JetStream has acked it."""
    body = json.dumps({
        "schema": "tollgate.counter_batch.v1", "host": host, "epoch": "e2e", "seq": seq,
        "sampled_at": datetime.now(UTC).isoformat(),
        "counters": [{"subject": subject, "workload": workload, "metric": METRIC,
                      "value": value}],
    }).encode()  # fmt: skip
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(
            f"tollgate.v1.samples.{host}", body, headers={"Nats-Msg-Id": f"{host}:e2e:{seq}"}
        )
    finally:
        await nc.close()


async def spawn_check(nats_url: str, subject: str) -> dict | None:
    """The policy's answer on NATS, or None while it does not answer."""
    nc = await nats.connect(nats_url)
    try:
        request = SpawnRequest(subject=subject, workload=unique("w")).to_json()
        reply = await nc.request("tollgate.v1.spawn.check", request, timeout=2)
        return dict(json.loads(reply.data))
    except (nats.errors.Error, OSError):
        return None
    finally:
        await nc.close()


async def spawn_answered(nats_url: str, subject: str) -> bool:
    """The policy answers spawn checks (its subscription is back after a restart)."""
    return await spawn_check(nats_url, subject) is not None


def stop_timed(proc: subprocess.Popen[bytes], sig: int, log: Path) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not stop on {sig}; log:\n{log.read_text()[-3000:]}") from None
    return code, time.monotonic() - started


def assert_clean(log: Path) -> None:
    text = log.read_text()
    for wall in ("Traceback", "Task was destroyed", "ConnectionResetError", "never retrieved"):
        assert wall not in text, f"{wall!r} in the output of `tollgate up`:\n{text[-4000:]}"


async def test_up_restarts_each_embedded_server_killed_with_sigkill_and_counts_every_sample_once(
    tmp_path: Path, procs: list
) -> None:
    data, port = tmp_path / "data", free_port()
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    subject, host = unique("dana"), unique("node")
    procs.append(up := tollgate(["up", "--demo"], up_env(data, port), log))
    await wait_logged(lambda: ready(api), log, "readyz")
    nats_url = json.loads((data / "endpoints.json").read_text())["nats_url"]
    seq, expected = 0, 0

    async def sample(workload: str, value: int) -> None:
        nonlocal seq, expected
        seq, expected = seq + 1, expected + value
        await publish(nats_url, host, seq, subject, workload, value)

    async def exact() -> bool:
        return await usage_total(api, subject, METRIC) == expected

    await sample("from-the-start", 1000)
    await wait_logged(exact, log, "the first sample counted", timeout=60)
    for server in ("nats-server", "postgres"):
        pid = server_pid(data, server)
        # Acked just before the kill, maybe not folded yet: it must be counted all the same.
        await sample(f"before-{server}-died", 500)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await wait_logged(lambda: reaped(pid), log, f"{server} reaped", timeout=30)  # noqa: B023
        await wait_logged(lambda: ready(api), log, f"readyz after kill -9 of {server}", 120)
        back = time.monotonic() - killed
        await sample(f"after-{server}-came-back", 250)
        await wait_logged(exact, log, f"exact usage after {server} came back", timeout=120)
        seen = time.monotonic() - killed
        print(
            f"\nkill -9 {server}: /readyz 200 again {back:.2f} s later, "
            f"a new sample visible in the API {seen:.2f} s later"
        )
        assert server_pid(data, server) != pid
        text = log.read_text()
        assert f"{server} (pid {pid}) was killed by SIGKILL; restarting it on port" in text
        assert f"{server} is back on port" in text
        await wait_logged(
            lambda: spawn_answered(nats_url, subject), log, f"spawn checks after {server}", 60
        )
    # The policy's usage feed resumed too: a sample past the demo's 10 GB egress quota
    # (it applies to all) turns this subject's spawn checks into denials.
    await sample("over-the-egress-quota", 11 * 10**9)
    await wait_logged(exact, log, "the sample over the quota counted", timeout=60)

    async def denied() -> bool:
        decision = await spawn_check(nats_url, subject)
        return decision is not None and decision["reason"] == "quota_exceeded"

    await wait_logged(denied, log, "the policy denying from usage after both restarts", 60)
    # The demo fleet reconnected by itself: alice's counters are still coming in.
    alice = await usage_total(api, "alice", "mem.alloc.byte_seconds")
    assert alice is not None

    async def demo_goes_on() -> bool:
        now = await usage_total(api, "alice", "mem.alloc.byte_seconds")
        return now is not None and now > alice

    await wait_logged(demo_goes_on, log, "demo fleet usage after both restarts", timeout=60)
    assert await usage_total(api, subject, METRIC) == expected  # still once, after redelivery
    pids = [server_pid(data, "nats-server"), server_pid(data, "postgres")]
    code, took = stop_timed(up, signal.SIGINT, log)
    print(f"Ctrl-C after both restarts (healthy): exit {code} in {took:.2f} s")
    assert code == 0
    assert_clean(log)
    for pid in pids:
        assert await gone(pid)


def _freeze_postgres_backend(data: Path) -> psutil.Process:
    """Stop one of Postgres's own processes: while it is attached to the shared memory, a
    new postmaster refuses to start ("pre-existing shared memory block is still in use")."""
    postmaster = psutil.Process(server_pid(data, "postgres"))
    child = postmaster.children()[0]
    child.suspend()
    return child


async def test_up_exits_with_what_to_do_when_the_port_of_a_killed_server_was_taken(
    tmp_path: Path, procs: list
) -> None:
    data, port = tmp_path / "data", free_port()
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    procs.append(up := tollgate(["up"], up_env(data, port), log))
    await wait_logged(lambda: ready(api), log, "readyz")
    pg_port = int(json.loads((data / "endpoints.json").read_text())["database_url"]
                  .rsplit(":", 1)[1].split("/")[0])  # fmt: skip
    # A stuck old backend makes the first restarts fail; meanwhile someone takes the port.
    frozen = _freeze_postgres_backend(data)
    try:
        os.kill(server_pid(data, "postgres"), signal.SIGKILL)
        await wait_logged(lambda: logged(log, "postgres did not come back"), log,
                          "a failed restart of postgres", timeout=60)  # fmt: skip
        squatter = socket.create_server(("127.0.0.1", pg_port))
        frozen.kill()
        frozen = None
        try:
            code = up.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"hangs; log:\n{log.read_text()[-3000:]}") from None
        finally:
            squatter.close()
    finally:
        if frozen is not None:
            frozen.kill()
    assert code == 1
    text = log.read_text()
    assert f"postgres died and cannot be restarted: port {pg_port}" in text
    assert f"is now taken by pid {os.getpid()}" in text
    assert "Stop that process, or stop `tollgate up` and start it again" in text
    assert_clean(log)


async def test_up_exits_with_what_to_do_when_a_killed_server_lost_its_data_directory(
    tmp_path: Path, procs: list
) -> None:
    data, port = tmp_path / "data", free_port()
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    procs.append(up := tollgate(["up"], up_env(data, port), log))
    await wait_logged(lambda: ready(api), log, "readyz")
    nats_pid, pg_pid = server_pid(data, "nats-server"), server_pid(data, "postgres")
    psutil.Process(nats_pid).suspend()  # so it writes nothing while its data goes
    shutil.rmtree(data / "nats" / "jetstream")
    killed = time.monotonic()
    os.kill(nats_pid, signal.SIGKILL)
    try:
        code = up.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"hangs with NATS gone; log:\n{log.read_text()[-3000:]}") from None
    took = time.monotonic() - killed
    print(f"\nNATS data directory removed, kill -9: `tollgate up` exited {took:.2f} s later")
    assert code == 1
    text = log.read_text()
    assert "An embedded server is gone." in text
    assert f"{data / 'nats' / 'jetstream'} is gone" in text
    assert "Restore it from a backup and run `tollgate up` again" in text
    assert_clean(log)
    await wait_until(lambda: gone(pg_pid), timeout=30, what="postgres stopped as well")
    assert not (data / "endpoints.json").exists()


@pytest.mark.parametrize(
    ("state", "sig"),
    [
        ("nats frozen", signal.SIGTERM),
        ("nats just killed", signal.SIGINT),
        ("postgres mid-restart", signal.SIGINT),
    ],
)
async def test_ctrl_c_or_sigterm_stops_everything_in_seconds_with_exit_0_in_each_state(
    state: str, sig: int, tmp_path: Path, procs: list
) -> None:
    data, port = tmp_path / "data", free_port()
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    procs.append(up := tollgate(["up", "--demo"], up_env(data, port), log))
    await wait_logged(lambda: ready(api), log, "readyz")
    pids = [server_pid(data, "nats-server"), server_pid(data, "postgres")]
    frozen: psutil.Process | None = None
    try:
        if state == "nats frozen":
            # Connections stay open and nothing answers: every request waits for its timeout.
            psutil.Process(pids[0]).suspend()
            # The demo is publishing by now, or (frozen before it began) setting up streams.
            waits = ("demo: publish", "waiting for NATS JetStream")
            await wait_logged(
                lambda: logged_any(log, waits), log, "the demo waiting on frozen NATS", timeout=30
            )
        elif state == "nats just killed":
            os.kill(pids[0], signal.SIGKILL)
        else:
            frozen = _freeze_postgres_backend(data)
            os.kill(pids[1], signal.SIGKILL)
            await wait_logged(
                lambda: logged(log, "postgres did not come back"),
                log, "a failed restart of postgres", timeout=60,
            )  # fmt: skip
        code, took = stop_timed(up, sig, log)
    finally:
        if frozen is not None:
            frozen.kill()
    print(f"\n{signal.Signals(sig).name} with {state}: exit {code} in {took:.2f} s")
    assert code == 0
    assert "Stopped. Data kept in" in log.read_text()
    assert_clean(log)
    for pid in [*pids, server_pid(data, "nats-server")]:
        await wait_until(lambda: gone(pid), timeout=30, what=f"pid {pid} stopped")  # noqa: B023


async def test_a_second_ctrl_c_stops_at_once_with_exit_130(tmp_path: Path, procs: list) -> None:
    data, port = tmp_path / "data", free_port()
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{port}"
    procs.append(up := tollgate(["up", "--demo"], up_env(data, port), log))
    await wait_logged(lambda: ready(api), log, "readyz")
    pids = [server_pid(data, "nats-server"), server_pid(data, "postgres")]
    # A frozen Postgres makes the clean stop slow (closing connections waits for it).
    psutil.Process(pids[1]).suspend()
    up.send_signal(signal.SIGINT)
    await wait_logged(lambda: logged(log, "Ctrl-C again stops at once"), log,
                      "the first Ctrl-C heard", timeout=30)  # fmt: skip
    code, took = stop_timed(up, signal.SIGINT, log)
    print(f"\nsecond Ctrl-C: exit {code} {took:.2f} s after it")
    assert code == 130
    text = log.read_text()
    assert "Stopped at once (second SIGINT, exit 130)" in text
    assert "Stopped. Data kept in" not in text  # the clean stop was indeed cut short
    assert_clean(log)
    for pid in pids:
        await wait_until(lambda: gone(pid), timeout=30, what=f"pid {pid} stopped")  # noqa: B023
    assert not (data / "endpoints.json").exists()
