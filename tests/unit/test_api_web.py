"""The page's pure parts: units, axes, escaping, and hub URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.api.hub import user_endpoint
from services.api.humanize import display_unit, human, title_of
from services.api.tokens import Principal, Role
from services.api.web import subject as page
from services.api.web.chart import Bucket, axis, bar_chart
from services.api.web.data import SPANS

NOW = datetime(2031, 5, 15, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("metric", "value", "shown"),
    [
        ("net.tx.wan.bytes", Decimal(5_800_000_000), "5.8 GB"),
        ("log.bytes", Decimal(512), "512 B"),
        ("mem.alloc.byte_seconds", Decimal(50 * 2**30 * 3600), "50 GiB·h"),
        ("cpu.used.seconds", Decimal(151200), "42 core·h"),
        ("gpu.alloc.seconds", Decimal(90), "1.5 GPU·min"),
        ("cpu.used.seconds", Decimal("0.25"), "0.2 core·s"),
        ("myapp.requests", Decimal(1234), "1,234"),
    ],
)
def test_amounts_read_in_a_unit_that_suits_them(metric: str, value: Decimal, shown: str) -> None:
    assert human(metric, value) == shown


def test_metrics_have_titles_and_custom_ones_keep_their_name() -> None:
    assert title_of("mem.alloc.byte_seconds") == "Memory allocated"
    assert title_of("myapp.requests") == "myapp.requests"
    assert display_unit("myapp.requests", Decimal(5)).name == ""


@pytest.mark.parametrize(
    ("peak", "top", "intervals"),
    [("2.5", "3", 3), ("6.9", "8", 4), ("37", "40", 4), ("100", "100", 4), ("0", "1", 4)],
)
def test_axes_end_on_round_numbers_above_the_peak(peak: str, top: str, intervals: int) -> None:
    got_top, got_intervals = axis(Decimal(peak))
    assert (got_top, got_intervals) == (Decimal(top), intervals)
    assert got_top >= Decimal(peak)


def test_the_chart_has_a_bar_per_bucket_carrying_its_exact_total() -> None:
    starts = SPANS["24h"].buckets(NOW)
    buckets = [Bucket(s, Decimal(i * 10**6)) for i, s in enumerate(starts)]

    svg = bar_chart("log.bytes", buckets, timedelta(hours=1), "Log <output>")

    assert starts[-1] == NOW.replace(minute=0) and len(starts) == 24
    assert svg.count('<rect class="bar"') == 24
    assert 'data-total="23000000"' in svg
    assert 'aria-label="Log &lt;output&gt;"' in svg
    assert "No usage in this period" not in svg
    empty = bar_chart("log.bytes", [Bucket(s, Decimal(0)) for s in starts], timedelta(hours=1), "x")
    assert "No usage in this period" in empty


def test_day_buckets_start_at_utc_midnight() -> None:
    starts = SPANS["30d"].buckets(NOW)
    assert len(starts) == 30
    assert starts[-1] == datetime(2031, 5, 15, tzinfo=UTC)
    assert starts[0] == datetime(2031, 4, 16, tzinfo=UTC)


def test_everything_from_users_and_quota_files_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    viewer = Principal(Role.USER, evil)
    html = page.render(
        page.SubjectPage(
            subject=evil, viewer=viewer, now=NOW, range_key="30d", groups=[evil],
            quotas=[page.QuotaView(evil, "log.bytes", evil, evil, Decimal(1), Decimal(2),
                                   Decimal(1), "ok", None, [evil], [])],
            events=[page.EventView("terminate", NOW, evil, evil, evil, None, False)],
            workloads=[page.WorkloadView(evil, evil, NOW, None, None, evil),
                       page.WorkloadView(evil, evil, NOW, None, None, None, stops_at=NOW,
                                         notice=evil)],
        )
    )  # fmt: skip

    assert "<script>" not in html
    assert "&lt;script&gt;" in html


def test_a_running_workload_with_a_pending_notice_shows_when_it_stops_and_why() -> None:
    told = "Tollgate: cpu-day exceeded; this workload stops at 12:30 UTC unless usage falls"
    html = page.render(
        page.SubjectPage(
            subject="ann", viewer=Principal(Role.USER, "ann"), now=NOW, range_key="30d",
            workloads=[
                page.WorkloadView("job-1", "h1", NOW, None, None, None,
                                  stops_at=NOW + timedelta(minutes=15), notice=told),
                page.WorkloadView("job-2", "h1", NOW, None, None, None),
            ],
        )
    )  # fmt: skip
    first, second = html.split('data-workload="job-1"')[1].split('data-workload="job-2"')
    assert f"stops {(NOW + timedelta(minutes=15)):%d %b %H:%M} UTC" in first
    assert told in first and 'class="pill warning"' in first
    assert "pill ok" in second and "stops" not in second


def test_quota_bars_show_fill_warning_ticks_and_when_quota_returns() -> None:
    q = page.QuotaView(
        "egress-7d", "net.tx.wan.bytes", "in the last 7 days", "GB", Decimal("5.8"), Decimal(5),
        Decimal(0), "exceeded", NOW + timedelta(days=1, hours=7), ["spawn"], [Decimal("0.8")],
    )  # fmt: skip
    html = page.render(
        page.SubjectPage("alice", Principal(Role.USER, "alice"), NOW, "30d", quotas=[q])
    )

    assert 'class="fill" width="100.00"' in html  # over the limit: full, not past the end
    assert 'x1="80.00"' in html
    assert "116%" in html and "Over by 0.8 GB" in html
    assert "Quota returns 16 May 19:30 UTC (in 1 d 7 h)" in html


@pytest.mark.parametrize(
    ("configured", "asked"),
    [
        ("http://hub:8081", "http://hub:8081/hub/api/user"),
        ("http://hub:8081/", "http://hub:8081/hub/api/user"),
        ("http://hub:8081/hub/api", "http://hub:8081/hub/api/user"),
        ("https://x.org/jh/hub/api/", "https://x.org/jh/hub/api/user"),
    ],
)
def test_the_hub_url_may_be_the_hub_or_its_api(configured: str, asked: str) -> None:
    assert user_endpoint(configured) == asked
