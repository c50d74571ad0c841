"""Partitions: which of N ledger/policy instances owns a host's samples or a subject.

The samples stream is partitioned by NATS itself, with the deterministic subject mapping
`{{partition(N,1)}}`: the server hashes the subject token with 32-bit FNV-1a and takes it
modulo N (nats-server `subject_transform.go`, `getHashPartition`). `partition_of` computes
the same number, so the policy can partition subjects exactly as the server partitions
hosts, and tests can check which ledger instance must have seen which host.
"""

from __future__ import annotations

from typing import Final

from ._base import DEFAULT_PREFIX, encode_token, subject_of

FNV32_OFFSET: Final = 0x811C9DC5
FNV32_PRIME: Final = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a, as Go's `hash/fnv.New32a`."""
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def partition_of(token: str, n: int) -> int:
    """The partition NATS's `partition(n, ...)` mapping gives this subject token, 0..n-1.

    `token` is the token as it travels (already %-encoded, see `partition_of_name`).
    """
    if n < 1:
        raise ValueError(f"the number of partitions must be at least 1 (got {n})")
    return fnv1a_32(token.encode()) % n


def partition_of_name(name: str, n: int) -> int:
    """The partition of a host or subject name: its subject token, hashed as NATS does."""
    return partition_of(encode_token(name), n)


def partition_subjects_transform(prefix: str, n: int) -> tuple[str, str]:
    """(source, destination) of the samples stream's transform for `n` partitions:
    `<prefix>.v1.samples.<host>` is stored as `<prefix>.v1.samples.<host>.<partition>`."""
    return (
        subject_of(prefix, "samples", "*"),
        subject_of(prefix, "samples", "{{wildcard(1)}}", f"{{{{partition({n},1)}}}}"),
    )


def partition_samples_filter(partition: int, prefix: str = DEFAULT_PREFIX) -> str:
    """The stored samples of one partition, for that partition's ledger consumer."""
    return subject_of(prefix, "samples", "*", str(partition))


def spawn_check_partition_subject(partition: int, prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix>.v1.spawn.check.p.<k>`: spawn checks forwarded to the owner of a subject."""
    return subject_of(prefix, "spawn", "check", "p", str(partition))
