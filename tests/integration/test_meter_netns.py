"""`tollgate run --netns` with real traffic: LAN and WAN, in and out, IPv4 and IPv6.

The workload runs in a namespace of its own behind NAT; two peers are namespaces of the
test's own, one made "LAN" and one "WAN" by the LAN list given to `tollgate run`. What it
sends and receives is known to the byte; iptables counts whole IP packets, so the ledger
must hold the payload plus no more than the TCP/IP header overhead `overhead_bound` allows
(IPv4 52 and IPv6 72 header bytes a packet, every segment and every ACK counted).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg

import tests.integration.test_run as run_tests
from services.ledger.app import LedgerService
from tests.conftest import unique
from tests.integration.conftest import total
from tests.integration.test_netns_lab import (
    forwarding_restored,
    lab,
    leftovers,
    needs_lab,
    overhead_bound,
    sh,
)
from tests.integration.test_run import Runs, final_series

env, runs = run_tests.env, run_tests.runs  # the fixtures `tollgate run` tests use

CLIENT = """
import json, socket, struct, sys
for address, up, down in json.loads(sys.argv[1]):
    s = socket.create_connection((address, 9000), timeout=20)
    s.sendall(struct.pack("!II", up, down) + b"u" * up)
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    assert got == down, (address, got, down)
    s.close()
print("exchanged", flush=True)
"""


def uplink_mtu() -> int:
    routes = json.loads(subprocess.check_output(["ip", "-j", "route", "show", "default"]))
    mtus = [int(Path(f"/sys/class/net/{r['dev']}/mtu").read_text()) for r in routes]
    return min(mtus, default=1500)


@needs_lab
async def test_a_netns_workload_is_charged_its_lan_and_wan_bytes_in_and_out(
    runs: Runs, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    alice, workload = unique("alice"), unique("w")
    with forwarding_restored():
        async with lab() as the_lab:
            lan, wan = the_lab.peer(), the_lab.peer()
            await the_lab.serve(lan)
            await the_lab.serve(wan)
            # (peer, address, bytes the workload sends after the 8-byte header, bytes back)
            plan = [
                ("lan", 4, lan.ip4, 150_000, 230_000),
                ("wan", 4, wan.ip4, 310_000, 70_000),
                ("lan", 6, lan.ip6, 90_000, 120_000),
                ("wan", 6, wan.ip6, 60_000, 260_000),
            ]
            exchanges = json.dumps([[a, up, down] for _, _, a, up, down in plan])
            ran = await runs.run(
                "-s", alice, "--workload", workload, "--host", unique("h"), "--netns",
                "--lan-cidr", f"{lan.v4},{lan.v6}", "--interval", "0.2",
                "--", sys.executable, "-c", CLIENT, exchanges,
            )  # fmt: skip
            assert ran.status == 0, ran.stderr
            assert ran.stdout == b"exchanged\n"
            assert sorted(lan.received + wan.received) == sorted(up for *_, up, _ in plan)

    await final_series(pool, workload)
    mtu = uplink_mtu()
    for kind in ("lan", "wan"):
        mine = [(v, up + 8, down) for k, v, _, up, down in plan if k == kind]
        tx = await total(pool, alice, f"net.tx.{kind}.bytes")
        rx = await total(pool, alice, f"net.rx.{kind}.bytes")
        sent, got = sum(s for _, s, _ in mine), sum(d for _, _, d in mine)
        tx_bound = sum(overhead_bound(v, mtu, s, d) for v, s, d in mine)
        rx_bound = sum(overhead_bound(v, mtu, d, s) for v, s, d in mine)
        print(
            f"{kind}: tx {tx} for {sent} sent (+{tx - sent}, bound +{tx_bound}); "
            f"rx {rx} for {got} received (+{rx - got}, bound +{rx_bound})"
        )
        assert sent < tx <= sent + tx_bound
        assert got < rx <= got + rx_bound
    assert leftovers("tollgate-") == [] and leftovers("tgw") == [] and leftovers("TGR") == []


@needs_lab
async def test_a_netns_run_whose_command_cannot_start_leaves_nothing_behind(
    runs: Runs, streams: None
) -> None:
    with forwarding_restored():
        ran = await runs.run("-s", unique("alice"), "--netns", "--", "/no/such/command")
    assert ran.status == 127, ran.stderr
    assert b"/no/such/command" in ran.stderr
    assert leftovers("tollgate-") == [] and leftovers("tgw") == [] and leftovers("TGR") == []


@needs_lab
async def test_what_a_killed_netns_run_left_behind_is_removed_by_the_next(
    runs: Runs, streams: None
) -> None:
    ident = secrets.token_hex(4)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    sh("ip", "netns", "add", f"tollgate-{ident}-{dead.pid}")
    sh(
        "ip",
        "link",
        "add",
        f"tgw{ident}",
        "type",
        "veth",
        "peer",
        "name",
        f"tgn{ident}",
        "netns",
        f"tollgate-{ident}-{dead.pid}",
    )
    chain = f"TGR{ident.upper()}-NAT"
    sh("iptables", "-t", "nat", "-N", chain)
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", chain)
    with forwarding_restored():
        ran = await runs.run("-s", unique("alice"), "--netns", "--", "true")
    assert ran.status == 0, ran.stderr
    assert leftovers(f"tollgate-{ident}") == [] and leftovers(f"tgw{ident}") == []
    assert leftovers(f"TGR{ident.upper()}") == []
