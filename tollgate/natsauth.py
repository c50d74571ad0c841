"""NATS permissions of every Tollgate identity, and the server config that grants them.

Pure: names and public nkeys in, `auth.conf` text out (`tollgate nats-config` does the
files and keys). One account, one nkey user per identity, each allowed exactly what its
code does (worked out against nats-server 2.15 and nats-py 2.16):

- every identity replies and fetches through its own inbox, `_INBOX.<its public key>`
  (`infra.bus.connect` sets nats-py's `inbox_prefix` to it), and may subscribe there
  only: nobody reads another's JetStream acks, fetched messages or spawn decisions;
- a host publishes its own samples and workload events, asks for spawn checks, and reads
  its own terminate commands through an ephemeral pull consumer whose create request names
  its own subject as filter (nats-server 2.10+ refuses a config that filters otherwise);
- only the policy publishes commands; ledger and policy create and update the contract's
  streams (never delete them); integrators ask for spawn checks, subscribe to block and
  unblock commands and quota events, and read the usage feed through a durable consumer
  named after themselves; an optional `admin` (operators) may do anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from contracts._base import check_prefix, encode_token, subject_of
from contracts.commands import commands_stream, commands_wildcard, terminate_subject
from contracts.dlq import dlq_stream, dlq_wildcard
from contracts.grants import grants_wildcard
from contracts.notice import notice_subject
from contracts.quota_events import events_stream, events_wildcard
from contracts.samples import samples_stream, samples_subject
from contracts.spawn import spawn_check_subject
from contracts.usage import usage_stream, usage_wildcard
from contracts.workloads import workloads_stream, workloads_subject

API = "$JS.API"
SERVICES = ("ledger", "policy", "api")
ADMIN = "admin"
# Integrators name their usage-feed consumer after themselves: a JetStream consumer name.
INTEGRATOR_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_HOST = 200


class Role(StrEnum):
    SERVICE = "service"
    HOST = "host"
    INTEGRATOR = "integrator"
    ADMIN = "admin"


class IdentityError(ValueError):
    """A host or integrator name that cannot be given an identity; the message says why."""


@dataclass(frozen=True)
class Permissions:
    """What one NATS user may publish and subscribe to."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer requests it receives (the policy)


@dataclass(frozen=True)
class Roster:
    """Who gets an identity: the services, plus the hosts and integrators named so far."""

    prefix: str
    hosts: tuple[str, ...] = ()
    integrators: tuple[str, ...] = ()
    admin: bool = False  # an operator identity that may do anything (optional)

    def adding(
        self, hosts: Iterable[str] = (), integrators: Iterable[str] = (), admin: bool = False
    ) -> Roster:
        """This roster with more hosts and integrators (names already in it are kept once)."""
        new_hosts = [check_host(h) for h in hosts]
        new_integrators = [check_integrator(i) for i in integrators]
        roster = Roster(
            self.prefix,
            tuple(sorted({*self.hosts, *new_hosts})),
            tuple(sorted({*self.integrators, *new_integrators})),
            self.admin or admin,
        )
        roster.check_unique()
        return roster

    def removing(self, names: Iterable[str]) -> Roster:
        """This roster without the named hosts or integrators (services cannot be removed)."""
        gone = set(names)
        for name in sorted(gone):
            if name in SERVICES:
                raise IdentityError(f"{name!r} is a service identity and cannot be removed")
            if name == ADMIN and self.admin:
                continue
            if name not in self.hosts and name not in self.integrators:
                raise IdentityError(
                    f"cannot remove {name!r}: no host or integrator of that name was configured"
                )
        return Roster(
            self.prefix,
            tuple(h for h in self.hosts if h not in gone),
            tuple(i for i in self.integrators if i not in gone),
            self.admin and ADMIN not in gone,
        )

    def identities(self) -> list[tuple[str, Role]]:
        """Every identity, services first, each with its role."""
        return [
            *((s, Role.SERVICE) for s in SERVICES),
            *([(ADMIN, Role.ADMIN)] if self.admin else []),
            *((h, Role.HOST) for h in self.hosts),
            *((i, Role.INTEGRATOR) for i in self.integrators),
        ]

    def check_unique(self) -> None:
        """Each identity needs a seed file of its own: no two may share a file name."""
        seen: dict[str, str] = {}
        for name, role in self.identities():
            stem = seed_stem(name).lower()  # case-insensitive file systems exist
            if stem in seen:
                raise IdentityError(
                    f"{role.value} {name!r} would share its seed file with {seen[stem]}; "
                    "every host, integrator and service needs a distinct name"
                )
            seen[stem] = f"{role.value} {name!r}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "prefix": self.prefix,
                "hosts": self.hosts,
                "integrators": self.integrators,
                "admin": self.admin,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Roster:
        data = json.loads(text)
        return cls(check_prefix(data["prefix"])).adding(
            data["hosts"], data["integrators"], bool(data.get("admin", False))
        )


@dataclass(frozen=True)
class User:
    """One identity as the server knows it: a public nkey and its permissions."""

    name: str
    role: Role
    public_key: str
    permissions: Permissions = field(repr=False)


def check_host(name: str) -> str:
    """A host name as the contract allows it (any text; it is %-encoded in subjects)."""
    if not name or len(name) > MAX_HOST or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise IdentityError(
            f"host name {name!r} must be 1 to {MAX_HOST} characters without control characters"
        )
    return name


def check_integrator(name: str) -> str:
    """An integrator name: it also names its usage-feed consumer, so it must be one."""
    if not INTEGRATOR_RE.match(name):
        raise IdentityError(
            f"integrator name {name!r} must be 1 to 64 letters, digits, '_' or '-' (it names "
            "the integrator's JetStream consumer on the usage feed), e.g. 'jupyterhub'"
        )
    if any(name == s or name.startswith(f"{s}-") for s in ("ledger", "policy")):
        raise IdentityError(
            f"integrator name {name!r} is taken: the ledger and policy name their own "
            "consumers like that; pick another, e.g. 'jupyterhub'"
        )
    return name


def seed_stem(name: str) -> str:
    """The seed file name of an identity, without `.nk`: the name as one safe token."""
    return encode_token(name)


def inbox(public_key: str) -> str:
    """The reply inbox of an identity (must match `infra.bus.inbox_prefix_for`)."""
    return f"_INBOX.{public_key}"


def permissions(name: str, role: Role, public_key: str, prefix: str) -> Permissions:
    """Least privilege for one identity."""
    own_inbox = f"{inbox(public_key)}.>"
    if role is Role.ADMIN:  # operators, `tollgate up` against this server, the nats CLI
        return Permissions((">",), (">",))
    if role is Role.HOST:
        return _host(name, prefix, own_inbox)
    if role is Role.INTEGRATOR:
        return _integrator(name, prefix, own_inbox)
    return {"ledger": _ledger, "policy": _policy, "api": _api}[name](prefix, own_inbox)


def _streams(prefix: str) -> list[str]:
    return [
        f(prefix)
        for f in (
            samples_stream,
            usage_stream,
            workloads_stream,
            commands_stream,
            events_stream,
            dlq_stream,
        )
    ]


def _stream_admin(prefix: str) -> list[str]:
    # Create and update (services bring the streams up to date at start), never delete.
    return [
        f"{API}.STREAM.{op}.{s}" for s in _streams(prefix) for op in ("CREATE", "UPDATE", "INFO")
    ]


def _consume(stream: str, consumer: str = "*") -> list[str]:
    # nats-py creates durables by DURABLE.CREATE (durable_name only) or CREATE.<name>[.<filter>].
    return [
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}",
        f"{API}.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"{API}.CONSUMER.INFO.{stream}.{consumer}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _ledger(prefix: str, own_inbox: str) -> Permissions:
    publish = [
        *_stream_admin(prefix),
        *_consume(samples_stream(prefix)),
        usage_wildcard(prefix),
        dlq_wildcard(prefix),
    ]
    return Permissions(tuple(publish), (own_inbox,))


def _policy(prefix: str, own_inbox: str) -> Permissions:
    forwarded = subject_of(prefix, "spawn", "check", "p", "*")  # partitioned policies
    publish = [
        *_stream_admin(prefix),
        f"{API}.STREAM.NAMES",  # is there a stream for quota events yet?
        *_consume(usage_stream(prefix)),
        *_consume(workloads_stream(prefix)),
        commands_wildcard(prefix),
        events_wildcard(prefix),
        forwarded,
    ]
    # Grant records are cues from the API to read the grants record.
    subscribe = [spawn_check_subject(prefix), forwarded, grants_wildcard(prefix), own_inbox]
    return Permissions(tuple(publish), tuple(subscribe), allow_responses=True)


def _api(prefix: str, own_inbox: str) -> Permissions:
    publish = [
        spawn_check_subject(prefix),
        grants_wildcard(prefix),  # a grant or revocation committed: cue the policy
        # /metrics: the ledger consumers' backlog and the dead letters held.
        f"{API}.CONSUMER.INFO.{samples_stream(prefix)}.*",
        f"{API}.STREAM.INFO.{dlq_stream(prefix)}",
    ]
    return Permissions(tuple(publish), (own_inbox,))


def _host(host: str, prefix: str, own_inbox: str) -> Permissions:
    commands = commands_stream(prefix)
    publish = [
        samples_subject(host, prefix),
        workloads_subject(host, prefix),
        spawn_check_subject(prefix),
        # Its own commands only: the filter subject is part of the create request's subject.
        f"{API}.CONSUMER.CREATE.{commands}.*.{terminate_subject(host, prefix)}",
        # ... and the notices before termination addressed to it (`tollgate run` shows them).
        f"{API}.CONSUMER.CREATE.{commands}.*.{notice_subject(host, prefix)}",
        # Consumer names are random (several meters may run on one host), so fetch and ack
        # name any consumer of the commands stream; a host cannot list consumers or learn
        # another host's consumer name, and cannot create one that reads other commands.
        f"{API}.CONSUMER.MSG.NEXT.{commands}.*",
        f"$JS.ACK.{commands}.>",
    ]
    return Permissions(tuple(publish), (own_inbox,))


def _integrator(name: str, prefix: str, own_inbox: str) -> Permissions:
    usage = usage_stream(prefix)
    publish = [
        spawn_check_subject(prefix),
        *_consume(usage, name),
        f"{API}.CONSUMER.DELETE.{usage}.{name}",
        f"{API}.STREAM.INFO.{usage}",
    ]
    subscribe = [
        subject_of(prefix, "commands", "block", ">"),
        subject_of(prefix, "commands", "unblock", ">"),
        subject_of(prefix, "events", "quota", ">"),
        grants_wildcard(prefix),
        own_inbox,
    ]
    return Permissions(tuple(publish), tuple(subscribe))


def users(roster: Roster, public_keys: dict[str, str]) -> list[User]:
    """Every identity of `roster` with its permissions; `public_keys` maps name -> U-key."""
    return [
        User(
            name, role, public_keys[name], permissions(name, role, public_keys[name], roster.prefix)
        )
        for name, role in roster.identities()
    ]


def _quoted(text: str) -> str:
    # NATS config strings take JSON's escapes; quoting also keeps `$JS...` from being read
    # as a variable reference.
    return json.dumps(text)


def _list(items: Iterable[str], indent: str) -> str:
    return "[\n" + "".join(f"{indent}  {_quoted(i)}\n" for i in items) + f"{indent}]"


def render_auth_conf(roster: Roster, public_keys: dict[str, str]) -> str:
    """The `authorization` block: one nkey user per identity, with its permissions."""
    out = [
        f"# Generated by `tollgate nats-config` for subject prefix {roster.prefix!r}.",
        "# Do not edit: re-run the command (it keeps every existing seed) and reload the",
        "# server (`nats-server --signal reload`). Included from nats-server.conf.",
        "authorization {",
        "  users = [",
    ]
    for user in users(roster, public_keys):
        p = user.permissions
        out += [
            f"    # {user.role.value} {seed_stem(user.name)}",
            "    {",
            f"      nkey: {_quoted(user.public_key)}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(p.publish, '        ')} }}",
            f"        subscribe: {{ allow: {_list(p.subscribe, '        ')} }}",
        ]
        if p.allow_responses:
            out.append("        allow_responses: true")
        out += ["      }", "    }"]
    out += ["  ]", "}", ""]
    return "\n".join(out)


def render_server_conf(listen: str, store_dir: str) -> str:
    """A complete example nats-server config: listener, JetStream, and `include auth.conf`."""
    return "\n".join(
        [
            "# Generated by `tollgate nats-config`: a complete nats-server config for Tollgate.",
            "# Start it with `nats-server -c nats-server.conf`; check it with `-t`.",
            "# To keep a config of your own, add `include auth.conf` to it instead.",
            f"listen: {_quoted(listen)}",
            "server_name: tollgate",
            "max_payload: 8MB",
            "jetstream {",
            f"  store_dir: {_quoted(store_dir)}",
            "  # Acknowledged means on disk: the ledger's exactly-once story starts here.",
            "  sync_interval: always",
            "}",
            "include auth.conf",
            "",
        ]
    )
