"""JupyterHub hooks: ask Tollgate before a server starts; report its allocation until it stops.

In `jupyterhub_config.py` (the hub's environment has `pip install 'tollgate[jupyterhub]'`):

    from tollgate.jupyterhub import TollgateHooks
    hooks = TollgateHooks.from_env()
    c.Spawner.pre_spawn_hook = hooks.pre_spawn_hook
    c.Spawner.post_stop_hook = hooks.post_stop_hook

`pre_spawn_hook` posts a spawn check (user name, hub groups, requested resources) to
`POST /v1/spawn-checks`; a denial stops the spawn with the decision's sentence on the user's
page. With NATS configured the hook then acts as the meter of the server's *allocation*
(the 2i2c design: requested resources x time running): `workload_started`, a cumulative
counter batch every `reading_interval` seconds, and at stop a `final` batch and
`workload_stopped`. Importing this module connects to nothing and needs neither FastAPI nor
asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx
from jupyterhub.spawner import Spawner, SpawnException
from pydantic import ValidationError

from contracts._base import check_prefix, utcnow
from contracts.samples import CounterBatch, CounterSample, samples_subject
from contracts.spawn import SpawnDecision, SpawnRequest
from contracts.workloads import Resources, WorkloadStarted, WorkloadStopped, workloads_subject
from services.meter.domain import allocations
from services.meter.messages import Message

if TYPE_CHECKING:  # the link (FastStream) is imported when the first spawn needs it
    from services.meter.publisher import MeterLink

log = logging.getLogger("tollgate.jupyterhub")
FailureMode = Literal["open", "closed"]
# node_selector keys that name the GPU model on common Kubernetes clusters.
GPU_MODEL_LABELS = (
    "nvidia.com/gpu.product",
    "cloud.google.com/gke-accelerator",
    "k8s.amazonaws.com/accelerator",
)
ASK_ADMIN = "Try again in a few minutes, and tell your hub's admin if this persists."


class QuotaDenied(SpawnException):  # type: ignore[misc]
    """Tollgate refused the spawn: the user sees the decision's sentence (and Retry-After)."""

    def __init__(self, decision: SpawnDecision, quota_page_url: str | None = None) -> None:
        link = (
            f' <a href="{html.escape(quota_page_url)}">See your quotas</a>.'
            if quota_page_url
            else ""
        )
        super().__init__(
            decision.message,
            reason=decision.reason,
            log_message=f"Tollgate denied the spawn (decision {decision.decision_id}): "
            f"{decision.message}",
            message_html=html.escape(decision.message) + link,
            status_code=403,
        )
        self.decision = decision
        self.retry_at = decision.retry_at
        # What the hub's pages and API show instead of str(exception).
        self.jupyterhub_message = decision.message
        self.jupyterhub_html_message = self.message_html
        self.headers: dict[str, str] = {}
        if decision.retry_at is not None:
            wait = math.ceil((decision.retry_at - utcnow()).total_seconds())
            self.headers["Retry-After"] = str(max(wait, 1))


class QuotaCheckFailed(SpawnException):  # type: ignore[misc]
    """No usable decision and the hooks fail closed, or the hub is misconfigured."""

    def __init__(self, message: str, *, reason: str, log_message: str, status_code: int) -> None:
        super().__init__(message, reason=reason, log_message=log_message, status_code=status_code)
        self.jupyterhub_message = message


@dataclass(frozen=True)
class Unavailable:
    """Tollgate could not be asked (down, 5xx, 429, timeout, an unreadable answer)."""

    why: str


@dataclass(frozen=True)
class Refused:
    """Tollgate refused the hub's request (4xx): a configuration problem of the hub."""

    status: int
    detail: str


@dataclass
class Run:
    """One start of one server, as metered by the hub: its identity and allocation."""

    workload: str
    epoch: str
    subject: str
    host: str
    resources: Resources
    started_at: datetime
    last_seq: int = -1
    reporter: asyncio.Task[None] | None = field(default=None, repr=False)

    def batch(self, at: datetime, final: bool) -> CounterBatch:
        """Cumulative allocation from the start to `at`; seq is milliseconds since the start.

        Deriving epoch and seq from the start makes them the same after a hub restart.
        """
        micros = max((at - self.started_at) // _MICROSECOND, 0)
        self.last_seq = max(self.last_seq + 1, micros // 1000)
        values = allocations(self.resources, Decimal(micros) / 1_000_000)
        gpu = {"gpu_model": self.resources.gpu_model} if self.resources.gpu_model else {}
        counters = [
            CounterSample(subject=self.subject, workload=self.workload, metric=metric,
                          value=value, labels=gpu if metric.startswith("gpu.") else {})
            for metric, value in values.items()
        ]  # fmt: skip
        return CounterBatch(
            host=self.host, epoch=self.epoch, seq=self.last_seq, sampled_at=at,
            counters=counters, final=final,
        )  # fmt: skip


_MICROSECOND = datetime.resolution


def workload_id(user: str, server: str, started_at: datetime) -> str:
    """A stable id for one start of one server: `jupyter:<user>:<server>:<start>`."""
    safe = "@+.-_~"
    stamp = started_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"jupyter:{quote(user, safe=safe)}:{quote(server, safe=safe)}:{stamp}"


def requested_resources(
    spawner: Spawner,
    charge: Literal["limit", "guarantee"] = "limit",
    gpu_key: str = "nvidia.com/gpu",
) -> Resources:
    """What the server asks for: CPU, memory (limit or guarantee, else the other) and GPUs.

    GPUs and their model come from KubeSpawner's `extra_resource_limits` /
    `extra_resource_guarantees` and `node_selector` when the spawner has them.
    """
    order = ("limit", "guarantee") if charge == "limit" else ("guarantee", "limit")
    cpus = next((v for k in order if (v := getattr(spawner, f"cpu_{k}", None))), None)
    mem = next((v for k in order if (v := getattr(spawner, f"mem_{k}", None))), None)
    gpus = 0
    for k in order:
        extra = getattr(spawner, f"extra_resource_{k}s", None) or {}
        if extra.get(gpu_key):
            gpus = int(extra[gpu_key])
            break
    selector = getattr(spawner, "node_selector", None) or {}
    model = next((str(selector[k]) for k in GPU_MODEL_LABELS if selector.get(k)), None)
    return Resources(
        cpus=Decimal(repr(float(cpus))) if cpus else Decimal(0),
        mem_bytes=int(mem or 0),
        gpus=gpus,
        gpu_model=model if gpus else None,
    )


class TollgateHooks:
    """`pre_spawn_hook` and `post_stop_hook` for `c.Spawner`, talking to one Tollgate."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        failure_mode: FailureMode = "open",
        host: str | None = None,
        expected_seconds: float = 3600,
        timeout: float = 10.0,
        nats_url: str | None = None,
        nats_seed_file: str | None = None,
        prefix: str = "tollgate",
        reading_interval: float = 60.0,
        charge: Literal["limit", "guarantee"] = "limit",
        quota_page_url: str | None = None,
        flush_timeout: float = 5.0,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"api_url {api_url!r} must be an http:// or https:// URL of the API")
        if not token:
            raise ValueError(
                "no integrator token: set TOLLGATE_INTEGRATOR_TOKEN to the output of "
                "`tollgate token issue --subject jupyterhub --role integrator`"
            )
        if failure_mode not in ("open", "closed"):
            raise ValueError(f"failure_mode must be 'open' or 'closed', got {failure_mode!r}")
        if charge not in ("limit", "guarantee"):
            raise ValueError(f"charge must be 'limit' or 'guarantee', got {charge!r}")
        if expected_seconds < 0 or timeout <= 0 or reading_interval < 0 or flush_timeout < 0:
            raise ValueError(
                "expected_seconds, reading_interval and flush_timeout must not be negative, "
                "and timeout must be positive"
            )
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.failure_mode = failure_mode
        self.host = host or f"jupyterhub-{socket.gethostname()}"
        self.expected_seconds = Decimal(repr(float(expected_seconds)))
        self.timeout = timeout
        self.nats_url = nats_url
        # The hub's NATS identity against a secured server: a host seed from
        # `tollgate nats-config --host <its host name>`.
        self.nats_seed_file = Path(nats_seed_file) if nats_seed_file else None
        self.prefix = check_prefix(prefix)
        self.reading_interval = reading_interval
        self.charge = charge
        self.quota_page_url = quota_page_url
        self.flush_timeout = flush_timeout
        self.runs: dict[tuple[str, str], Run] = {}
        self._link: MeterLink | None = None
        self._sending = asyncio.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> TollgateHooks:
        # traitlets deep-copies config values into every Spawner, bound methods and their
        # object included: without this each spawner and each hook would get its own copy,
        # and post_stop_hook would never see what pre_spawn_hook started.
        return self

    @classmethod
    def from_env(cls, **overrides: Any) -> TollgateHooks:
        """Hooks configured from TOLLGATE_* variables (README, "JupyterHub"); keywords win."""
        env = os.environ
        number = _env_number
        found: dict[str, Any] = {
            "api_url": env.get("TOLLGATE_API_URL", ""),
            "token": env.get("TOLLGATE_INTEGRATOR_TOKEN", ""),
            "failure_mode": env.get("TOLLGATE_HUB_FAILURE_MODE", "open"),
            "host": env.get("TOLLGATE_HUB_HOST") or None,
            "expected_seconds": number("TOLLGATE_HUB_EXPECTED_SECONDS", 3600),
            "timeout": number("TOLLGATE_HUB_TIMEOUT", 10),
            "nats_url": env.get("TOLLGATE_NATS_URL") or None,
            "nats_seed_file": env.get("TOLLGATE_NATS_NKEY_SEED_FILE") or None,
            "prefix": env.get("TOLLGATE_PREFIX", "tollgate"),
            "reading_interval": number("TOLLGATE_HUB_READING_INTERVAL", 60),
            "charge": env.get("TOLLGATE_HUB_CHARGE", "limit"),
            "quota_page_url": env.get("TOLLGATE_HUB_QUOTA_PAGE_URL") or None,
        }
        found.update(overrides)
        if not found["api_url"]:
            raise ValueError("TOLLGATE_API_URL is not set: the URL of Tollgate's API")
        return cls(**found)

    async def pre_spawn_hook(self, spawner: Spawner) -> None:
        """Ask Tollgate; raise the exception JupyterHub shows the user when the answer is no."""
        user, server = spawner.user.name, spawner.name or ""
        self._forget(user, server)
        started = spawner.orm_spawner.started
        started_at = started.replace(tzinfo=UTC) if started is not None else utcnow()
        resources = requested_resources(spawner, self.charge)
        request = SpawnRequest(
            subject=user,
            groups=sorted(g.name for g in spawner.user.groups),
            workload=workload_id(user, server, started_at),
            host=self.host,
            resources=resources,
            expected_seconds=self.expected_seconds,
        )
        self._judge(user, await self._ask(request))
        await self._start(user, server, request, started_at)

    async def post_stop_hook(self, spawner: Spawner) -> None:
        """Report the server's final allocation reading and `workload_stopped`."""
        user, server = spawner.user.name, spawner.name or ""
        run = self._forget(user, server)
        if run is None:
            # Denied spawns end here too: JupyterHub stops a server whose start failed.
            log.info(
                "no allowed start of %s's server %r is known to this hub process (denied, or "
                "started before the hub restarted); nothing to report", user, server,
            )  # fmt: skip
            return
        link = self._meter_link()
        if link is None:
            log.warning("TOLLGATE_NATS_URL is not set: the allocation of %s is not reported "
                        "to Tollgate", run.workload)  # fmt: skip
            return
        now = utcnow()
        final = run.batch(now, final=True)
        stopped = WorkloadStopped(workload=run.workload, subject=run.subject, host=run.host,
                                  stopped_at=now)  # fmt: skip
        deadline = time.monotonic() + self.flush_timeout
        if final.counters:
            link.enqueue(self._samples(final))
        link.enqueue(self._lifecycle(run, stopped.to_json(), "stopped"))
        if not await self._send(link, None, deadline):
            log.error("could not deliver the final reading of %s to NATS at %s within %g s; it "
                      "is sent the next time this hub reports to NATS", run.workload,
                      self.nats_url, self.flush_timeout)  # fmt: skip

    async def close(self) -> None:
        """Stop the periodic readings and disconnect from NATS."""
        for run in list(self.runs.values()):
            _cancel(run)
        if self._link is not None:
            await self._link.close()
            self._link = None

    def _judge(self, user: str, answer: SpawnDecision | Unavailable | Refused) -> None:
        """Return when the spawn may go ahead; raise what JupyterHub shows the user if not."""
        if isinstance(answer, Refused):
            log.error(
                "Tollgate refused the hub's spawn check for %s with HTTP %d: %s. This is a hub "
                "configuration problem: check TOLLGATE_INTEGRATOR_TOKEN (an integrator token "
                "from `tollgate token issue --role integrator`) and TOLLGATE_API_URL (%s).",
                user, answer.status, answer.detail, self.api_url,
            )  # fmt: skip
            raise QuotaCheckFailed(
                "Your server was not started: the hub's quota check is misconfigured "
                f"(Tollgate answered HTTP {answer.status}). Please tell your hub's admin.",
                reason="quota_check_misconfigured",
                log_message=f"spawn check refused: HTTP {answer.status}: {answer.detail}",
                status_code=500,
            )
        if isinstance(answer, Unavailable):
            if self.failure_mode == "open":
                log.warning("no spawn decision for %s (%s); allowing it (fail open)", user,
                            answer.why)  # fmt: skip
                return
            log.error("no spawn decision for %s (%s); refusing (fail closed)", user, answer.why)
            raise QuotaCheckFailed(
                "Your server was not started: the quota service could not be reached to "
                f"check your quota. {ASK_ADMIN}",
                reason="quota_service_unavailable",
                log_message=f"no spawn decision: {answer.why}",
                status_code=503,
            )
        if not answer.allowed:
            raise QuotaDenied(answer, self.quota_page_url)
        # An allowed spawn near a limit (or allowed only by Tollgate's own failure_mode) says so.
        worth_a_warning = answer.fail_open or any(q.state != "ok" for q in answer.quotas)
        log.log(logging.WARNING if worth_a_warning else logging.INFO,
                "spawn for %s allowed: %s", user, answer.message)  # fmt: skip

    async def _ask(self, request: SpawnRequest) -> SpawnDecision | Unavailable | Refused:
        url = f"{self.api_url}/v1/spawn-checks"
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                r = await client.post(url, content=request.to_json(), headers=headers)
        except httpx.TimeoutException:
            return Unavailable(f"{url} did not answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return Unavailable(f"cannot reach {url}: {exc or type(exc).__name__}")
        if r.status_code == 429 or r.status_code >= 500:
            return Unavailable(f"{url} answered HTTP {r.status_code}: {_detail(r)}")
        if r.status_code != 200:
            return Refused(r.status_code, _detail(r))
        try:
            return SpawnDecision.model_validate_json(r.content)
        except ValidationError as exc:
            return Unavailable(f"the answer of {url} is not a spawn decision: {exc}")

    async def _start(self, user: str, server: str, request: SpawnRequest, at: datetime) -> None:
        assert request.workload is not None and request.host is not None  # set by pre_spawn_hook
        run = Run(
            workload=request.workload,
            epoch=hashlib.sha256(request.workload.encode()).hexdigest()[:16],
            subject=user, host=request.host, resources=request.resources, started_at=at,
        )  # fmt: skip
        self.runs[(user, server)] = run
        link = self._meter_link()
        if link is None:
            return
        started = WorkloadStarted(
            workload=run.workload, subject=user, groups=request.groups, host=run.host,
            resources=run.resources, started_at=at,
        )  # fmt: skip
        link.enqueue(self._lifecycle(run, started.to_json(), "started"))
        # Best effort now; whatever did not go is sent before the next reading.
        await self._send(link, None, time.monotonic() + 2.0)
        if self.reading_interval > 0:
            run.reporter = asyncio.create_task(self._report(run, link))

    async def _report(self, run: Run, link: MeterLink) -> None:
        while True:
            await asyncio.sleep(self.reading_interval)
            batch = run.batch(utcnow(), final=False)
            await self._send(link, self._samples(batch) if batch.counters else None, 0)

    async def _send(self, link: MeterLink, batch: Message | None, deadline: float) -> bool:
        # One delivery at a time: the link's outbox is shared by every server of this hub.
        async with self._sending:
            return await link.deliver_until(batch, deadline)

    def _forget(self, user: str, server: str) -> Run | None:
        run = self.runs.pop((user, server), None)
        if run is not None:
            _cancel(run)
        return run

    def _meter_link(self) -> MeterLink | None:
        if self.nats_url is None:
            return None
        if self._link is None:
            from services.meter.publisher import MeterLink

            self._link = MeterLink(
                self.nats_url, f"tollgate-jupyterhub {self.host}", self.nats_seed_file
            )
            self._link.start()
        return self._link

    def _samples(self, batch: CounterBatch) -> Message:
        return Message(samples_subject(self.host, self.prefix), batch.to_json(), batch.msg_id)

    def _lifecycle(self, run: Run, payload: bytes, event: str) -> Message:
        subject = workloads_subject(run.host, self.prefix)
        return Message(subject, payload, f"{run.host}:{run.epoch}:{event}")


def _cancel(run: Run) -> None:
    if run.reporter is not None:
        run.reporter.cancel()
        run.reporter = None


def _detail(r: httpx.Response) -> str:
    with contextlib.suppress(ValueError):
        body = r.json()
        if isinstance(body, dict) and body.get("detail"):
            return str(body["detail"])[:500].rstrip(".")
    return r.text[:500].rstrip(".") or r.reason_phrase


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from None
