"""A real three-node NATS cluster on loopback ports, and real `tollgate` service processes.

Each node is a nats-server process with its own JetStream file store (`sync_interval:
always`), client port and route port; every node lists every other node's route, so the
cluster forms whichever node comes up first. Tests kill nodes with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.js.errors import APIError

from tollgate.embedded import _wait_for_port, free_port, nats_server_binary


@dataclass
class Node:
    name: str
    data_dir: Path
    port: int = field(default_factory=free_port)
    route_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir / "nats.log"

    def config(self, cluster: str, routes: list[int]) -> str:
        route_urls = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
        return "\n".join(
            [
                f"server_name: {self.name}",
                f"listen: 127.0.0.1:{self.port}",
                "jetstream {",
                f'  store_dir: "{self.data_dir / "jetstream"}"',
                "  sync_interval: always",
                "}",
                "cluster {",
                f"  name: {cluster}",
                f"  listen: 127.0.0.1:{self.route_port}",
                f"  routes: [{route_urls}]",
                "}",
                "",
            ]
        )


class NatsCluster:
    """Three (or `size`) clustered nats-server processes; `stop` ends every one of them."""

    def __init__(self, workdir: Path, size: int = 3, name: str = "tollgate-test") -> None:
        self.name = name
        self.nodes = [Node(f"n{i}", workdir / f"n{i}") for i in range(size)]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what TOLLGATE_NATS_URL takes)."""
        return ",".join(n.url for n in self.nodes)

    def start(self) -> NatsCluster:
        binary = nats_server_binary()
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            routes = [n.route_port for n in self.nodes if n is not node]
            conf = node.data_dir / "nats.conf"
            conf.write_text(node.config(self.name, routes))
            with open(node.log, "ab") as out:
                node.proc = subprocess.Popen(
                    [str(binary), "-c", str(conf)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        for node in self.nodes:
            assert node.proc is not None
            _wait_for_port(node.port, node.proc, f"nats-server {node.name}", node.log)
        return self

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill(self, name: str) -> None:
        """kill -9 one node."""
        proc = self.node(name).proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(15)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)


async def jetstream_ready(nc: Client) -> bool:
    """True once the cluster has a JetStream meta leader that answers account requests."""
    try:
        await nc.jetstream().account_info()
        return True
    except (nats.errors.Error, APIError, TimeoutError, OSError):
        return False


def start_service(
    command: str, env: dict[str, str], log: Path, extra_args: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m tollgate.cli <command>` as a real process, logging to `log`."""
    out = open(log, "ab")  # noqa: SIM115 - the child writes to it
    return subprocess.Popen(
        [sys.executable, "-m", "tollgate.cli", command, *(extra_args or [])],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def stop_service(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGINT (a clean stop), then SIGKILL if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait, 5)
