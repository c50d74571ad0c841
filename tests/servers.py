"""Real NATS and Postgres for the test suite.

Order of preference: TOLLGATE_TEST_NATS_URL / TOLLGATE_TEST_DATABASE_URL when set; a Docker
engine through testcontainers when one answers; otherwise the embedded binaries that
`tollgate up` uses, started once per test session on free ports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tollgate.embedded import EmbeddedNats, EmbeddedPostgres


@dataclass
class TestServers:
    __test__ = False  # a fixture value, not a test class

    nats_url: str
    database_url: str
    how: str
    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None


def docker_answers() -> bool:
    """True when a Docker engine responds (never here; common on laptops and CI elsewhere)."""
    try:
        import docker  # comes with testcontainers

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # any failure means: no usable engine
        return False


@contextlib.contextmanager
def _containers() -> Iterator[tuple[str, str]]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer

    with (
        DockerContainer("nats:2.11").with_command("-js").with_exposed_ports(4222) as nats,
        PostgresContainer("postgres:17", driver=None) as pg,
    ):
        wait_for_logs(nats, "Server is ready")
        host = nats.get_container_host_ip()
        yield f"nats://{host}:{nats.get_exposed_port(4222)}", pg.get_connection_url()


@contextlib.contextmanager
def test_servers(workdir: Path) -> Iterator[TestServers]:
    nats_url = os.environ.get("TOLLGATE_TEST_NATS_URL")
    db_url = os.environ.get("TOLLGATE_TEST_DATABASE_URL")
    if nats_url and db_url:
        yield TestServers(nats_url, db_url, "external servers from TOLLGATE_TEST_*")
        return
    if not nats_url and not db_url and docker_answers():
        with _containers() as (n, d):
            yield TestServers(n, d, "testcontainers")
        return
    nats = postgres = None
    try:
        if not nats_url:
            nats = EmbeddedNats(workdir / "nats").start()
            nats_url = nats.url
        if not db_url:
            postgres = EmbeddedPostgres(workdir / "postgres").start()
            db_url = postgres.url()
        yield TestServers(nats_url, db_url, "embedded servers", nats, postgres)
    finally:
        if nats is not None:
            nats.stop()
        if postgres is not None:
            postgres.stop()
