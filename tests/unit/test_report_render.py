"""`tollgate report` as a table: a cost column in the report's currency, to the cent."""

from __future__ import annotations

from rich.console import Console

from tollgate.commands.report import money, render

BODY = {
    "from": "2026-12-01T00:00:00Z", "to": "2026-12-02T00:00:00Z", "group_by": "subject",
    "subjects": 1, "as_of_seq": 7, "currency": "USD", "total_cost": "12.345001",
    "rows": [
        {"subject": "ann", "metric": "gpu.alloc.seconds", "unit": "s", "total": "3600",
         "events": 2, "cost": "12.165001"},
        {"subject": "ann", "metric": "log.bytes", "unit": "B", "total": "10", "events": 1},
        {"subject": "ann", "metric": "net.tx.wan.bytes", "unit": "B", "total": "2000000000",
         "events": 1, "cost": "0.18"},
    ],
    "totals": [],
}  # fmt: skip


def test_the_table_has_a_cost_column_and_the_total_cost_in_its_caption() -> None:
    console = Console(width=200, record=True)
    console.print(render(BODY))
    text = console.export_text()
    assert "cost (USD)" in text
    assert "12.17" in text and "0.18" in text
    assert "cost 12.35 USD" in text


def test_money_is_shown_to_the_cent_half_even_and_blank_when_unpriced() -> None:
    assert money("0.125") == "0.12" and money("0.135") == "0.14"
    assert money("1234.5") == "1,234.50"
    assert money(None) == ""
