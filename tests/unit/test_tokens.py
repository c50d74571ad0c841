"""Signed API tokens: what verifies, what does not, and why."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services.api.tokens import (
    BadSignature,
    MalformedToken,
    Principal,
    Role,
    TokenExpired,
    issue_token,
    verify_token,
)
from tollgate.commands import token as token_command

SECRET = "s3cret-for-tests"
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_issued_token_verifies_to_its_subject_role_and_expiry() -> None:
    token = issue_token(SECRET, "alice@example.org", Role.USER, DAY, now=NOW)

    principal = verify_token(SECRET, token, NOW + timedelta(hours=23))

    assert principal == Principal(Role.USER, "alice@example.org", NOW + DAY)
    assert token.startswith("tg1.") and token.count(".") == 2 and "=" not in token
    assert claims_of(token) == {
        "sub": "alice@example.org",
        "role": "user",
        "iat": int(NOW.timestamp()),
        "exp": int((NOW + DAY).timestamp()),
    }


@pytest.mark.parametrize("role", [Role.AUDITOR, Role.INTEGRATOR, "user"])
def test_every_signed_role_round_trips(role: Role | str) -> None:
    token = issue_token(SECRET, "svc", role, DAY, now=NOW)
    assert verify_token(SECRET, token, NOW).role == Role(role)


def test_token_is_refused_from_the_second_it_expires() -> None:
    token = issue_token(SECRET, "alice", Role.USER, timedelta(hours=1), now=NOW)
    assert verify_token(SECRET, token, NOW + timedelta(minutes=59, seconds=59)).subject == "alice"

    with pytest.raises(TokenExpired) as caught:
        verify_token(SECRET, token, NOW + timedelta(hours=1))

    assert caught.value.expired_at == NOW + timedelta(hours=1)
    assert caught.value.subject == "alice"
    assert "expired at 2026-11-22 11:00:00 UTC" in str(caught.value)
    assert "tollgate token issue --subject alice" in str(caught.value)


def test_token_signed_with_another_secret_is_refused() -> None:
    token = issue_token("another-installation", "alice", Role.USER, DAY, now=NOW)
    with pytest.raises(BadSignature, match="signed by another Tollgate"):
        verify_token(SECRET, token, NOW)


def test_raising_the_role_in_the_claims_breaks_the_signature() -> None:
    token = issue_token(SECRET, "alice", Role.USER, DAY, now=NOW)
    version, _, signature = token.split(".")
    forged = dict(claims_of(token), role="integrator")
    tampered = f"{version}.{b64(json.dumps(forged).encode())}.{signature}"

    with pytest.raises(BadSignature):
        verify_token(SECRET, tampered, NOW)


def test_extending_the_expiry_breaks_the_signature() -> None:
    token = issue_token(SECRET, "alice", Role.USER, timedelta(minutes=1), now=NOW)
    version, _, signature = token.split(".")
    forged = dict(claims_of(token), exp=int((NOW + 365 * DAY).timestamp()))
    tampered = f"{version}.{b64(json.dumps(forged, separators=(',', ':')).encode())}.{signature}"

    with pytest.raises(BadSignature):
        verify_token(SECRET, tampered, NOW + timedelta(minutes=5))


def test_a_flipped_signature_character_is_refused() -> None:
    token = issue_token(SECRET, "alice", Role.USER, DAY, now=NOW)
    last = token[-2]
    flipped = token[:-2] + ("A" if last != "A" else "B") + token[-1]

    with pytest.raises(BadSignature):
        verify_token(SECRET, flipped, NOW)


def test_a_signed_token_can_never_claim_admin() -> None:
    # Even someone holding the secret cannot mint admin: admin is the static token only.
    payload = b64(json.dumps({"sub": "eve", "role": "admin", "iat": 0, "exp": 2**40}).encode())
    mac = hmac.new(SECRET.encode(), f"tg1.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(MalformedToken, match="non-admin role"):
        verify_token(SECRET, f"tg1.{payload}.{b64(mac)}", NOW)
    with pytest.raises(ValueError, match="admin tokens are not minted"):
        issue_token(SECRET, "eve", Role.ADMIN, DAY, now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "tg1.only-two",
        "tg2.e30.AAAA",
        "tg1.e30.AAAA.extra",
        "tg1.e30.!!!!",
        "tg1.e30.",
        "tg1." + "A" * 5000 + ".AAAA",
    ],
)
def test_malformed_tokens_say_they_are_not_tollgate_tokens(token: str) -> None:
    with pytest.raises(MalformedToken):
        verify_token(SECRET, token, NOW)


@pytest.mark.parametrize(
    ("subject", "ttl"),
    [("", DAY), ("a\nb", DAY), ("x" * 201, DAY), ("alice", timedelta(0)), ("alice", 401 * DAY)],
)
def test_issue_refuses_unusable_subjects_and_lifetimes(subject: str, ttl: timedelta) -> None:
    with pytest.raises(ValueError):
        issue_token(SECRET, subject, Role.USER, ttl, now=NOW)


def test_token_command_prints_a_token_the_api_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TOLLGATE_TOKEN_SECRET", raising=False)
    app = typer.Typer()
    token_command.register(app)

    result = CliRunner().invoke(
        app, ["token", "issue", "--subject", "alice", "--role", "auditor", "--ttl", "12h"]
    )

    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    secret = (tmp_path / "token-secret").read_text().strip()
    principal = verify_token(secret, token, datetime.now(UTC))
    assert (principal.subject, principal.role) == ("alice", Role.AUDITOR)
    assert principal.expires_at is not None
    assert principal.expires_at - datetime.now(UTC) <= timedelta(hours=12)
    assert "curl -H 'Authorization: Bearer " in result.stderr
    assert f"No signing secret at {tmp_path / 'token-secret'}: creating one" in result.stderr


def test_token_command_refuses_a_bad_lifetime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLGATE_DATA_DIR", str(tmp_path))
    app = typer.Typer()
    token_command.register(app)

    result = CliRunner().invoke(app, ["token", "issue", "--subject", "alice", "--ttl", "soon"])

    assert result.exit_code != 0
    assert "is not a duration" in result.output
    assert "tg1." not in result.stdout


@pytest.mark.parametrize(
    ("subject", "says"),
    [
        ("", "1 to 200 characters"),
        ("a" * 201, "1 to 200 characters"),
        ("alice\n", "control characters"),
        ("al\u2028ice", "control characters"),
        ("alice\x85", "control characters"),
        ("a\ud800", "valid Unicode"),
        (" alice", "whitespace"),
    ],
)
def test_a_token_is_only_minted_for_a_name_the_contract_accepts(subject: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        issue_token("s" * 32, subject, Role.USER, timedelta(hours=1))
