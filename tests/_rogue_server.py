"""A hostile server for RemoteContext, run as a process of its own.

    python _rogue_server.py MARKER   ->  prints its port, serves until stdin closes

It answers the run routes like the node pack would, but each value key gets an answer crafted to
hurt the client that decodes it: pickles (code writing MARKER), lies about sizes, bad bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import struct
import sys

from aiohttp import web


class _System:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def frame(magic: bytes, version: int, meta: bytes, sizes=(), body: bytes = b"") -> bytes:
    return struct.pack("<4sHHIQ", magic, version, 0, len(sizes), len(meta)) + b"".join(
        struct.pack("<Q", n) for n in sizes) + meta + body


def tensor_desc(dtype: str, shape: list) -> bytes:
    return json.dumps({"format": 1, "value": {"t": "tensor", "dtype": dtype, "shape": shape, "buf": 0,
                                              "device": "cpu", "grad": False}}).encode()


def answers(marker: str) -> dict[str, tuple[bytes, dict]]:
    evil = pickle.dumps(_System(marker), protocol=5)
    good = frame(b"DCFD", 2, tensor_desc("float32", [2]), [8], struct.pack("<2f", 1.5, -2.0))
    return {
        "good": (good, {}),
        "old_pickle": (frame(b"DCFV", 1, evil), {}),
        "pickle_meta": (frame(b"DCFD", 2, evil), {}),
        "huge_buffer": (frame(b"DCFD", 2, tensor_desc("uint8", [1 << 50]), [1 << 50]), {}),
        "lying_length": (good, {"Content-Length": str(1 << 40)}),
        "bool_bytes": (frame(b"DCFD", 2, tensor_desc("bool", [4]), [4], b"\x00\x01\x09\x00"), {}),
        "deep": (frame(b"DCFD", 2, b"[" * 100_000), {}),
        "short_body": (good[:-3], {"Content-Length": str(len(good))}),
    }


async def main(marker: str) -> None:
    table = answers(marker)

    async def create(request: web.Request) -> web.Response:
        return web.json_response({"run_id": "rogue", "token": "t" * 43, "backend": "native"})

    async def get(request: web.Request) -> web.StreamResponse:
        body, headers = table[request.match_info["key"]]
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = int(headers.get("Content-Length", len(body)))
        await resp.prepare(request)
        await resp.write(body)
        if len(body) < resp.content_length:  # cut the connection short
            request.transport.close()  # type: ignore[union-attr]
            return resp
        await resp.write_eof()
        return resp

    async def end(request: web.Request) -> web.Response:
        return web.json_response({"ended": True})

    app = web.Application()
    app.router.add_post("/discomfort/runs", create)
    app.router.add_get("/discomfort/runs/rogue/values/{key}", get)
    app.router.add_delete("/discomfort/runs/rogue", end)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
