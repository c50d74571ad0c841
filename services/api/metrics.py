"""The API's own Prometheus metrics, and the middleware that counts every request."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "tollgate_api_requests",
    "HTTP requests answered, by route and status",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "tollgate_api_request_seconds",
    "Time to answer an HTTP request, by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SPAWN_CHECKS = Counter(
    "tollgate_api_spawn_checks",
    "Spawn checks forwarded over HTTP, by outcome (policy_unavailable: answered by failure_mode)",
    ["outcome"],
)
RATE_LIMITED = Counter("tollgate_api_rate_limited", "Requests refused with 429 by the rate limit")
HUB_CHECKS = Counter(
    "tollgate_api_hub_checks", "JupyterHub token checks sent to the hub, by result", ["result"]
)


class RequestMetrics:
    """Counts requests by route template (never the raw path: names stay out of labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(scope["method"], name, str(status)).inc()
            LATENCY.labels(name).observe(time.perf_counter() - started)
