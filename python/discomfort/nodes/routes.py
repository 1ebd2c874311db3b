"""The node pack's HTTP routes, added to ComfyUI's PromptServer when ComfyUI runs as a server.

* ``GET /discomfort/host_info?nonce=HEX``: keyed digests of where this server runs, so that an
  orchestrator can tell whether it shares memory with it (same host, user and /dev/shm) without
  the server revealing its uid, pid or boot id.
* ``/discomfort/runs...``: runs owned by this server process, for orchestrators that cannot share
  memory with it (see :mod:`discomfort.remote.server`).
* ``/discomfort/panel/...``: the editor panel's runner (:mod:`discomfort.panel.runner`), added by
  the node pack folder through ``also``: the panel sits above both sides and the node side never
  imports it.
* ``GET /discomfort/node_fingerprints``: the node classes ComfyUI asks for a fingerprint
  (``IS_CHANGED``): an orchestrator never skips a prompt holding one (:mod:`discomfort.reuse`;
  both sides take the route and the rule from :mod:`discomfort.prompt_forms`).
  Public facts, as ``/object_info``.

Every one of them first checks the request's ``Host`` and ``Origin`` (:mod:`discomfort.remote.origin`):
a page of another site that rebinds its name to this machine gets a 403.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..prompt_forms import FINGERPRINTS_ROUTE, fingerprinted_classes
from ..remote.origin import guard_routes
from ..remote.server import add_routes
from ..sysinfo import host_info

__all__ = ["register"]

_registered = False


def register(routes: Any = None, also: Iterable[Callable[[Any], None]] = ()) -> bool:
    """Add the routes to ``routes`` (default: ComfyUI's ``PromptServer.instance.routes``, when
    there is one), and those each of ``also`` adds (behind the same Host and Origin checks); False
    when there is no server to add them to, or they are already there."""
    global _registered
    if _registered:
        return False
    if routes is None:
        try:
            import server  # type: ignore[import-not-found]  # ComfyUI's
        except ImportError:
            return False
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        routes = getattr(instance, "routes", None)
    if routes is None or not hasattr(routes, "get"):
        return False

    from aiohttp import web

    routes = guard_routes(routes)

    @routes.get("/discomfort/host_info")
    async def discomfort_host_info(request: Any) -> Any:
        try:
            return web.json_response(host_info(request.query.get("nonce", "")))
        except ValueError as exc:
            return web.json_response({"error": f"GET /discomfort/host_info?nonce=<hex>: {exc}",
                                      "type": "ValueError"}, status=400)

    @routes.get(FINGERPRINTS_ROUTE)
    async def discomfort_node_fingerprints(request: Any) -> Any:
        import nodes  # type: ignore[import-not-found]  # ComfyUI's: the classes loaded now

        return web.json_response({"is_changed": fingerprinted_classes(nodes.NODE_CLASS_MAPPINGS)})

    add_routes(routes)
    for add in also:
        add(routes)
    _registered = True
    return True
