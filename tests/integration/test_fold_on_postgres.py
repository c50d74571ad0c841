"""The fold's state machine again, each delivery committed through the real ledger store."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule, run_state_machine_as_test

from services.ledger.domain import Reading
from services.ledger.store import apply_readings
from tests.unit.test_fold_properties import T0, FoldMachine, Published


class PostgresFoldMachine(FoldMachine):
    """Same rules and oracle; the ledger is Postgres, and a restart is a new connection."""

    url: str

    def __init__(self) -> None:
        super().__init__()
        self.host = f"h{uuid.uuid4().hex[:12]}"
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(self.url))
        self.stream_seq = 0

    def _key(self, epoch: int, metric: str):  # type: ignore[no-untyped-def]
        key = super()._key(epoch, metric)
        return type(key)(self.host, key.epoch, key.subject, key.workload, key.metric)

    def _deliver(self, p: Published) -> None:
        self.stream_seq += 1
        items = [
            Reading(self._key(p.epoch, m), p.seq, v, T0 + timedelta(seconds=p.seq))
            for m, v in p.values.items()
        ]
        self.loop.run_until_complete(apply_readings(self.conn, "prop", items, self.stream_seq))
        rows = self.loop.run_until_complete(
            self.conn.fetch(
                "SELECT metric, sum(delta) AS t FROM usage_events WHERE host = $1 GROUP BY 1",
                self.host,
            )
        )
        self.ledger_total = {m: Decimal(0) for m in self.ledger_total}
        self.ledger_total.update({r["metric"]: r["t"] for r in rows})
        self.delivered.append(p)

    @rule()
    def ledger_restarts(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.conn = self.loop.run_until_complete(asyncpg.connect(self.url))

    def teardown(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def test_the_fold_holds_against_the_oracle_through_postgres(database_url: str, pool) -> None:
    # `pool` applied the migrations to this test's database.
    PostgresFoldMachine.url = database_url
    run_state_machine_as_test(
        PostgresFoldMachine,
        settings=settings(
            max_examples=25, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )  # fmt: skip
