"""HTTP routes of the node pack (only when ComfyUI runs as a server).

* ``GET /discomfort/host_info?nonce=HEX``: keyed digests of where this server runs, so that an
  orchestrator can tell whether it shares memory with it (same host, user and /dev/shm) without
  the server revealing its uid, pid or boot id.
* ``/discomfort/runs...``: runs owned by this server process, for orchestrators that cannot share
  memory with it; values travel as binary bodies (see ``discomfort.remote``).
"""

_registered = False


def register():
    """Add the routes to ComfyUI's PromptServer, when there is one."""
    global _registered
    if _registered:
        return False
    try:
        import server
    except ImportError:
        return False
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None or not hasattr(routes, "get"):
        return False

    from aiohttp import web

    from discomfort.comfy.nodes_support import host_info
    from discomfort.remote import add_routes

    @routes.get("/discomfort/host_info")
    async def discomfort_host_info(request):
        try:
            return web.json_response(host_info(request.query.get("nonce", "")))
        except ValueError as exc:
            return web.json_response({"error": f"GET /discomfort/host_info?nonce=<hex>: {exc}",
                                      "type": "ValueError"}, status=400)

    add_routes(routes)
    _registered = True
    return True
