"""Composition root of the API: build the app from settings and serve it until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Callable, Iterator

import uvicorn

from infra.settings import Settings

from .app import create_app
from .errors import ApiStartupError


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its caller: `tollgate up` owns Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """Bind before starting, so a busy port is one clear error instead of a uvicorn exit.

    The socket is made with proto IPPROTO_TCP: asyncio turns Nagle's algorithm off only on
    sockets that say so, and accepted sockets inherit the listener's proto. With proto 0
    (what `socket.create_server` makes) every response waited ~40 ms for a delayed ACK.
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as exc:
        raise ApiStartupError(
            f"the API cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "set TOLLGATE_API_PORT (or TOLLGATE_API_HOST) to a free address"
        ) from None


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve the API until `stop` is set, then finish in-flight requests and close.

    `on_listening` gets the base URL once requests are accepted (useful with port 0).
    Raises `ApiStartupError` when the API cannot start.
    """
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="on",
        # A request waiting on a server that is down must not hold up Ctrl-C.
        timeout_graceful_shutdown=2,
    )
    server = _EmbeddedServer(config)
    sock = listen(settings.api_host, settings.api_port)
    stopping = asyncio.create_task(stop.wait())
    try:
        task = asyncio.create_task(_run(server, sock, app.state))
        started = asyncio.create_task(_wait_started(server, task))
        await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            started.result()  # raises ApiStartupError
            # What is loaded by now (FastAPI, pydantic schemas, the routes) stays: take it out
            # of the cycle collector's full collections, 20-60 ms each on this heap (loopstat).
            gc.collect()
            gc.freeze()
            if on_listening is not None:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                on_listening(f"http://{shown}:{port}")
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        else:
            # Stopped while starting: uvicorn finishes its startup, then shuts straight down,
            # so connections opened by the lifespan are closed rather than abandoned.
            started.cancel()
        server.should_exit = True
        await task
    finally:
        stopping.cancel()
        sock.close()


async def _run(server: uvicorn.Server, sock: socket.socket, state: object) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:
        # uvicorn exits the process when startup fails; turn that into an error we can report.
        cause = getattr(state, "startup_error", None)
        raise ApiStartupError(str(cause or "the API failed to start; see the log above")) from None


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    # uvicorn has no startup event; `started` flips once the lifespan ran and sockets serve.
    while not server.started:
        if task.done():
            await task  # raises ApiStartupError
            raise ApiStartupError("the API stopped before it started serving")
        await asyncio.sleep(0.02)
