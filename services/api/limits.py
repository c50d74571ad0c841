"""A bound on request bodies, so no caller (signed in or not) makes the API hold megabytes."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 1 << 20  # a spawn check is well under 1 KiB; the largest legitimate body is a form
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


class BodyLimit:
    """Reads a request body up to `limit` bytes before the app sees it; 413 beyond that.

    The check runs before authentication and before FastAPI parses JSON: a declared
    Content-Length over the limit is refused unread, a chunked body as soon as it passes it.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _answer(send, 400, "Content-Length is not a number of bytes")
                return
            if int(declared) > self.limit:
                await self._too_large(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        mib = self.limit / (1 << 20)
        await _answer(
            send,
            413,
            f"the request body is over the {mib:g} MiB limit; a spawn check is a small JSON "
            "object (at most 100 groups of at most 200 characters)",
        )


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
