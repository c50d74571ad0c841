"""B4's server: a FastAPI endpoint returning a constant, served like the api is.

python -m bench.constant_api PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from fastapi import FastAPI

from services.api.bootstrap import _EmbeddedServer, listen

ANSWER = {"allowed": True, "reason": "ok", "message": "constant", "quotas": [], "fail_open": False}


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/spawn-checks")
    async def constant() -> dict[str, object]:
        return ANSWER

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def main(port: int) -> None:
    # The same uvicorn settings and listening socket as services/api/bootstrap.serve.
    config = uvicorn.Config(create_app(), log_level="warning", lifespan="on")
    await _EmbeddedServer(config).serve(sockets=[listen("127.0.0.1", port)])


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
