"""The HTTP API as a hostile caller uses it: odd path parameters and query strings.

Every answer is a 4xx with a message that names what to fix, never a 500, and a name that
could not be a subject is refused before any query runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.integration.test_api import (  # noqa: F401  (fixtures)
    admin_token,
    bearer,
    settings,
    shared_client,
    shared_pool,
)

# (path and query, status, what the detail says)
BAD_PATHS: list[tuple[str, int, str]] = [
    ("/v1/subjects/a%00b/usage", 422, "subject: must not contain control characters"),
    ("/v1/subjects/a%0Ab/quotas", 404, "no endpoint GET /v1/subjects/"),
    ("/v1/subjects/a%1B%5B2J/usage", 422, "subject: must not contain control characters"),
    ("/v1/subjects/a%C2%85/usage", 422, "subject: must not contain control characters"),
    ("/v1/subjects/a%E2%80%A8/usage", 422, "subject: must not contain control characters"),
    ("/v1/subjects/%ED%A0%80/usage", 422, "subject: "),
    ("/v1/subjects/a%FFb/usage", 422, "subject: "),
    ("/v1/subjects/%20alice/usage", 422, "whitespace"),
    ("/v1/subjects/" + "x" * 1000 + "/usage", 422, "1 to 200 characters"),
    ("/v1/subjects/" + "\u00e9" * 201 + "/quotas", 422, "1 to 200 characters"),
    ("/v1/workloads/w%00", 422, "workload: must not contain control characters"),
    ("/v1/workloads/%ED%A0%80", 422, "workload: "),
    ("/v1/workloads/w?subject=a%00", 422, "subject: must not contain control characters"),
    ("/v1/subjects/alice/usage?from=%00", 422, "from: "),
    ("/v1/subjects/alice/usage?from=" + "9" * 5000, 422, "from: "),
    ("/v1/subjects/alice/usage?from=NaN", 422, "from: "),
    ("/v1/subjects/alice/usage?to=-1", 422, "to: "),
    ("/v1/subjects/alice/usage?group_by=unknown", 422, "group_by: "),
    ("/v1/subjects/alice/usage?group_by=metric%00", 422, "group_by: "),
    ("/v1/subjects/alice/usage?metric=log.%00bytes", 422, "metric: "),
    ("/v1/subjects/alice/usage?tz=%00", 422, "tz: "),
    ("/v1/subjects/alice/usage?tz=" + "A" * 5000, 422, "tz: "),
    ("/v1/events?after=-1", 422, "after: "),
    ("/v1/events?after=abc", 422, "after: "),
    ("/v1/events?after=" + "9" * 40, 422, "after: "),
    ("/v1/events?limit=-1", 422, "limit: "),
    ("/v1/events?limit=0", 422, "limit: "),
    ("/v1/events?limit=" + "9" * 40, 422, "limit: "),
    ("/v1/events?limit=1e9", 422, "limit: "),
    ("/v1/reports/usage?group_by=unknown", 422, "group_by: "),
    ("/v1/reports/usage?format=xml", 422, "format: "),
    ("/v1/reports/usage?from=2031-05-01T00:00:00Z&to=garbage", 422, "to: "),
]


@pytest.mark.parametrize(("path", "status", "says"), BAD_PATHS, ids=[p[0][:60] for p in BAD_PATHS])
async def test_a_hostile_path_or_query_is_a_4xx_that_says_what_is_wrong(
    shared_client: httpx.AsyncClient,  # noqa: F811
    admin_token: str,  # noqa: F811
    path: str,
    status: int,
    says: str,
) -> None:
    r = await shared_client.get(path, headers=bearer(admin_token))

    assert r.status_code == status, r.text
    assert says in r.json()["detail"], r.json()


async def test_a_dotted_traversal_name_is_only_a_name_and_finds_nothing(
    shared_client: httpx.AsyncClient,  # noqa: F811
    admin_token: str,  # noqa: F811
) -> None:
    r = await shared_client.get("/v1/subjects/..%2F/usage", headers=bearer(admin_token))

    assert r.status_code == 200, r.text
    assert (r.json()["subject"], r.json()["rows"]) == ("../", [])


async def test_a_huge_body_is_refused_with_413_before_it_is_read_whole(
    shared_client: httpx.AsyncClient,  # noqa: F811
    admin_token: str,  # noqa: F811
) -> None:
    huge = b'{"subject": "a", "groups": ["' + b"g" * (2 << 20) + b'"]}'

    declared = await shared_client.post(
        "/v1/spawn-checks", content=huge, headers={"Content-Type": "application/json"}
    )

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536]

    streamed = await shared_client.post(
        "/v1/spawn-checks",
        content=chunks(),
        headers={**bearer(admin_token), "Content-Type": "application/json"},
    )

    for r in (declared, streamed):
        assert r.status_code == 413, r.text
        assert "over the 1 MiB limit" in r.json()["detail"]
