"""A hostile second server for the recipe attacks, run as a process of its own.

    python _hostile_recipe_server.py  ->  reads one JSON object per key from stdin's first line
                                          ({key: value}), prints its port, serves until stdin closes

It answers the run routes like the node pack would, each key's value a plain JSON dict in the
data-only codec: dicts shaped like recipes (a SaveImage, a LoadImage of a private file), which a
client that passes them on as inputs must treat as data.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from discomfort.remote.client import encode_for_http
from discomfort.remote.framing import frame_header


def frame(value: object) -> bytes:
    meta, buffers = encode_for_http(value, "val", "hostile", "the client")
    return frame_header(len(meta), [len(b) for b in buffers]) + meta + b"".join(bytes(b) for b in buffers)


async def main() -> None:
    table = {k: frame(v) for k, v in json.loads(sys.stdin.readline()).items()}

    async def create(request: web.Request) -> web.Response:
        return web.json_response({"run_id": "hostile", "token": "t" * 43, "backend": "native"})

    async def get(request: web.Request) -> web.Response:
        return web.Response(body=table[request.match_info["key"]], content_type="application/octet-stream")

    async def end(request: web.Request) -> web.Response:
        return web.json_response({"ended": True})

    app = web.Application()
    app.router.add_post("/discomfort/runs", create)
    app.router.add_get("/discomfort/runs/hostile/values/{key}", get)
    app.router.add_delete("/discomfort/runs/hostile", end)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
