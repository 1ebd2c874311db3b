"""The run routes on a plain aiohttp server, without ComfyUI: for the transport's tests and its
benchmark rows, and for trying a client against a server.

    python -m discomfort.remote.standalone [--host 127.0.0.1] [--port 0]

Prints the port it listens on, then serves until its standard input closes. The routes and their
rules are the node pack's (:mod:`.server`); outside ComfyUI no client may create runs without the
server secret (``DISCOMFORT_SERVER_SECRET``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import web

from .server import add_routes, run_server


async def serve(host: str, port: int) -> None:
    routes = web.RouteTableDef()
    add_routes(routes)
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]  # noqa: SLF001
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        run_server().shutdown_all()  # the runs' memory and files go with the server
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m discomfort.remote.standalone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
