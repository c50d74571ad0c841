"""`tollgate nats-config`: nkey identities and permissions for a NATS server (see natsauth)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import typer

from contracts._base import DEFAULT_PREFIX, check_prefix
from infra.bus import CredentialsError, seed_public_key
from tollgate.natsauth import (
    IdentityError,
    Role,
    Roster,
    render_auth_conf,
    render_server_conf,
    seed_stem,
)

ROSTER = "identities.json"
HELP = """Write NATS security for Tollgate into OUT: auth.conf (one nkey user per identity,
each allowed only what it does), a seed file per identity in OUT/seeds (mode 0600), and an
example nats-server.conf that includes auth.conf.

Identities: the services ledger, policy and api; one per --host (it may publish only its
own samples and workload events and read only its own terminate commands); one per
--integrator (spawn checks, block/unblock commands, quota events, the usage feed); with
--admin, an operator identity allowed everything.

Run it again with more hosts to add them: existing seeds are kept, and the hosts and
integrators configured before stay (remove one with --remove). --rotate NAME gives one
identity a new seed.
"""


def _new_seed() -> bytes:
    import nkeys  # type: ignore[import-untyped]

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def _write_private(path: Path, data: bytes) -> None:
    """Write `path` readable by its owner only, never visible half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_hosts_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror}", param_hint="--hosts-file"
        ) from None
    # One host per line; blank lines and `#` comments are skipped.
    return [s for line in lines if (s := line.split("#", 1)[0].strip())]


def _load_roster(out: Path, prefix: str | None) -> Roster:
    path = out / ROSTER
    if not path.exists():
        return Roster(check_prefix(prefix or DEFAULT_PREFIX))
    try:
        before = Roster.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise typer.BadParameter(
            f"{path} is not a roster written by this command ({exc}); fix or delete it "
            "(the seeds in seeds/ are kept either way)",
            param_hint="--out",
        ) from None
    return dataclasses.replace(before, prefix=check_prefix(prefix)) if prefix else before


def generate(
    out: Path,
    hosts: list[str],
    integrators: list[str],
    prefix: str | None,
    rotate: list[str],
    remove: list[str],
    listen: str,
    store_dir: str,
    admin: bool = False,
) -> list[tuple[str, Role, Path, str]]:
    """Write everything into `out`; return (name, role, seed file, what happened) per identity."""
    before = _load_roster(out, prefix).adding(hosts, integrators, admin)
    roster = before.removing(remove)
    names = {name for name, _ in roster.identities()}
    for name in rotate:
        if name not in names:
            raise IdentityError(f"cannot rotate {name!r}: it is not one of {sorted(names)}")
    seeds = out / "seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    seeds.chmod(0o700)
    report: list[tuple[str, Role, Path, str]] = []
    keys: dict[str, str] = {}
    for name, role in roster.identities():
        path = seeds / f"{seed_stem(name)}.nk"
        if path.exists() and name not in rotate:
            status = "kept"
        else:
            status = "rotated" if path.exists() else "new"
            _write_private(path, _new_seed() + b"\n")
        keys[name] = seed_public_key(path)
        report.append((name, role, path, status))
    for name, role in before.identities():
        if name in remove:
            path = seeds / f"{seed_stem(name)}.nk"
            path.unlink(missing_ok=True)
            report.append((name, role, path, "removed"))
    (out / "auth.conf").write_text(render_auth_conf(roster, keys))
    (out / "nats-server.conf").write_text(render_server_conf(listen, store_dir))
    (out / ROSTER).write_text(roster.to_json() + "\n")
    return report


def _explain(out: Path, report: list[tuple[str, Role, Path, str]]) -> None:
    for name, role, path, status in report:
        typer.echo(f"  {status:8} {role.value:10} {name:24} {path}")
    typer.echo(
        f"\nWrote {out / 'auth.conf'}, {out / 'nats-server.conf'} and {out / ROSTER}.\n"
        "Start NATS with `nats-server -c nats-server.conf` (or `include auth.conf` from your "
        "own config); after a re-run, `nats-server --signal reload` applies the changes.\n\n"
        "Give each identity its seed, and only its own (a seed is a password):\n"
        "  host H:      copy seeds/H.nk to H, e.g. `install -m 600 H.nk /etc/tollgate/nats.nk`,\n"
        "               and set TOLLGATE_NATS_NKEY_SEED_FILE=/etc/tollgate/nats.nk for\n"
        "               `tollgate meter` and `tollgate run` there\n"
        "  services:    TOLLGATE_NATS_NKEY_SEED_FILE=<ledger.nk | policy.nk | api.nk> for\n"
        "               `tollgate ledger`, `tollgate policy`, `tollgate api`\n"
        "  integrators: seeds/<name>.nk; connect with that nkey and inbox prefix\n"
        "               _INBOX.<its public key> (nats-py: nkeys_seed=, inbox_prefix=), and\n"
        "               read the usage feed through a durable consumer named <name>\n"
        "  admin:       seeds/admin.nk (if --admin) may do anything: keep it with the operators\n"
        "Seeds in seeds/ that were kept are unchanged: nothing already deployed needs a new one."
    )


def register(app: typer.Typer) -> None:
    @app.command("nats-config", help=HELP, no_args_is_help=True)
    def nats_config(
        out: Path = typer.Option(..., "--out", help="directory to write into (kept across runs)"),
        host: list[str] = typer.Option([], "--host", help="a host running a meter (repeatable)"),
        hosts_file: Path | None = typer.Option(
            None, "--hosts-file", help="a file with one host name per line (# comments)"
        ),
        integrator: list[str] = typer.Option(
            [], "--integrator", help="an integrator, e.g. jupyterhub (repeatable)"
        ),
        prefix: str | None = typer.Option(
            None, help=f"subject prefix (default: as before, else {DEFAULT_PREFIX!r})"
        ),
        rotate: list[str] = typer.Option([], help="give this identity a new seed (repeatable)"),
        remove: list[str] = typer.Option([], help="remove this host or integrator (repeatable)"),
        listen: str = typer.Option("0.0.0.0:4222", help="listen address in nats-server.conf"),
        store_dir: str = typer.Option(
            "/var/lib/nats/jetstream", help="JetStream store_dir in nats-server.conf"
        ),
        admin: bool = typer.Option(
            False,
            "--admin",
            help="add an operator identity 'admin' allowed everything (for the nats CLI, or "
            "`tollgate up` against this server); remove it with --remove admin",
        ),
    ) -> None:
        hosts = host + (_read_hosts_file(hosts_file) if hosts_file else [])
        try:
            report = generate(
                out, hosts, integrator, prefix, rotate, remove, listen, store_dir, admin
            )  # fmt: skip
        except (ValueError, CredentialsError) as exc:  # IdentityError, a bad prefix
            typer.echo(f"tollgate nats-config: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            typer.echo(f"tollgate nats-config: cannot write into {out}: {exc}", err=True)
            raise typer.Exit(2) from None
        _explain(out, report)
