"""The JupyterHub hooks without servers: what they read from a spawner and what they send."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from jupyterhub.spawner import LocalProcessSpawner, Spawner
from jupyterhub.utils import format_exception
from traitlets import Dict
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from contracts.spawn import SpawnDecision
from contracts.workloads import Resources
from tollgate.jupyterhub import QuotaDenied, Run, TollgateHooks, requested_resources, workload_id

START = datetime(2026, 11, 22, 10, 0, 0, 250_000, tzinfo=UTC)
GIB = 2**30


class KubeStyleSpawner(LocalProcessSpawner):  # type: ignore[misc]
    """The traits KubeSpawner adds for extra resources and node placement, as it declares them."""

    extra_resource_limits = Dict(config=True)
    extra_resource_guarantees = Dict(config=True)
    node_selector = Dict(config=True)


def spawner(cls: type[Spawner] = Spawner, **settings: object) -> Spawner:
    c = Config()
    for name, value in settings.items():
        setattr(c.Spawner, name, value)
    return cls(config=c)


def test_importing_the_hooks_pulls_in_no_server_side_dependency() -> None:
    code = (
        "import sys, tollgate.jupyterhub; "
        "print(sorted(m for m in ('fastapi', 'asyncpg', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resources_are_the_limits_unless_guarantees_are_charged() -> None:
    s = spawner(mem_limit="4G", mem_guarantee="1G", cpu_limit=2.0, cpu_guarantee=0.5)
    assert requested_resources(s) == Resources(cpus=Decimal(2), mem_bytes=4 * GIB)
    assert requested_resources(s, "guarantee") == Resources(cpus=Decimal("0.5"), mem_bytes=GIB)
    # Whichever is set counts when the preferred one is not.
    only_guarantee = spawner(mem_guarantee="512M")
    assert requested_resources(only_guarantee) == Resources(mem_bytes=512 * 2**20)
    assert requested_resources(spawner()) == Resources()


def test_gpus_and_their_model_come_from_kubespawner_style_traits() -> None:
    s = spawner(
        KubeStyleSpawner,
        mem_limit="8G",
        extra_resource_limits={"nvidia.com/gpu": "2"},
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
    )
    assert requested_resources(s) == Resources(
        mem_bytes=8 * GIB, gpus=2, gpu_model="nvidia-tesla-t4"
    )
    no_gpu = spawner(KubeStyleSpawner, node_selector={"nvidia.com/gpu.product": "H100"})
    assert requested_resources(no_gpu).gpu_model is None


def test_a_workload_id_names_one_start_of_one_server() -> None:
    one = workload_id("alice", "", START)
    assert one == "jupyter:alice::20261122T100000.250000Z"
    assert workload_id("alice", "", START) == one
    assert workload_id("alice", "gpu", START) != one
    assert workload_id("alice", "", START + timedelta(microseconds=1)) != one
    # A ':' in a name cannot make two users' ids meet.
    assert workload_id("a:b", "", START) != workload_id("a", "b:", START)


def test_readings_are_requested_resources_times_time_with_seq_in_milliseconds() -> None:
    resources = Resources(cpus=Decimal("1.5"), mem_bytes=4 * GIB, gpus=1, gpu_model="T4")
    run = Run("w", "e1", "alice", "hub", resources, START)
    first = run.batch(START + timedelta(seconds=90, microseconds=500), final=False)
    assert first.seq == 90_000 and not first.final
    values = {c.metric: c.value for c in first.counters}
    assert values == {
        "cpu.alloc.seconds": Decimal("135.00075"),
        "mem.alloc.byte_seconds": Decimal(4 * GIB) * Decimal("90.0005"),
        "gpu.alloc.seconds": Decimal("90.0005"),
    }
    assert {c.metric: c.labels for c in first.counters}["gpu.alloc.seconds"] == {"gpu_model": "T4"}
    # A clock that steps back still gives a newer seq; values never go down within the run.
    again = run.batch(START + timedelta(seconds=89), final=True)
    assert again.seq == 90_001 and again.final
    assert again.msg_id == "hub:e1:90001"


def test_the_hooks_survive_traitlets_copying_config_into_every_spawner() -> None:
    hooks = TollgateHooks("http://tollgate:8080", "token", host="hub")
    assert copy.deepcopy(hooks) is hooks
    c = Config()
    c.Spawner.pre_spawn_hook = hooks.pre_spawn_hook
    c.Spawner.post_stop_hook = hooks.post_stop_hook
    first, second = Spawner(config=c), Spawner(config=c)
    assert first.pre_spawn_hook.__self__ is hooks
    assert second.post_stop_hook.__self__ is hooks


def test_a_denial_carries_the_message_retry_time_and_a_link() -> None:
    retry_at = datetime.now(UTC) + timedelta(hours=2)
    decision = SpawnDecision(
        decision_id="d1", allowed=False, reason="quota_exceeded",
        message="You have used 61 of 60 GiB·h (memory-30d) <soon>.", retry_at=retry_at,
    )  # fmt: skip
    denial = QuotaDenied(decision, "https://q.example/?a=1&b=2")
    message, html = format_exception(denial)
    assert message == decision.message
    assert html == (
        "You have used 61 of 60 GiB·h (memory-30d) &lt;soon&gt;. "
        '<a href="https://q.example/?a=1&amp;b=2">See your quotas</a>.'
    )
    assert denial.status_code == 403 and denial.reason == "quota_exceeded"
    assert 7000 < int(denial.headers["Retry-After"]) <= 7200


OK = {"TOLLGATE_API_URL": "http://t", "TOLLGATE_INTEGRATOR_TOKEN": "tok"}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "TOLLGATE_API_URL is not set"),
        ({**OK, "TOLLGATE_API_URL": "tollgate:8080"}, "must be an http:// or https:// URL"),
        ({**OK, "TOLLGATE_INTEGRATOR_TOKEN": ""}, "tollgate token issue --subject jupyterhub"),
        ({**OK, "TOLLGATE_HUB_FAILURE_MODE": "maybe"}, "failure_mode must be 'open' or 'closed'"),
        ({**OK, "TOLLGATE_HUB_TIMEOUT": "5s"}, "TOLLGATE_HUB_TIMEOUT='5s' is not a number"),
        ({**OK, "TOLLGATE_HUB_TIMEOUT": "0"}, "timeout must be positive"),
        ({**OK, "TOLLGATE_PREFIX": "Toll.Gate"}, "must be one lower-case token"),
    ],
)
def test_bad_settings_are_refused_saying_what_to_set(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], says: str
) -> None:
    for name in ("TOLLGATE_API_URL", "TOLLGATE_INTEGRATOR_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(says)):
        TollgateHooks.from_env()


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_API_URL", "http://tollgate:8080/")
    monkeypatch.setenv("TOLLGATE_INTEGRATOR_TOKEN", "tok")
    monkeypatch.setenv("TOLLGATE_HUB_FAILURE_MODE", "closed")
    monkeypatch.setenv("TOLLGATE_HUB_HOST", "hub-1")
    monkeypatch.setenv("TOLLGATE_HUB_READING_INTERVAL", "30")
    monkeypatch.delenv("TOLLGATE_NATS_URL", raising=False)
    monkeypatch.setenv("TOLLGATE_NATS_NKEY_SEED_FILE", "/etc/tollgate/hub-1.nk")
    hooks = TollgateHooks.from_env(expected_seconds=7200)
    assert hooks.nats_seed_file == Path("/etc/tollgate/hub-1.nk")
    assert (hooks.api_url, hooks.failure_mode, hooks.host) == ("http://tollgate:8080", "closed",
                                                              "hub-1")  # fmt: skip
    assert (hooks.reading_interval, hooks.expected_seconds, hooks.nats_url) == (30, 7200, None)


def test_the_example_hub_config_wires_both_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_API_URL", "http://tollgate-api:8080")
    monkeypatch.setenv("TOLLGATE_INTEGRATOR_TOKEN", "tok")
    example = Path(__file__).parents[2] / "deploy" / "jupyterhub"
    c = PyFileConfigLoader("jupyterhub_config.py", str(example)).load_config()
    hooks = c.Spawner.pre_spawn_hook.__self__
    assert isinstance(hooks, TollgateHooks) and c.Spawner.post_stop_hook.__self__ is hooks
    assert (hooks.api_url, hooks.failure_mode) == ("http://tollgate-api:8080", "closed")
    s = Spawner(config=c)
    assert requested_resources(s, hooks.charge) == Resources(cpus=Decimal(2), mem_bytes=4 * GIB)
