"""Grants, soft limits and grace, pure: the limit a grant makes, who decides what, the chain."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.api.grants import GrantRefused, GrantRequest, plan_grant, remaining_of
from services.policy.config import ConfigError, parse_config
from services.policy.domain import Standing, decide_spawn, effective_quotas, status
from services.policy.engine import Block, Terminate, Unblock, decide
from services.policy.grants import GENESIS, GrantBook, GrantRecord, verify
from services.policy.workloads import Workload

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
H = Decimal(3600)
CONFIG = parse_config("""
groups: {lab: [carol]}
quotas:
  - {name: cpu, metric: cpu.alloc.seconds, limit: 2 core*h, window: {rolling: 30d},
     enforce: [spawn, terminate]}
  - {name: cpu-graced, metric: cpu.alloc.seconds, limit: 2 core*h, window: {calendar: month},
     enforce: [spawn, terminate], grace: 10%}
  - {name: cpu-soft, metric: cpu.alloc.seconds, limit: 2 core*h, window: {lifetime: true},
     enforce: [spawn, terminate], mode: soft}
  - {name: pool, metric: gpu.alloc.seconds, limit: 10 GPU*h, window: {rolling: 7d},
     applies_to: {groups: [lab]}, per: group}
""")


def grant_record(seq: int, gid: str, amount: Decimal, days: int = 7, **kw: object) -> GrantRecord:
    fields: dict[str, object] = dict(
        seq=seq, kind="grant", grant_id=gid, scope="subject", target="alice", quota="cpu",
        actor="admin", reason="deadline", recorded_at=NOW - timedelta(hours=1), amount=amount,
        amount_text="x", expires_at=NOW + timedelta(days=days),
    )  # fmt: skip
    fields.update(kw)
    return GrantRecord(**fields)  # type: ignore[arg-type]


def quotas(book: GrantBook, subject: str = "alice", now: datetime = NOW) -> dict[str, object]:
    groups = CONFIG.groups_of(subject)
    return {q.name: q for q in effective_quotas(CONFIG, subject, groups, book, now)}


def test_an_active_grant_raises_the_limit_and_an_expired_or_revoked_one_does_not() -> None:
    book = GrantBook()
    book.apply([
        grant_record(1, "g-a", 10 * H),
        grant_record(2, "g-old", 5 * H, days=-1),
        grant_record(3, "g-gone", 7 * H),
        replace(grant_record(4, "g-gone", 0 * H), kind="revoke", amount=None, expires_at=None),
    ])  # fmt: skip
    q = quotas(book)["cpu"]
    assert (q.limit, q.base_limit, q.granted) == (12 * H, 2 * H, 10 * H)  # type: ignore[attr-defined]
    assert [g.grant_id for g in q.grants] == ["g-a"]  # type: ignore[attr-defined]
    assert {g.grant_id for g in q.lapsed} == {"g-old", "g-gone"}  # type: ignore[attr-defined]
    assert q.limit_text().startswith("12 core·h (2 core·h + 10 core·h grant g-a until")  # type: ignore[attr-defined]
    # Other subjects and other quotas are untouched.
    assert quotas(book, "bob")["cpu"].limit == 2 * H  # type: ignore[attr-defined]
    assert quotas(book)["cpu-graced"].limit == 2 * H  # type: ignore[attr-defined]


def test_a_group_grant_raises_the_pool_of_its_members_only() -> None:
    book = GrantBook()
    book.apply([grant_record(1, "g-p", 5 * H, scope="group", target="lab", quota="pool")])
    assert quotas(book, "carol")["pool"].limit == 15 * H  # type: ignore[attr-defined]
    assert "pool" not in quotas(book, "alice")


def test_usage_spends_the_limit_first_then_the_grant_that_expires_first() -> None:
    book = GrantBook()
    book.apply([grant_record(1, "g-late", 4 * H, days=9), grant_record(2, "g-soon", 4 * H)])
    grants = list(book.grants.values())
    assert remaining_of(grants, 2 * H, 5 * H, NOW) == {"g-soon": 1 * H, "g-late": 4 * H}
    assert remaining_of(grants, 2 * H, 1 * H, NOW) == {"g-soon": 4 * H, "g-late": 4 * H}
    assert remaining_of(grants, 2 * H, 20 * H, NOW) == {"g-soon": 0, "g-late": 0}


def stand(name: str, used: Decimal, book: GrantBook | None = None) -> Standing:
    return Standing(quotas(book or GrantBook())[name], used)  # type: ignore[arg-type]


def test_grace_denies_and_terminates_only_past_the_limit_times_one_plus_grace() -> None:
    running = [Workload("w1", "alice", "node", NOW)]
    within, past = stand("cpu-graced", Decimal("2.1") * H), stand("cpu-graced", Decimal("2.3") * H)
    assert within.exceeded and not within.breached and past.breached
    assert decide_spawn("alice", [within], NOW).allowed
    assert not decide_spawn("alice", [past], NOW).allowed
    assert within.status(NOW).note == (
        "over by 0.1 core·h, within grace (0.1 core·h of the 10% grace left before spawns "
        "are denied and workloads stopped)"
    )
    assert not [a for a in decide("alice", [within], running, {}, set(), NOW).actions
                if isinstance(a, Terminate | Block)]  # fmt: skip
    acts = decide("alice", [past], running, {}, set(), NOW).actions
    assert {type(a) for a in acts} >= {Terminate, Block}


def test_a_soft_quota_warns_and_reports_but_never_denies_or_terminates() -> None:
    running = [Workload("w1", "alice", "node", NOW)]
    over = stand("cpu-soft", 50 * H)
    assert over.exceeded and not over.breached
    assert decide_spawn("alice", [over], NOW).allowed
    kinds = {type(a).__name__ for a in decide("alice", [over], running, {}, set(), NOW).actions}
    assert kinds == {"Exceeded"}
    s = status(over.quota, over.used, (), NOW)
    assert (s.state, s.mode, s.enforced, s.enforced_limit) == ("exceeded", "soft", False, None)


def test_a_grant_that_brings_a_blocked_subject_under_lifts_the_block() -> None:
    marks: dict = {}
    plan = decide("alice", [stand("cpu", 3 * H)], [], marks, set(), NOW)
    for m in plan.opened:
        marks[m.key] = m
    book = GrantBook()
    book.apply([grant_record(1, "g-a", 10 * H)])
    plan = decide("alice", [stand("cpu", 3 * H, book)], [], marks, set(), NOW)
    (unblock,) = [a for a in plan.actions if isinstance(a, Unblock)]
    assert unblock.why == "a grant raised the limit"


def test_the_chain_verifies_and_names_the_first_record_that_was_changed() -> None:
    prev, chain = GENESIS, []
    for i in range(1, 5):
        r = grant_record(i, f"g-{i}", i * H).chained(prev)
        chain.append(r)
        prev = r.hash
    assert verify(chain).ok and verify(chain).records == 4
    forged = list(chain)
    forged[2] = replace(chain[2], amount=1000 * H)
    v = verify(forged)
    assert (v.ok, v.first_bad_seq, v.records) == (False, 3, 2)
    assert verify(chain[:1] + chain[2:]).first_bad_seq == 3  # a record taken out


def test_the_quota_file_takes_mode_and_grace_and_refuses_nonsense() -> None:
    assert parse_config("""
quotas: [{name: a, metric: log.bytes, limit: 1 MB, window: {lifetime: true}, grace: 0.25}]
""").quotas[0].grace == Decimal("0.25")
    for bad, words in [
        ("grace: lots", "not a grace allowance"),
        ("grace: '-5%'", "not a grace allowance"),
        ("grace: 2000%", "between 0% and 1000%"),
        ("mode: soft, grace: 10%", "grace has no effect on a soft quota"),
        ("mode: lenient", "mode"),
    ]:
        rule = "name: a, metric: log.bytes, limit: 1 MB, window: {lifetime: true}"
        text = f"quotas: [{{{rule}, {bad}}}]"
        with pytest.raises(ConfigError, match=words):
            parse_config(text)


def test_a_grant_plan_is_refused_for_the_wrong_unit_or_a_quota_that_does_not_apply() -> None:
    body = GrantRequest(quota="cpu", amount="3 GiB", expires_in="1d", reason="x")
    with pytest.raises(GrantRefused, match=r"amount: '3 GiB' does not fit cpu\.alloc\.seconds"):
        plan_grant(CONFIG, body, "subject", "alice", [], "admin", NOW)
    body = GrantRequest(quota="pool", amount="3 GPU*h", expires_in="1d", reason="x")
    with pytest.raises(GrantRefused, match="group: 'other' does not share pool"):
        plan_grant(CONFIG, body, "group", "other", [], "admin", NOW)
    good = plan_grant(CONFIG, replace_body(body, quota="cpu", amount="90 core*min"), "subject",
                      "alice", [], "admin", NOW)  # fmt: skip
    assert (good.amount, good.expires_at) == (5400, NOW + timedelta(days=1))


def replace_body(body: GrantRequest, **kw: object) -> GrantRequest:
    return body.model_copy(update=kw)


def test_a_grant_on_a_cost_quota_is_money_in_the_prices_currency_and_raises_the_budget() -> None:
    config = parse_config("""
prices: [{metric: gpu.alloc.seconds, price: 2.50 USD/GPU*h}]
quotas:
  - {name: budget, metric: cost, limit: 200 USD, window: {calendar: month},
     enforce: [spawn, terminate]}
""")
    body = GrantRequest(quota="budget", amount="25.50 USD", expires_in="7d", reason="deadline")
    planned = plan_grant(config, body, "subject", "alice", [], "admin", NOW)
    book = GrantBook()
    book.apply([replace(planned, seq=1, recorded_at=NOW - timedelta(hours=1))])
    (budget,) = effective_quotas(config, "alice", [], book, NOW)
    assert budget.amount.in_unit(budget.limit) == Decimal("225.50")
    assert budget.limit_text().startswith("225.50 USD (200.00 USD + 25.50 USD grant g-")
    st = status(budget, budget.limit - 1, [], NOW)
    assert (st.limit, st.base_limit, st.granted, st.unit) == (
        Decimal("225.5"),
        Decimal(200),
        Decimal("25.5"),
        "USD",
    )
    for bad, why in (("25 EUR", "in EUR but the prices are in USD"),
                     ("3 GPU*h", "not an amount of money")):  # fmt: skip
        with pytest.raises(GrantRefused, match=f"amount: .*{why}"):
            plan_grant(config, replace_body(body, amount=bad), "subject", "alice", [], "admin", NOW)
