"""The contract documents: generated from the code, committed, and internally consistent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from contracts.commands import commands_wildcard
from contracts.dlq import dlq_wildcard
from contracts.notice import notice_subject
from contracts.quota_events import quota_events_subject
from contracts.samples import samples_wildcard
from contracts.spawn import spawn_check_subject
from contracts.usage import usage_wildcard
from contracts.workloads import workloads_wildcard
from tollgate.apidocs import (
    asyncapi_document,
    asyncapi_yaml,
    meter_asyncapi_document,
    meter_asyncapi_yaml,
    openapi_json,
)
from tollgate.cli import app

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return asyncapi_document()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_committed_documents_match_the_code() -> None:
    assert (DOCS / "asyncapi.yaml").read_text() == asyncapi_yaml(), (
        "docs/asyncapi.yaml is stale: run `tollgate docs` and commit it"
    )
    assert (DOCS / "asyncapi-meter.yaml").read_text() == meter_asyncapi_yaml(), (
        "docs/asyncapi-meter.yaml is stale: run `tollgate docs` and commit it"
    )
    assert (DOCS / "openapi.json").read_text() == openapi_json(), (
        "docs/openapi.json is stale: run `tollgate docs` and commit it"
    )


def test_docs_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["docs", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["docs", "--out", str(tmp_path), "--check"]).exit_code == 0
    (tmp_path / "asyncapi.yaml").write_text("asyncapi: 3.0.0\n")
    stale = runner.invoke(app, ["docs", "--out", str(tmp_path), "--check"])
    assert stale.exit_code == 1
    assert "asyncapi.yaml is out of date" in stale.output


def test_every_reference_resolves(asyncapi: dict[str, Any]) -> None:
    refs = _refs(asyncapi)
    assert len(refs) > 30
    for ref in refs:
        _resolve(asyncapi, ref)
    openapi = json.loads(openapi_json())
    for ref in _refs(openapi):
        _resolve(openapi, ref)


def test_every_subject_of_the_contract_has_a_channel(asyncapi: dict[str, Any]) -> None:
    addresses = {
        c["address"].replace("{host}", "*").replace("{subject}", "*").replace("{reason}", "*")
        for c in asyncapi["channels"].values()
        if c.get("address")
    }
    wanted = {
        samples_wildcard(),
        workloads_wildcard(),
        usage_wildcard(),
        quota_events_subject("X").replace(".X", ".*"),
        dlq_wildcard(),
        spawn_check_subject(),
    }
    assert wanted <= addresses
    commands = {a for a in addresses if a.startswith(commands_wildcard().removesuffix(">"))}
    assert commands == {
        "tollgate.v1.commands.terminate.*",
        "tollgate.v1.commands.notice.*",
        "tollgate.v1.commands.block.*",
        "tollgate.v1.commands.unblock.*",
    }


def test_payloads_name_their_schema_and_version(asyncapi: dict[str, Any]) -> None:
    names = set()
    for message in asyncapi["components"]["messages"].values():
        payload = _resolve(asyncapi, message["payload"]["$ref"]) if message.get("payload") else {}
        const = payload.get("properties", {}).get("schema", {}).get("const")
        if const:
            names.add(const)
    assert {
        "tollgate.counter_batch.v1",
        "tollgate.workload_started.v1",
        "tollgate.workload_stopped.v1",
        "tollgate.spawn_request.v1",
        "tollgate.spawn_decision.v1",
        "tollgate.usage_recorded.v1",
        "tollgate.terminate_workload.v1",
        "tollgate.spawn_block.v1",
        "tollgate.quota_warning.v1",
        "tollgate.quota_exceeded.v1",
        "tollgate.quota_forecast.v1",
    } <= names


def test_spawn_check_is_request_reply(asyncapi: dict[str, Any]) -> None:
    operation = asyncapi["operations"]["spawn-check"]
    assert operation["action"] == "receive"
    reply = _resolve(asyncapi, operation["reply"]["messages"][0]["$ref"])
    assert _resolve(asyncapi, reply["$ref"])["payload"]["$ref"].endswith("/SpawnDecision")


def test_openapi_lists_every_endpoint_of_the_spec() -> None:
    paths = set(json.loads(openapi_json())["paths"])
    assert {
        "/v1/subjects/{subject}/quotas",
        "/v1/subjects/{subject}/usage",
        "/v1/spawn-checks",
        "/v1/workloads/{workload}",
        "/v1/reports/usage",
        "/v1/events",
        "/v1/audit/verify",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths  # the web page (/) is HTML for people, not part of the API schema


def test_the_meters_side_is_generated_from_its_own_declarations() -> None:
    meter = meter_asyncapi_document()
    refs = _refs(meter)
    for ref in refs:
        _resolve(meter, ref)
    actions = {
        c["address"]: meter["operations"][name]["action"]
        for name, c in meter["channels"].items()
        if c.get("address")  # the reply channel is the requester's inbox
    }
    assert actions == {
        samples_wildcard().replace("*", "{host}"): "send",
        workloads_wildcard().replace("*", "{host}"): "send",
        spawn_check_subject(): "send",
        "tollgate.v1.commands.terminate.{host}": "receive",
        notice_subject("X").replace(".X", ".{host}"): "receive",
    }
    reply = meter["operations"]["spawn-check"]["reply"]["messages"][0]["$ref"]
    assert _resolve(meter, _resolve(meter, reply)["$ref"])["payload"]["$ref"].endswith(
        "/SpawnDecision"
    )
    notice = meter["channels"]["notice"]["messages"]
    payload = _resolve(meter, next(iter(notice.values()))["$ref"])["payload"]
    union = _resolve(meter, payload["$ref"])
    assert {r["$ref"].rsplit("/", 1)[1] for r in union["anyOf"]} == {
        "TerminationScheduled",
        "TerminationCancelled",
    }
