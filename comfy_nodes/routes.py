"""HTTP routes of the node pack (only when ComfyUI runs as a server)."""

_registered = False


def register():
    """Add ``GET /discomfort/host_info`` to ComfyUI's PromptServer, when there is one."""
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

    @routes.get("/discomfort/host_info")
    async def discomfort_host_info(request):
        return web.json_response(host_info())

    _registered = True
    return True
