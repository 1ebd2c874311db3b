"""Internal: the run routes on a plain aiohttp server, without ComfyUI: for the transport's tests and its
benchmark rows, and for trying a client against a server.

    python -m discomfort.remote.standalone [--host 127.0.0.1] [--port 0]

Prints the port it listens on, then serves until its standard input closes. The routes and their
rules are the node pack's (:mod:`.server`); outside ComfyUI no client may create runs without the
server secret (``DISCOMFORT_SERVER_SECRET``), and every route checks Host and Origin
(:mod:`.origin`). ``start()`` runs one in a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from typing import IO, Iterator, Mapping

from .. import _settings
from .framing import SECRET_ENV


@contextlib.contextmanager
def start(secret: str, env: Mapping[str, str] | None = None, stderr: IO | None = None,
          timeout: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    """A run server in a process of its own on a free loopback port, for the block: (its URL,
    the process). Leaving the block closes its standard input and waits for it to end."""
    env = _settings.child_env(env, **{SECRET_ENV: secret})
    proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(proc.stdout.readline() or 0)
        if not port:
            raise RuntimeError(f"the run server (python -m {__name__}) did not start: see its stderr")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def serve(host: str, port: int) -> None:
    from aiohttp import web

    from .origin import guard_routes
    from .server import add_routes, run_server

    routes = web.RouteTableDef()
    add_routes(guard_routes(routes))
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
