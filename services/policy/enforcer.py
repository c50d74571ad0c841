"""Enforcement: re-evaluate subjects whose usage, workloads or quotas changed, and act.

A plan's decisions, messages (outbox) and episode marks commit in one transaction before
anything is published; the outbox is then published with each row's id as Nats-Msg-Id.
A crash before the commit re-decides the same plan after restart (same command ids); a
crash after it publishes what is pending; a crash between publish and "published" sends
the same id again, which JetStream drops, and the outbox key stops any later repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
import nats.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from . import metrics, records
from .domain import effective_quotas
from .engine import Terminate, decide
from .journal import UNAVAILABLE
from .live import LiveState
from .notice import Cancel, Schedule
from .noticeorders import pending, translate_notice
from .orders import translate
from .records import DecisionRecord, OutboxRow
from .reissue import Attempt, backoff
from .standings import View, pool_members, resolve_groups, standings_for
from .turns import Turns
from .workloads import LIVE_WITHOUT_START

log = logging.getLogger("tollgate.policy.enforcer")
STEP_EVERY = 0.1  # seconds: the longest pause between two evaluations under load
# Evaluations take at most about 1/(1 + PAUSE_FACTOR) of the loop: after a step that took
# d seconds the next waits PAUSE_FACTOR * d (at most STEP_EVERY). A quiet system's step is
# a millisecond, so a crossing is acted on at once; a busy one's pauses stretch with it.
PAUSE_FACTOR = 4.0


class Enforcer:
    """Turns crossings into commands and events, each once."""

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        live: LiveState,
        prefix: str,
        sweep_every: float = 10.0,
        owns: Callable[[str], bool] = lambda subject: True,
    ) -> None:
        self.nc = nc
        self.owns = owns
        self.js = nc.jetstream()
        self.pool = pool
        self.live = live
        self.prefix = prefix
        self.sweep_every = sweep_every
        self._version: str | None = None
        self._last_sweep = 0.0
        self._events_stream: bool | None = None
        # Per subject: when its next re-issue falls due, and workloads ignoring a command.
        self._due: dict[str, datetime] = {}
        self._ignoring: dict[str, dict[str, Attempt]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        unpublished = True  # rows left by an earlier run, or by a failed publish
        next_at = 0.0
        while not stop.is_set():
            await _wait(self.live.wake, 0.5)
            # While usage streams in, every folded slice wakes us: pause in proportion to
            # the last step (PAUSE_FACTOR), each time for all subjects dirtied since.
            rest = next_at - time.monotonic()
            if rest > 0:
                await _wait(stop, rest)
            self.live.wake.clear()
            if not self.live.ready or stop.is_set():
                continue
            stepped = time.monotonic()
            try:
                unpublished = await self.step() > 0 or unpublished
                if unpublished:
                    await self.publish_pending()
                    unpublished = False
                backoff = 0.2
            except (*UNAVAILABLE, asyncpg.PostgresError, nats.errors.Error) as exc:
                log.warning(
                    "enforcement paused (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                self.live.wake.set()
            done = time.monotonic()
            next_at = done + min(STEP_EVERY, PAUSE_FACTOR * (done - stepped))

    def _sweep_targets(self, view: View) -> set[str]:
        """Subjects whose standing can change with time alone (windows roll, hours turn)."""
        live = self.live
        recent = view.now - LIVE_WITHOUT_START
        seen = {s.subject for s in view.usage.seen.values() if s.last >= recent}
        return set(live.marks) | live.book.subjects() | seen

    async def step(self) -> int:
        """Evaluate dirty subjects (all of them after a config change or a sweep)."""
        live = self.live
        view = live.view()
        config = view.config
        if config.version != self._version:
            await self._record_config()
            live.dirty |= self._sweep_targets(view) | view.usage.known_subjects()
        if time.monotonic() - self._last_sweep >= self.sweep_every:
            self._last_sweep = time.monotonic()
            live.dirty |= self._sweep_targets(view)
            live.holds.expire(view.now)
            live.book.forget_stopped_before(view.now - timedelta(days=1))
        # Notices that ran out (also those reloaded after a restart) are decided now.
        live.dirty |= {n.subject for n in live.notices.values() if n.terminate_at <= view.now}
        due = {s for s, at in self._due.items() if at <= view.now}
        for s in due:
            del self._due[s]
        live.dirty |= due
        subjects, live.dirty = live.dirty, set()
        try:
            return await self._evaluate(view, subjects)
        except BaseException:
            live.dirty |= subjects  # not done: decide them again next time
            raise

    async def _evaluate(self, view: View, subjects: set[str]) -> int:
        live, config = self.live, view.config
        for s in list(subjects):  # a pool's usage changed: every member may be over now
            groups = resolve_groups(config, live.book, s)
            for q in effective_quotas(config, s, groups):
                if q.per == "group":
                    subjects.update(pool_members(view, q, s))
        # Another partition's subjects are that partition's to act on (pool members found
        # through them may be ours, so this comes after the expansion).
        subjects = {s for s in subjects if self.owns(s)}
        rows: list[tuple[DecisionRecord, OutboxRow]] = []
        noticed: list[tuple[DecisionRecord, list[OutboxRow]]] = []
        scheduled: list[Schedule] = []
        cancelled: list[Cancel] = []
        opened, closed, terminations = [], [], []
        resumed, live.resumed = live.resumed, []
        turns = Turns()
        for subject in sorted(subjects):
            # Many subjects take a while: spawn checks are answered between two of them.
            # Each subject is decided on the state as it is at its turn (one ledger seq,
            # recorded with its decisions), as of the same instant and configuration.
            if await turns.take():
                view = live.view(view.now, config)
            groups = resolve_groups(config, live.book, subject)
            running = live.book.running_for(subject, view.usage, view.now)
            standings = standings_for(view, subject, groups, running=running)
            plan = decide(
                subject, standings, running, live.marks.get(subject, {}), live.sent, view.now,
                attempts=live.attempts, reissue=config.reissue,
                usage_until={w.workload: t for w in running
                             if (t := view.usage.sampled_until(w.workload)) is not None},
                notices=live.notices,
            )  # fmt: skip
            self._follow_up(subject, plan.due, plan.ignoring)
            if not plan:
                continue
            opened += plan.opened
            closed += plan.closed
            for action in plan.actions:
                if isinstance(action, Schedule | Cancel):
                    noticed.append(translate_notice(
                        action, prefix=self.prefix, now=view.now, version=config.version,
                        as_of=view.usage.last_seq, groups=groups,
                    ))  # fmt: skip
                    (scheduled if isinstance(action, Schedule) else cancelled).append(action)
                    continue
                rows.append(
                    translate(
                        action,
                        prefix=self.prefix,
                        now=view.now,
                        version=config.version,
                        as_of=view.usage.last_seq,
                        groups=groups,
                    )
                )
                if isinstance(action, Terminate):
                    terminations.append(action)
        if not (rows or noticed or opened or closed or resumed):
            return 0
        decisions = [r for r, _ in rows] + [r for r, _ in noticed]
        outbox = [o for _, o in rows] + [o for _, os in noticed for o in os]
        try:
            async with self.pool.acquire() as conn:
                new = await records.save_plan(
                    conn, decisions, outbox, opened, closed, view.now, terminations, resumed,
                )  # fmt: skip
        except BaseException:
            live.resumed = resumed + live.resumed  # recorded with the next plan
            raise
        live.sent.update(t.command_id for t in terminations)
        for t in terminations:
            live.notices.pop(t.crossing, None)
        for c in cancelled:
            live.notices.pop(c.notice.crossing, None)
        for sch in scheduled:
            live.notices[sch.crossing] = pending(sch, view.now)
        for t in terminations:
            self._attempted(t, view.now, t.command_id in new)
        for key in closed:
            live.marks.get(key.subject, {}).pop(key, None)
        for mark in opened:
            live.marks.setdefault(mark.key.subject, {})[mark.key] = mark
        for record in decisions:
            if record.decision_id in new or record.decision_id + "-event" in new:
                log.info("%s", record.message)
        return len(new)

    def _follow_up(self, subject: str, due: datetime | None, ignoring: list[Attempt]) -> None:
        """Remember when to look at `subject` again, and who ignores commands (the gauge)."""
        if due is None:
            self._due.pop(subject, None)
        else:
            self._due[subject] = due
        if ignoring:
            self._ignoring[subject] = {a.workload: a for a in ignoring}
        else:
            self._ignoring.pop(subject, None)
        metrics.DISOBEYING.set(sum(len(v) for v in self._ignoring.values()))

    def _attempted(self, t: Terminate, now: datetime, new: bool) -> None:
        w, grace = t.workload, t.standing.quota.grace_seconds
        self.live.attempts[t.crossing] = Attempt(
            t.crossing, t.attempt, t.command_id, now, grace, w.host, w.workload
        )
        if t.previous is None or not new:
            return
        metrics.REISSUED.labels(w.host).inc()
        wait = backoff(self.live.config.current().reissue, t.attempt).total_seconds()
        log.warning(
            "host %s does not obey: workload %s of %s still sends usage (sampled up to %s) "
            "after terminate command %d (%s, decided %s, %s s of grace); sent command %d "
            "(%s), and the next in %.0f s if its usage keeps coming",
            w.host, w.workload, w.subject,
            t.usage_until.isoformat() if t.usage_until else "?",
            t.previous.number, t.previous.command_id, t.previous.decided_at.isoformat(),
            t.previous.grace_seconds, t.attempt, t.command_id, wait,
        )  # fmt: skip

    async def publish_pending(self) -> int:
        """Publish this partition's outbox rows not yet published, oldest first."""
        sent = 0
        after: tuple[datetime, str] | None = None
        while True:
            async with self.pool.acquire() as conn:
                rows = await records.pending_outbox(conn, after=after)
            if not rows:
                return sent
            after = (rows[-1]["created_at"], rows[-1]["msg_id"])
            done = []
            for r in rows:
                if not self.owns(r["subject"]):
                    continue  # decided by the owner of that subject, published by it
                await self._publish(r["msg_id"], r["nats_subject"], bytes(r["payload"]))
                done.append(r["msg_id"])
            if done:
                async with self.pool.acquire() as conn:
                    await records.mark_published(conn, done, self.live.clock())
            sent += len(done)

    async def _publish(self, msg_id: str, subject: str, payload: bytes) -> None:
        headers = {"Nats-Msg-Id": msg_id}
        if ".events." in subject and not await self._events_stored(subject):
            # Quota events have no stream in the contract yet: plain NATS until one exists.
            await self.nc.publish(subject, payload, headers=headers)
            self.live.stats.bump("events_sent")
            return
        await self.js.publish(subject, payload, headers=headers)
        self.live.stats.bump("commands_sent")

    async def _events_stored(self, subject: str) -> bool:
        if self._events_stream is None:
            try:
                await self.js.find_stream_name_by_subject(subject)
                self._events_stream = True
            except NotFoundError:
                self._events_stream = False
        return self._events_stream

    async def _record_config(self) -> None:
        source = self.live.config
        config = source.current()
        path = source.path
        body = source.text
        async with self.pool.acquire() as conn:
            await records.record_config(conn, config.version, str(path or "<none>"), body)
        if self._version is not None:
            log.info(
                "quota configuration %s -> %s: re-evaluating every subject",
                self._version,
                config.version,
            )
        self._version = config.version


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
