"""schemathesis against the OpenAPI schema with valid tokens: no request gets a server error.

The real app is served over HTTP from a thread of its own (schemathesis calls it
synchronously), on a seeded database, with rate limits off. Examples are bounded so the
whole run stays well under a minute.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import nats
import pytest
import uvicorn

from infra.db import connect_and_migrate
from infra.settings import Settings
from services.api.app import create_app
from services.api.bootstrap import listen
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique
from tests.integration.test_api_support import ADMIN, QUOTAS, SECRET, seed_scene
from tests.servers import TestServers

schemathesis = pytest.importorskip(
    "schemathesis", reason="the schemathesis package is missing: pip install schemathesis"
)
from hypothesis import HealthCheck, Phase, settings  # noqa: E402 - after the skip above
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    positive_data_acceptance,
)

EXAMPLES = 25


@dataclass
class LiveApi:
    url: str
    tokens: dict[str, str]


def _serve(servers: TestServers, data_dir: Path, ready: threading.Event, box: dict[str, object]):  # type: ignore[no-untyped-def]
    """Run in a thread: a database of its own, seeded, and the app on a loopback port."""

    async def main() -> None:
        name = unique("tg_schema_")
        admin = await asyncpg.connect(servers.database_url)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        url = urlsplit(servers.database_url)._replace(path=f"/{name}").geturl()
        pool = await connect_and_migrate(url)
        nc = await nats.connect(servers.nats_url)
        await seed_scene(pool)
        deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)), prefix=unique("t"))
        app = create_app(
            Settings(data_dir=data_dir, admin_token=ADMIN, token_secret=SECRET),
            deps=deps,
            options=ApiOptions(api_rate_per_second=0, spawn_check_timeout=0.2),
        )
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        box["server"] = server
        box["url"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
        ready.set()
        try:
            await server.serve(sockets=[sock])
        finally:
            await nc.close()
            await pool.close()
            admin = await asyncpg.connect(servers.database_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()

    try:
        asyncio.run(main())
    except BaseException as exc:  # reported by the fixture, which waits on `ready`
        box["error"] = exc
        ready.set()


@pytest.fixture(scope="module")
def live(servers: TestServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    ready, box = threading.Event(), {}  # type: ignore[var-annotated]
    thread = threading.Thread(
        target=_serve, args=(servers, tmp_path_factory.mktemp("schema"), ready, box), daemon=True
    )
    thread.start()
    assert ready.wait(60), "the API did not start within 60 s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    hour = timedelta(hours=1)
    tokens = {
        "admin": ADMIN,
        "user": issue_token(SECRET, "alice", Role.USER, hour),
        "integrator": issue_token(SECRET, "hub", Role.INTEGRATOR, hour),
    }
    try:
        yield LiveApi(str(box["url"]), tokens)
    finally:
        box["server"].should_exit = True  # type: ignore[attr-defined]
        thread.join(30)


# The schema the app publishes at /openapi.json, built without serving anything.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(admin_token=ADMIN, token_secret=SECRET), options=ApiOptions()).openapi()
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_generated_request_gets_a_server_error(case, live: LiveApi) -> None:  # type: ignore[no-untyped-def]
    for who, token in live.tokens.items():
        response = case.call(base_url=live.url, headers={"Authorization": f"Bearer {token}"})

        assert response.status_code < 500, (
            f"as {who}: {case.method} {case.formatted_path} {case.query} {case.body!r} -> "
            f"{response.status_code}: {response.text[:500]}"
        )
        # The documented statuses, content types and response schemas hold. Not claimed:
        # accepting every schema-valid input (names and times are checked beyond what
        # OpenAPI can say, with a 422 naming why), and refusing unknown query parameters.
        case.validate_response(
            response, excluded_checks=[positive_data_acceptance, negative_data_rejection]
        )
