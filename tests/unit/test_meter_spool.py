"""The agent's workload spool: one JSON file per workload, bad files reported and skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.workloads import Resources
from services.meter.spool import SPOOL, LocalWorkload, Spool, register


def test_workloads_are_read_by_id_and_a_bad_file_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job = LocalWorkload(workload="job-1", subject="alice", pid=42, veth="tgw01234567",
                        resources=Resources(gpus=1, gpu_model="H100"))  # fmt: skip
    path = register(tmp_path, job)
    (tmp_path / SPOOL / "broken.json").write_text('{"workload": "job-2"}')
    spool = Spool(tmp_path / SPOOL)
    with caplog.at_level(logging.ERROR):
        assert spool.read() == {"job-1": job}
        assert spool.read() == {"job-1": job}
    assert caplog.text.count("broken.json until it is fixed") == 1
    spool.discard("job-1")
    assert not path.exists() and spool.read() == {}


def test_a_veth_name_the_kernel_would_refuse_is_refused() -> None:
    with pytest.raises(ValidationError):
        LocalWorkload(workload="w", subject="s", veth="much-too-long-for-linux")
