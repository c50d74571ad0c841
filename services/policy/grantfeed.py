"""The policy's copy of the grants record, kept current.

Postgres holds the record; the API publishes each new record on
`tollgate.v1.grants.<scope>.<target>` after it commits, and the policy takes that message as
a cue to read what is new. So a grant lifts a block at once, while a missed message (the
policy restarting, NATS away) only waits for the next poll. Grants that run out are noticed
by the same loop, which marks their subjects for re-evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts.grants import grants_wildcard

from . import grantstore
from .grants import Grant
from .journal import UNAVAILABLE
from .live import LiveState

log = logging.getLogger("tollgate.policy.grants")


class GrantFollower:
    """Reads new grant records when cued (or every `poll_every` seconds) into the live state."""

    def __init__(
        self, nc: Client, pool: asyncpg.Pool, live: LiveState, prefix: str, poll_every: float,
        listen: bool = True,
    ) -> None:  # fmt: skip
        self.nc = nc
        # False: the cues come from the service's declared channels (PolicyChannels), which
        # set `cue`; they are subscribed before the service loads, so nothing falls between.
        self.listen = listen
        self.pool = pool
        self.live = live
        self.prefix = prefix
        self.poll_every = poll_every
        self.cue = asyncio.Event()
        self._sub: Subscription | None = None
        self._checked_at: datetime | None = None

    async def start(self) -> None:
        """Listen for cues, then read the whole record (nothing falls between the two)."""
        if self.listen and self._sub is None:
            self._sub = await self.nc.subscribe(grants_wildcard(self.prefix), cb=self._cued)
            await self.nc.flush()
        await self.refresh()

    async def _cued(self, msg: Msg) -> None:
        self.cue.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.cue.wait(), self.poll_every)
                self.cue.clear()
                if stop.is_set():
                    break
                try:
                    await self.refresh()
                except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                    log.warning("cannot read new grants yet (%s); retrying", exc)
        finally:
            if self._sub is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
            self._sub = None

    async def refresh(self) -> int:
        """Fold in records newer than those held; re-evaluate whom they (or expiries) touch."""
        live = self.live
        async with self.pool.acquire() as conn:
            records = await grantstore.after(conn, live.grants.last_seq)
        touched = live.grants.apply(records)
        now = live.clock()
        since = self._checked_at or now
        expired = [g for g in live.grants.grants.values() if since <= g.expires_at < now]
        self._checked_at = now
        for g in touched:
            log.info(
                "grant %s %s: %s on %s for %s %s", g.grant_id,
                "revoked" if g.revoked_at is not None else "recorded", g.amount_text, g.quota,
                g.scope, g.target,
            )  # fmt: skip
        for g in [*touched, *expired]:
            for subject in self._subjects(g):
                live.touch(subject)
        return len(records)

    def _subjects(self, g: Grant) -> set[str]:
        if g.scope == "subject":
            return {g.target}
        config = self.live.config.current()
        members = set(config.groups.get(g.target, []))
        members |= {s for s, gs in self.live.book.groups.items() if g.target in gs}
        return members
