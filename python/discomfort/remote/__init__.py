"""Values over HTTP, for ComfyUI servers that cannot share memory with the orchestrator.

When ComfyUI runs in a container with its own /dev/shm, on another machine, or as another user,
its nodes cannot attach to a run in this process's shared memory. The run then lives in the
server process instead (a :class:`~discomfort.remote.server.ServedContext` it creates and owns),
and values travel as binary HTTP bodies through the node pack's routes.

One module per concern: :mod:`.framing` (the frame and the headers), :mod:`discomfort.datacodec`
(the data-only encoding: no pickle crosses HTTP in either direction), :mod:`.client`
(:class:`RemoteContext`), :mod:`.server` (the routes and who may call them), :mod:`.limits`
(what a server grants its clients, PUTs counted while they arrive), :mod:`.standalone` (those
routes on a plain aiohttp server, without ComfyUI).
"""

from typing import Any

from .client import RemoteContext, TransportWarning, encode_for_http
from .framing import FrameBody, frame_header, parse_header


def __getattr__(name: str) -> Any:
    # The server side needs aiohttp (ComfyUI has it); a client never imports it.
    if name in ("RunServer", "ServedContext", "ServerLimits", "add_routes", "run_server"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'discomfort.remote' has no attribute {name!r}")

__all__ = ["RemoteContext", "TransportWarning", "encode_for_http", "FrameBody", "frame_header", "parse_header",
           "RunServer", "ServedContext", "ServerLimits", "add_routes", "run_server"]
