"""The bench harness's pure parts: percentiles, ratios and goals, the JSON report, markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import Goal, Line, Report, latency_lines, markdown, percentile, ratio

MACHINE = {"date": "2026-11-22 10:00 UTC", "cpu": "Test CPU", "cores": 2, "ram_gib": 4.0,
           "kernel": "Linux 6", "python": "3.11.9", "nats_server": "nats-server: v2.15.1",
           "postgres": "PostgreSQL 17.5", "commit": "abc1234"}  # fmt: skip


def test_percentiles_interpolate_between_closest_ranks() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 100) == 5.0
    assert percentile(samples, 25) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([7.0], 99) == 7.0


def test_a_percentile_of_nothing_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        percentile([1.0], 101)


def test_goals_on_ratios_and_values_say_met_or_not() -> None:
    at_least = Goal("ratio", at_least=0.25, text=">= 0.25 x B1")
    fast = Line("P1", "ingest", 30_000, "points/s", "B1", ratio(30_000, 100_000), at_least)
    slow = Line("P1", "ingest", 20_000, "points/s", "B1", ratio(20_000, 100_000), at_least)
    assert fast.ratio == pytest.approx(0.3) and fast.met is True
    assert slow.met is False
    p99 = Line("P2 p99", "lag", 1200.0, "ms", goal=Goal("value", at_most=1000))
    assert p99.met is False
    assert Line("P2 p99", "lag", 999.0, "ms", goal=Goal("value", at_most=1000)).met is True
    assert Line("x", "no goal", 1.0, "ms").met is None


def test_a_zero_baseline_gives_no_ratio_and_no_verdict() -> None:
    line = Line("P1", "ingest", 10.0, "points/s", "B1", ratio(10.0, 0.0),
                Goal("ratio", at_least=0.25))  # fmt: skip
    assert line.met is None


def test_latency_lines_are_milliseconds_with_the_goal_on_p99() -> None:
    p50, p99 = latency_lines("P4", "enforcement", [0.1, 0.2, 0.3], goal_p99_ms=250)
    assert p50.value == pytest.approx(200.0) and p50.goal is None
    assert p99.value == pytest.approx(298.0) and p99.met is False
    assert "3 samples" in p99.note


def test_the_report_round_trips_through_its_json_file(tmp_path: Path) -> None:
    report = Report(MACHINE, "quick")
    report.add(Line("B1", "copy", 100_000.0, "rows/s"))
    report.add(Line("P1", "ingest", 30_000.0, "points/s", "B1", 0.3,
                    Goal("ratio", at_least=0.25, text=">= 0.25 x B1")))  # fmt: skip
    report.notes.append("a note")
    path = tmp_path / "results" / "latest.json"
    report.write(path)
    data = json.loads(path.read_text())
    assert data["mode"] == "quick" and data["machine"]["cpu"] == "Test CPU"
    assert data["lines"][1]["met"] is True and data["lines"][1]["goal"]["at_least"] == 0.25
    again = Report.read(path)
    assert again.to_json() == report.to_json()


def test_a_figure_reported_twice_is_refused() -> None:
    report = Report(MACHINE, "quick")
    report.add(Line("B1", "copy", 1.0, "rows/s"))
    with pytest.raises(ValueError, match="reported twice"):
        report.add(Line("B1", "copy", 2.0, "rows/s"))


def test_reading_something_that_is_not_a_report_says_what_to_do(tmp_path: Path) -> None:
    bad = tmp_path / "latest.json"
    bad.write_text('{"lines": []}')
    with pytest.raises(SystemExit, match="make bench"):
        Report.read(bad)
    with pytest.raises(SystemExit, match="run `make bench` first"):
        Report.read(tmp_path / "missing.json")


def test_markdown_has_the_machine_every_figure_and_the_verdicts() -> None:
    report = Report(MACHINE, "quick")
    report.add(Line("B1", "copy", 123_456.7, "rows/s", note="5000 rows | per tx"))
    report.add(Line("P1", "ingest", 30_000.0, "points/s", "B1", 0.243,
                    Goal("ratio", at_least=0.25, text=">= 0.25 x B1")))  # fmt: skip
    report.notes.append("seeded with apply_readings")
    text = markdown(report)
    lines = text.splitlines()
    assert "Test CPU (2 cores, 4.0 GiB RAM)" in lines[0] and "commit abc1234" in lines[0]
    assert "| B1 | copy | 123,457 rows/s |" in text
    assert "5000 rows \\| per tx" in text  # a pipe in a note does not break the table
    assert "| P1 | ingest | 30,000 points/s | 0.243 x B1 | >= 0.25 x B1 | NOT met |" in text
    assert lines[-1] == "- seeded with apply_readings"
    widths = {line.count("|") - line.count("\\|") for line in lines if line.startswith("|")}
    assert widths == {8}
