"""Partitions: the hash NATS uses, the settings that pick a partition, the stream configs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts import encode_token
from contracts.partitions import (
    fnv1a_32,
    partition_of,
    partition_of_name,
    partition_samples_filter,
    partition_subjects_transform,
    spawn_check_partition_subject,
)
from contracts.samples import samples_stream
from infra.bus import stored_partitions, stream_configs
from infra.settings import Settings
from services.policy.partitions import Ownership


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Published FNV-1a 32 test vectors (Fowler/Noll/Vo, and Go's hash/fnv tests).
        (b"", 0x811C9DC5),
        (b"a", 0xE40C292C),
        (b"ab", 0x4D2505CA),
        (b"abc", 0x1A47E90B),
        (b"foobar", 0xBF9CF968),
    ],
)
def test_fnv1a_32_matches_the_published_vectors(data: bytes, expected: int) -> None:
    assert fnv1a_32(data) == expected


def test_partition_is_the_hash_modulo_n() -> None:
    assert partition_of("a", 2) == 0xE40C292C % 2
    assert partition_of("foobar", 7) == 0xBF9CF968 % 7
    assert partition_of("anything", 1) == 0


@given(st.text(min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
def test_every_name_lands_in_one_of_the_n_partitions(name: str, n: int) -> None:
    p = partition_of_name(name, n)
    assert 0 <= p < n
    assert p == partition_of(encode_token(name), n)


def test_zero_partitions_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        partition_of("host", 0)


def test_names_spread_over_the_partitions() -> None:
    counts = [0, 0, 0, 0]
    for i in range(400):
        counts[partition_of_name(f"node-{i}", 4)] += 1
    assert all(c > 50 for c in counts), counts


def test_partition_subjects() -> None:
    src, dest = partition_subjects_transform("tg", 3)
    assert src == "tg.v1.samples.*"
    assert dest == "tg.v1.samples.{{wildcard(1)}}.{{partition(3,1)}}"
    assert partition_samples_filter(2, "tg") == "tg.v1.samples.*.2"
    assert spawn_check_partition_subject(1, "tg") == "tg.v1.spawn.check.p.1"


def test_settings_default_to_one_partition_and_one_replica() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.partitions, s.partition, s.stream_replicas) == (1, 0, 1)


def test_settings_read_partitions_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_PARTITIONS", "4")
    monkeypatch.setenv("TOLLGATE_PARTITION", "3")
    monkeypatch.setenv("TOLLGATE_STREAM_REPLICAS", "3")
    s = Settings()
    assert (s.partitions, s.partition, s.stream_replicas) == (4, 3, 3)


def test_a_partition_outside_the_count_says_what_to_set() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(partitions=2, partition=2)
    text = str(err.value)
    assert "TOLLGATE_PARTITION=2" in text
    assert "from 0 to 1" in text


@pytest.mark.parametrize("bad", [{"partitions": 0}, {"partition": -1}, {"stream_replicas": 6}])
def test_out_of_range_scale_settings_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_one_partition_keeps_the_samples_stream_untransformed() -> None:
    configs = stream_configs("tg", 120)
    samples = next(c for c in configs if c.name == samples_stream("tg"))
    assert samples.subject_transform is None
    assert samples.subjects == ["tg.v1.samples.*"]
    assert stored_partitions(samples) == 1
    assert {c.num_replicas for c in configs} == {1}


def test_partitions_and_replicas_reach_the_stream_configs() -> None:
    configs = stream_configs("tg", 120, replicas=3, partitions=4)
    samples = next(c for c in configs if c.name == samples_stream("tg"))
    assert samples.subject_transform is not None
    assert samples.subject_transform.src == "tg.v1.samples.*"
    assert stored_partitions(samples) == 4
    assert {c.num_replicas for c in configs} == {3}
    # Only the samples stream is partitioned.
    assert [c.name for c in configs if c.subject_transform] == [samples_stream("tg")]


def test_ownership_splits_subjects_between_instances() -> None:
    names = [f"user{i}" for i in range(50)]
    zero, one = Ownership(0, 2), Ownership(1, 2)
    for name in names:
        assert zero(name) != one(name)
        assert zero.owner(name) == partition_of_name(name, 2)
    assert all(Ownership()(name) for name in names)
