"""A lean keep-alive HTTP/1.1 client for latency runs.

httpx spends milliseconds of its own per request managing its pool once requests queue,
which showed up as seconds of "latency" at 200 requests/s; this client costs one write and
two reads per request, so what is measured is the server. B4 and P3 use the same one.
"""

from __future__ import annotations

import asyncio


class HttpError(RuntimeError):
    """The server answered with something other than a 2xx, or not HTTP at all."""


class KeepAlivePool:
    """`size` persistent connections to one server; each request takes a free one."""

    def __init__(self, host: str, port: int, size: int, headers: dict[str, str]) -> None:
        self.host, self.port, self.size = host, port, size
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"Host: {host}:{port}\r\n{extra}"
        self._free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._all: list[asyncio.StreamWriter] = []

    async def open(self) -> KeepAlivePool:
        for _ in range(self.size):
            self._free.put_nowait(await self._connect())
        return self

    async def close(self) -> None:
        for writer in self._all:
            writer.close()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST `body` (JSON); the status and the response body."""
        reader, writer = await self._free.get()
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            for attempt in (1, 2):
                writer.write(request)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    break
                except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                    partial = getattr(exc, "partial", b"")
                    if attempt == 2 or partial:
                        raise
                    # The server closed an idle keep-alive connection (uvicorn does after
                    # 5 s) before reading this request: reconnect and send it again.
                    writer.close()
                    reader, writer = await self._connect()
            status, length = _parse_head(head)
            data = await reader.readexactly(length)
        except BaseException:
            # A connection in an unknown state is not handed out again.
            writer.close()
            reader, writer = await self._connect()
            raise
        finally:
            self._free.put_nowait((reader, writer))
        return status, data

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._all.append(writer)
        return reader, writer


def _parse_head(head: bytes) -> tuple[int, int]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise HttpError(f"not an HTTP response: {lines[0][:100]!r}") from None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value.strip())
    raise HttpError("the response has no Content-Length; this client reads only those")
