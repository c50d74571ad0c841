"""`tollgate nats-config`: who may publish and subscribe to what, and the files it keeps."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nkeys
import pytest
from typer.testing import CliRunner

from contracts.commands import block_subject, terminate_subject
from contracts.samples import samples_subject
from contracts.spawn import spawn_check_subject
from contracts.usage import usage_subject
from contracts.workloads import workloads_subject
from infra.bus import CredentialsError, inbox_prefix_for, seed_public_key
from infra.settings import Settings
from tollgate.cli import app
from tollgate.commands.natsconfig import generate
from tollgate.natsauth import IdentityError, Role, Roster, inbox, permissions

KEY = "UA" + "B" * 54  # shape of a user public key; permissions only embed it
P = "tollgate"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more trailing tokens."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(pat) == len(sub)


def may_publish(name: str, role: Role, subject: str) -> bool:
    return any(matches(p, subject) for p in permissions(name, role, KEY, P).publish)


def may_subscribe(name: str, role: Role, subject: str) -> bool:
    return any(matches(p, subject) for p in permissions(name, role, KEY, P).subscribe)


EVERYONE = [
    ("ledger", Role.SERVICE),
    ("policy", Role.SERVICE),
    ("api", Role.SERVICE),
    ("node-a", Role.HOST),
    ("jupyterhub", Role.INTEGRATOR),
]


def test_the_matcher_follows_nats_wildcards() -> None:
    assert matches("a.*.c", "a.b.c") and not matches("a.*.c", "a.b.c.d")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")


def test_a_host_publishes_only_its_own_samples_and_workload_events() -> None:
    for subject in (samples_subject("node-a", P), workloads_subject("node-a", P)):
        assert may_publish("node-a", Role.HOST, subject)
    for subject in (samples_subject("node-b", P), workloads_subject("node-b", P)):
        assert not may_publish("node-a", Role.HOST, subject)
    assert may_publish("node-a", Role.HOST, spawn_check_subject(P))


def test_a_host_name_with_a_dot_is_one_encoded_token_not_a_wildcard() -> None:
    own = samples_subject("john.doe", P)
    assert own.endswith(".john%2Edoe")
    assert may_publish("john.doe", Role.HOST, own)
    assert not may_publish("john.doe", Role.HOST, samples_subject("john", P))


@pytest.mark.parametrize(("name", "role"), EVERYONE)
def test_only_the_policy_may_publish_commands(name: str, role: Role) -> None:
    commands = [terminate_subject("node-a", P), block_subject("alice", P)]
    assert all(may_publish(name, role, c) == (name == "policy") for c in commands)


@pytest.mark.parametrize(("name", "role"), EVERYONE)
def test_nobody_subscribes_to_terminate_commands_or_other_inboxes(name: str, role: Role) -> None:
    # Hosts read their commands through a JetStream consumer, never a plain subscription.
    assert not may_subscribe(name, role, terminate_subject("node-a", P))
    assert may_subscribe(name, role, f"{inbox(KEY)}.abc")
    assert not may_subscribe(name, role, "_INBOX.UOTHER.abc")
    assert inbox(KEY) == inbox_prefix_for(KEY)  # what bus.connect tells nats-py to use


def test_a_host_may_create_a_command_consumer_only_filtered_to_itself() -> None:
    own = f"$JS.API.CONSUMER.CREATE.TOLLGATE_COMMANDS.x1.{terminate_subject('node-a', P)}"
    other = f"$JS.API.CONSUMER.CREATE.TOLLGATE_COMMANDS.x1.{terminate_subject('node-b', P)}"
    assert may_publish("node-a", Role.HOST, own)
    assert not may_publish("node-a", Role.HOST, other)
    assert not may_publish("node-a", Role.HOST, "$JS.API.CONSUMER.CREATE.TOLLGATE_COMMANDS.x1")
    for admin in ("STREAM.CREATE", "STREAM.DELETE", "STREAM.PURGE", "CONSUMER.LIST"):
        assert not may_publish("node-a", Role.HOST, f"$JS.API.{admin}.TOLLGATE_COMMANDS")


def test_services_create_streams_but_never_delete_them() -> None:
    for name in ("ledger", "policy"):
        assert may_publish(name, Role.SERVICE, "$JS.API.STREAM.CREATE.TOLLGATE_SAMPLES")
        assert not may_publish(name, Role.SERVICE, "$JS.API.STREAM.DELETE.TOLLGATE_SAMPLES")
    assert not may_publish("api", Role.SERVICE, "$JS.API.STREAM.CREATE.TOLLGATE_SAMPLES")
    assert permissions("policy", Role.SERVICE, KEY, P).allow_responses
    assert not permissions("ledger", Role.SERVICE, KEY, P).allow_responses


def test_an_integrator_reads_the_feed_through_its_own_consumer_only() -> None:
    name, role = "jupyterhub", Role.INTEGRATOR
    assert may_publish(name, role, "$JS.API.CONSUMER.MSG.NEXT.TOLLGATE_USAGE.jupyterhub")
    assert not may_publish(name, role, "$JS.API.CONSUMER.MSG.NEXT.TOLLGATE_USAGE.policy")
    assert not may_publish(name, role, "$JS.API.CONSUMER.DURABLE.CREATE.TOLLGATE_USAGE.policy")
    assert may_subscribe(name, role, block_subject("alice", P))
    assert may_subscribe(name, role, "tollgate.v1.events.quota.alice")
    assert not may_publish(name, role, samples_subject("node-a", P))
    assert not may_publish(name, role, usage_subject("alice", P))


def test_a_roster_refuses_names_that_would_share_a_seed_or_a_consumer() -> None:
    roster = Roster(P).adding(["node-a"], ["jupyterhub"])
    with pytest.raises(IdentityError, match="share its seed file"):
        roster.adding(["api"])
    with pytest.raises(IdentityError, match="share its seed file"):
        roster.adding(["Node-A"])
    with pytest.raises(IdentityError, match="is taken"):
        roster.adding(integrators=["policy-p1"])
    with pytest.raises(IdentityError, match="letters, digits"):
        roster.adding(integrators=["hub.example"])
    with pytest.raises(IdentityError, match="control characters"):
        roster.adding(["bad\nhost"])
    with pytest.raises(IdentityError, match="no host or integrator"):
        roster.removing(["node-z"])
    assert Roster.from_json(roster.to_json()) == roster


def _seeds(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "seeds").glob("*.nk")}


def _generate(out: Path, hosts: list[str], **kw: list[str]) -> None:
    generate(
        out, hosts, kw.get("integrators", []), None, kw.get("rotate", []),
        kw.get("remove", []), "127.0.0.1:4222", str(out / "js"),
    )  # fmt: skip


def test_seeds_are_private_and_auth_conf_holds_their_public_keys(tmp_path: Path) -> None:
    _generate(tmp_path, ["node-a"], integrators=["jupyterhub"])
    assert stat.S_IMODE((tmp_path / "seeds").stat().st_mode) == 0o700
    auth = (tmp_path / "auth.conf").read_text()
    for name in ("ledger", "policy", "api", "node-a", "jupyterhub"):
        seed = tmp_path / "seeds" / f"{name}.nk"
        assert stat.S_IMODE(seed.stat().st_mode) == 0o600
        assert seed.read_bytes().startswith(b"SU")
        assert f'nkey: "{seed_public_key(seed)}"' in auth
    assert "include auth.conf" in (tmp_path / "nats-server.conf").read_text()
    assert "sync_interval: always" in (tmp_path / "nats-server.conf").read_text()


def test_adding_a_host_keeps_every_seed_and_rotate_changes_only_one(tmp_path: Path) -> None:
    _generate(tmp_path, ["node-a"], integrators=["jupyterhub"])
    first = _seeds(tmp_path)
    _generate(tmp_path, ["node-b"])  # node-a and jupyterhub stay without being named again
    second = _seeds(tmp_path)
    assert {k: second[k] for k in first} == first
    assert set(second) == {*first, "node-b.nk"}
    _generate(tmp_path, [], rotate=["node-a"])
    third = _seeds(tmp_path)
    assert third["node-a.nk"] != second["node-a.nk"]
    assert {k: v for k, v in third.items() if k != "node-a.nk"} == {
        k: v for k, v in second.items() if k != "node-a.nk"
    }
    auth = (tmp_path / "auth.conf").read_text()
    assert seed_public_key(tmp_path / "seeds/node-a.nk") in auth
    _generate(tmp_path, [], remove=["node-b"])
    assert "node-b.nk" not in _seeds(tmp_path)
    assert "node-b" not in (tmp_path / "auth.conf").read_text()


def test_the_command_prints_what_it_wrote_and_how_to_hand_seeds_over(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# the fleet\nnode-a\n\nnode-b  # rack 2\n")
    out = tmp_path / "nats"
    result = CliRunner().invoke(
        app, ["nats-config", "--out", str(out), "--hosts-file", str(hosts), "--host", "node-c"]
    )
    assert result.exit_code == 0, result.output
    for name in ("node-a", "node-b", "node-c", "ledger"):
        assert str(out / "seeds" / f"{name}.nk") in result.output
    assert "TOLLGATE_NATS_NKEY_SEED_FILE" in result.output
    bad = CliRunner().invoke(app, ["nats-config", "--out", str(out), "--integrator", "a.b"])
    assert bad.exit_code == 2
    assert "integrator name 'a.b'" in bad.output


def test_a_bad_seed_file_is_an_error_naming_the_file_and_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nk"
    with pytest.raises(CredentialsError, match=r"nope\.nk \(TOLLGATE_NATS_NKEY_SEED_FILE\)"):
        seed_public_key(missing)
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("not a seed\n")
    with pytest.raises(CredentialsError, match="does not hold an nkey seed"):
        seed_public_key(garbage)
    account = tmp_path / "account.nk"
    account.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))
    with pytest.raises(CredentialsError, match="not a user"):
        seed_public_key(account)


def test_tollgate_run_refuses_to_start_with_an_unreadable_seed(tmp_path: Path) -> None:
    env = {
        "TOLLGATE_NATS_URL": "nats://127.0.0.1:1",
        "TOLLGATE_NATS_NKEY_SEED_FILE": str(tmp_path / "missing.nk"),
    }
    result = CliRunner().invoke(app, ["run", "--subject", "alice", "--", "true"], env=env)
    assert result.exit_code == 2
    assert "missing.nk (TOLLGATE_NATS_NKEY_SEED_FILE)" in result.output


def test_settings_read_the_seed_file_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_NATS_NKEY_SEED_FILE", "/etc/tollgate/nats.nk")
    assert Settings().nats_nkey_seed_file == Path("/etc/tollgate/nats.nk")
    monkeypatch.setenv("TOLLGATE_NATS_NKEY_SEED_FILE", "")
    assert Settings().nats_nkey_seed_file is None


def test_an_admin_identity_is_added_only_when_asked_and_can_be_removed(tmp_path: Path) -> None:
    _generate(tmp_path, ["node-a"])
    assert "admin.nk" not in _seeds(tmp_path)
    generate(tmp_path, [], [], None, [], [], "127.0.0.1:4222", "js", admin=True)
    admin = tmp_path / "seeds" / "admin.nk"
    assert f'nkey: "{seed_public_key(admin)}"' in (tmp_path / "auth.conf").read_text()
    assert permissions("admin", Role.ADMIN, KEY, P).publish == (">",)
    with pytest.raises(IdentityError, match="share its seed file"):
        _generate(tmp_path, ["admin"])
    _generate(tmp_path, [], remove=["admin"])
    assert not admin.exists()
    assert seed_public_key(tmp_path / "seeds/node-a.nk") in (tmp_path / "auth.conf").read_text()


def test_a_service_refuses_to_start_with_an_unreadable_seed(tmp_path: Path) -> None:
    env = {
        "TOLLGATE_NATS_URL": "nats://127.0.0.1:1",
        "TOLLGATE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "TOLLGATE_NATS_NKEY_SEED_FILE": str(tmp_path / "ledger.nk"),
    }
    result = CliRunner().invoke(app, ["ledger"], env=env)
    assert result.exit_code == 2
    assert "ledger.nk (TOLLGATE_NATS_NKEY_SEED_FILE)" in result.output
