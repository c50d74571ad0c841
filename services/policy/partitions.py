"""Which subjects this policy instance decides for, when subjects are partitioned."""

from __future__ import annotations

from dataclasses import dataclass

from contracts.partitions import partition_of_name


@dataclass(frozen=True)
class Ownership:
    """Subject `s` belongs to partition `partition_of_name(s, partitions)`; with one
    partition every subject is ours."""

    partition: int = 0
    partitions: int = 1

    def owner(self, subject: str) -> int:
        return 0 if self.partitions == 1 else partition_of_name(subject, self.partitions)

    def __call__(self, subject: str) -> bool:
        return self.owner(subject) == self.partition
