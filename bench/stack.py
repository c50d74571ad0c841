"""One set of embedded servers for the whole run, the services as real processes, the machine."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]

from tollgate.embedded import EmbeddedNats, EmbeddedPostgres, free_port, nats_server_binary

ADMIN = "bench-admin-token"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    """Embedded NATS (sync_interval: always) and Postgres (synchronous_commit=on) in a temp dir."""

    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tollgate-bench-")))
    nats: EmbeddedNats | None = None
    pg: EmbeddedPostgres | None = None

    def start(self) -> Stack:
        self.nats = EmbeddedNats(self.work / "nats").start()
        self.pg = EmbeddedPostgres(self.work / "pg").start()
        return self

    def stop(self) -> None:
        if self.nats:
            self.nats.stop()
        if self.pg:
            self.pg.stop()

    @property
    def nats_url(self) -> str:
        assert self.nats
        return self.nats.url

    def db_url(self, name: str) -> str:
        assert self.pg
        return self.pg.url(name)

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.db_url("postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.db_url(name)


@dataclass
class Service:
    """`tollgate ledger|policy|api` as its own process; peak RSS and CPU read with psutil."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    peak_rss: int = 0
    _ps: psutil.Process | None = None
    _cpu0: float = 0.0
    _t0: float = 0.0

    @property
    def ps(self) -> psutil.Process:
        if self._ps is None:
            self._ps = psutil.Process(self.proc.pid)
        return self._ps

    def sample(self) -> None:
        """Take one RSS sample; raise if the service died (its log says why)."""
        if self.proc.returncode is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
        self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)

    def cpu_start(self) -> None:
        t = self.ps.cpu_times()
        self._cpu0, self._t0 = t.user + t.system, time.perf_counter()

    def cpu_share(self) -> float:
        """Cores used since cpu_start()."""
        t = self.ps.cpu_times()
        return (t.user + t.system - self._cpu0) / max(time.perf_counter() - self._t0, 1e-9)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class CpuMeter:
    """Cores used by a process and its children between start() and cores()."""

    def __init__(self, pid: int, children: bool = True) -> None:
        self.root = psutil.Process(pid)
        self.children = children
        self._seen: dict[int, float] = {}
        self._t0 = 0.0

    def _times(self) -> dict[int, float]:
        found = {}
        family = self.root.children(recursive=True) if self.children else []
        for proc in [self.root, *family]:
            try:
                t = proc.cpu_times()
                found[proc.pid] = t.user + t.system
            except psutil.Error:
                continue
        return found

    def start(self) -> None:
        self._seen, self._t0 = self._times(), time.perf_counter()

    def cores(self) -> float:
        now = self._times()
        used = sum(t - self._seen.get(pid, 0.0) for pid, t in now.items())
        return used / max(time.perf_counter() - self._t0, 1e-9)


def machine_busy_start() -> None:
    psutil.cpu_percent(None)


def machine_busy() -> float:
    """Cores busy on the whole machine since machine_busy_start(), whoever used them."""
    return float(psutil.cpu_percent(None)) / 100 * (psutil.cpu_count() or 1)


def service_env(stack: Stack, database: str, config: Path, api_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "TOLLGATE_NATS_URL": stack.nats_url,
        "TOLLGATE_DATABASE_URL": stack.db_url(database),
        "TOLLGATE_CONFIG": str(config),
        "TOLLGATE_LOG_LEVEL": "WARNING",
        "TOLLGATE_DATA_DIR": str(stack.work / "data"),
        "TOLLGATE_API_PORT": str(api_port),
        "TOLLGATE_ADMIN_TOKEN": ADMIN,
        "TOLLGATE_TOKEN_SECRET": "bench-secret",
        # Measure the work, not the API's per-client rate limiter.
        "TOLLGATE_API_RATE_PER_SECOND": "0",
        # The load's hosts date their samples on a synthetic clock that runs faster than
        # real time (10 s per round, from 3 h ago); trust it, or every sample is clamped.
        "TOLLGATE_MAX_CLOCK_SKEW": str(3650 * 86400),
    }


async def start_service(name: str, env: dict[str, str], logs: Path) -> Service:
    logs.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once per service start
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tollgate.cli", name, env=env, stdout=out, stderr=out, cwd=ROOT
        )
    return Service(name, proc, log)


async def wait_http(url: str, service: Service | None = None, seconds: float = 60) -> None:
    """Wait until `url` answers 200 (the api's /readyz, B4's endpoint)."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if service is not None:
                service.sample()
            try:
                if (await http.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def machine(stack: Stack, mode: str) -> dict[str, Any]:
    """What the figures were measured on, for the report."""
    conn = await asyncpg.connect(stack.db_url("postgres"))
    try:
        pg_version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    commit = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(  # noqa: ASYNC221 - once, before anything is measured
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": psutil.cpu_count(logical=True),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nats_server": _first_line([str(nats_server_binary()), "--version"]),
        "postgres": f"PostgreSQL {pg_version}",
        "durability": f"JetStream sync_interval: always; Postgres synchronous_commit={sync}",
        "commit": commit + ("+changes" if dirty else ""),
        "mode": mode,
    }


__all__ = ["ADMIN", "Service", "Stack", "free_port", "machine", "service_env", "start_service"]
