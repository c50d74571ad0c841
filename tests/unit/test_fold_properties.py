"""The fold against an oracle, under duplicates, reorders, drops, resets, epochs and restarts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.ledger.domain import Reading, SeriesKey, SeriesState, fold

T0 = datetime(2026, 11, 22, tzinfo=UTC)
SERIES = ["cpu.used.seconds", "net.tx.wan.bytes"]
amounts = st.decimals(min_value=0, max_value=10_000, places=6, allow_nan=False)


@dataclass
class Published:
    epoch: int
    segment: int
    seq: int
    values: dict[str, Decimal]


class FoldMachine(RuleBasedStateMachine):
    """One host with two series; the ledger folds whatever the network delivers."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.segment = 0
        self.seq = 0
        self.counters = {m: Decimal(0) for m in SERIES}
        self.true_usage = {m: Decimal(0) for m in SERIES}
        self.sent: list[Published] = []
        self.delivered: list[Published] = []
        self.held: list[Published] = []
        # Ledger side: persisted states and the usage it appended.
        self.persisted: dict[SeriesKey, SeriesState] = {}
        self.memory: dict[SeriesKey, SeriesState] = {}
        self.ledger_total = {m: Decimal(0) for m in SERIES}

    def _key(self, epoch: int, metric: str) -> SeriesKey:
        return SeriesKey("h1", f"e{epoch}", "alice", "w1", metric)

    def _deliver(self, p: Published) -> None:
        items = [
            Reading(self._key(p.epoch, m), p.seq, v, T0 + timedelta(seconds=p.seq))
            for m, v in p.values.items()
        ]
        usage, changed = fold(self.memory, items)
        for u in usage:
            assert u.delta >= 0
            self.ledger_total[u.key.metric] += u.delta
        self.memory.update(changed)
        # Each delivery is one committed transaction.
        self.persisted = dict(self.memory)
        self.delivered.append(p)

    def _publish(self) -> Published:
        self.seq += 1
        p = Published(self.epoch, self.segment, self.seq, dict(self.counters))
        self.sent.append(p)
        return p

    @rule(metric=st.sampled_from(SERIES), amount=amounts)
    def increment(self, metric: str, amount: Decimal) -> None:
        if metric.endswith(".bytes"):
            amount = amount.to_integral_value()
        self.counters[metric] += amount

    @rule()
    def publish(self) -> None:
        self._deliver(self._publish())

    @rule()
    def publish_but_hold(self) -> None:
        self.held.append(self._publish())

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def deliver_held_out_of_order(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.held) - 1))
        self._deliver(self.held.pop(i))

    @rule()
    def publish_and_drop(self) -> None:
        self._publish()

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def redeliver_duplicate(self, data: st.DataObject) -> None:
        self._deliver(data.draw(st.sampled_from(self.delivered)))

    def _flush(self) -> None:
        while self.held:
            self._deliver(self.held.pop(0))

    @rule()
    def new_epoch(self) -> None:
        self._flush()
        self.epoch += 1
        self.segment = 0
        self.seq = 0
        self.counters = {m: Decimal(0) for m in SERIES}

    @precondition(lambda self: any(v > 0 for v in self.counters.values()))
    @rule(fraction=st.decimals(min_value=0, max_value=Decimal("0.9"), places=2))
    def reset_within_epoch(self, fraction: Decimal) -> None:
        # The counter restarts (e.g. a chain recreated without a new epoch). The reading
        # after the reset is delivered at once and is lower, so the drop is visible.
        self._flush()
        last = self._last_delivered_values()
        self.segment += 1
        for m in SERIES:
            self.counters[m] = (last.get(m, Decimal(0)) * fraction).to_integral_value(ROUND_FLOOR)
        self._deliver(self._publish())

    @rule()
    def ledger_restarts(self) -> None:
        self.memory = dict(self.persisted)

    def _last_delivered_values(self) -> dict[str, Decimal]:
        current = [p for p in self.delivered if (p.epoch, p.segment) == (self.epoch, self.segment)]
        if not current:
            return {}
        return max(current, key=lambda p: p.seq).values

    def oracle(self, metric: str) -> Decimal:
        """Sum over counter lives of the highest value any delivered reading carried."""
        best: dict[tuple[int, int], Decimal] = {}
        for p in self.delivered:
            life = (p.epoch, p.segment)
            best[life] = max(best.get(life, Decimal(0)), p.values[metric])
        return sum(best.values(), Decimal(0))

    @invariant()
    def totals_equal_the_oracle_exactly(self) -> None:
        for m in SERIES:
            assert self.ledger_total[m] == self.oracle(m), (m, self.ledger_total, self.oracle(m))

    @invariant()
    def never_negative(self) -> None:
        for m in SERIES:
            assert self.ledger_total[m] >= 0


FoldMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestFold = FoldMachine.TestCase
