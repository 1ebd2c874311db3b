"""The editor panel's routes: loops of saved workflows, run by the ComfyUI server itself.

==================================================  ==============================================
``GET  /discomfort/panel/workflows``                the user's saved workflows (``workflows/``)
``GET  /discomfort/panel/ports?workflow=NAME``      a saved workflow's ports
``GET  /discomfort/panel/inputs``                   files of ComfyUI's input folder
``POST /discomfort/panel/runs``                     start a run (202 ``{"run_id", "token", ...}``)
``GET  /discomfort/panel/runs``                     the runs whose tokens the request presents
``GET  /discomfort/panel/runs/{run_id}``            one run: state, progress, outputs, history, error
``GET  /discomfort/panel/runs/{run_id}/events``     ``?after=N``: its progress events (long poll)
``POST /discomfort/panel/runs/{run_id}/cancel``     cancel it
==================================================  ==============================================

A run is a :class:`discomfort.Run` on a background thread of the server process, whose executor
is this same server (``ComfyServer(<its own URL>)``, values in shared memory): each workflow is
queued with ``/prompt`` like the editor's own, and shows in ComfyUI's queue. Starting a run
returns its token (header ``X-Discomfort-Panel-Token``, see :mod:`.runs`): reading,
cancelling and following it need that token. Progress events (``kind``: start, workflow_start,
node, step, workflow_done, iteration, finished) are read from the run's own event route, not
ComfyUI's websocket; results land in ``<output>/discomfort/<run_id>/`` (served by ComfyUI's
``/view``). After each iteration its written values are saved into ``<run_id>/<iteration>/`` and
announced with ComfyUI's own output files of that iteration (an ``iteration`` event, and the run's
``history``), until the run's cap of files and bytes (``DISCOMFORT_PANEL_HISTORY_FILES``,
``DISCOMFORT_PANEL_HISTORY_BYTES``) is spent.

Starting a run needs no token, like ComfyUI's ``/prompt``: it runs the user's own saved workflows
on their own server. Every name is checked (:func:`.io.safe_file`), values are data only (no
pickles), inputs are sized from their headers before any is decoded, requests have limits
(:class:`.io.PanelLimits`), and errors are JSON ``{"error", "type"}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
import time
from typing import Any

from .. import _settings, errors
from aiohttp import web

from ..remote.limits import client_address
from ..remote.web import HTTPRefusal, add_route_table, answers_errors, read_json_object
from .io import (INPUT_EXTENSIONS, OutputBudget, PanelLimits, check_subgraphs, input_bytes, list_files, load_input, read_json, safe_file,
                       save_outputs, typed_value)
from .cache import release_run_outputs
from .runs import TOKEN_HEADER, PanelRun, RunBook, new_token

__all__ = ["PanelServer", "panel_server", "add_panel_routes", "own_url"]

log = logging.getLogger("discomfort")

_RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")

#: A panel route's errors: JSON ``{"error", "type"}``, with the path's ``run_id`` where it has one.
_answered = answers_errors("a panel route")
_answered_run = answers_errors("a panel route", "run_id")


def own_url() -> str:
    """This ComfyUI server's URL, as a client on this host reaches it (``$DISCOMFORT_PANEL_URL``
    overrides it): the address it listens on (loopback when it listens everywhere) and its port."""
    env = _settings.get("DISCOMFORT_PANEL_URL")
    if env:
        return env.rstrip("/")
    from comfy.cli_args import args  # type: ignore[import-not-found]

    instance = _prompt_server()
    port = getattr(instance, "port", None) or args.port
    host = str(getattr(instance, "address", None) or args.listen or "127.0.0.1").split(",")[0].strip()
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if getattr(args, "tls_keyfile", None) and getattr(args, "tls_certfile", None) else "http"
    return f"{scheme}://{host}:{port}"


def _prompt_server() -> Any:
    try:
        import server  # type: ignore[import-not-found]  # ComfyUI's
    except ImportError:
        return None
    return getattr(getattr(server, "PromptServer", None), "instance", None)


class PanelServer:
    """The panel's runs in this server process, and the route handlers."""

    def __init__(self, limits: PanelLimits | None = None) -> None:
        self.limits = lim = limits or PanelLimits.from_env()
        self.book = RunBook(lim.max_runs, lim.max_runs_per_address, lim.kept_runs, lim.cancel_grace)
        self.runs = self.book.runs
        self._info: tuple[float, dict] | None = None

    # -- helpers ---------------------------------------------------------------------------------

    async def _body(self, request: Any) -> dict:
        return await read_json_object(request, self.limits.max_body, "a panel request's body")

    @staticmethod
    def _address(request: Any) -> str:
        """The client's address (the TCP peer's: a client id can be made up, an address cannot;
        an IPv6 client counts as its /64, see :func:`..remote.limits.client_address`)."""
        return client_address(request.remote)

    def _find(self, request: Any) -> PanelRun:
        run_id = request.match_info["run_id"]
        if not _RUN_ID.match(run_id):
            raise errors.UnknownRunError(f"no panel run {run_id!r}")
        return self.book.find(run_id, request.headers.get(TOKEN_HEADER))

    def _workflows_dir(self, request: Any) -> str:
        import folder_paths  # type: ignore[import-not-found]

        instance = _prompt_server()
        manager = getattr(instance, "user_manager", None)
        try:
            user = manager.get_request_user_id(request) if manager is not None else "default"
        except KeyError as exc:
            raise HTTPRefusal(403, str(exc.args[0]) if exc.args else "unknown user",
                              errors.AuthenticationError) from None
        root = folder_paths.get_public_user_directory(user)
        if root is None:
            raise HTTPRefusal(403, "unknown user", errors.AuthenticationError)
        return os.path.join(root, "workflows")

    def _workflow_path(self, request: Any, name: Any) -> tuple[str, str]:
        if isinstance(name, str) and name and not name.lower().endswith(".json"):
            name = name + ".json"
        return name, safe_file(self._workflows_dir(request), name, "workflow", self.limits, (".json",))

    def _object_info(self) -> dict:
        """This server's /object_info (kept 30 s): for converting UI workflows."""
        now = time.monotonic()
        if self._info is None or now - self._info[0] > 30:
            from ..comfy import ComfyServer

            with ComfyServer(own_url(), request_timeout=60) as srv:
                self._info = (now, srv.object_info())
        return self._info[1]

    def _read_workflow(self, path: str, name: str) -> tuple[dict, dict]:
        """A saved workflow as an API prompt and its ports by key."""
        from ..workflows.format import discover_ports, is_api_format, is_ui_format, load_workflow

        size = os.path.getsize(path)
        if size > self.limits.max_workflow_file:
            raise HTTPRefusal(413, f"workflow {name!r} is {size} bytes, over {self.limits.max_workflow_file}",
                              errors.RemoteLimitError)
        with open(path, encoding="utf-8") as f:
            data = read_json(f.read(), f"workflow {name!r}", self.limits)
        check_subgraphs(data, f"workflow {name!r}", self.limits)
        if not (is_ui_format(data) or is_api_format(data)):
            raise ValueError(f"workflow {name!r} is neither a UI nor an API workflow")
        info = self._object_info()
        try:
            prompt = load_workflow(data, info)
            ports = discover_ports(prompt, info)
        except errors.DiscomfortError as exc:
            raise type(exc)(f"workflow {name!r}: {exc}") from None
        return prompt, ports

    # -- handlers --------------------------------------------------------------------------------

    @_answered
    async def workflows(self, request: Any) -> Any:
        root = self._workflows_dir(request)
        files = await asyncio.to_thread(list_files, root, (".json",), self.limits)
        return web.json_response({"workflows": files})

    @_answered
    async def inputs(self, request: Any) -> Any:
        import folder_paths  # type: ignore[import-not-found]

        files = await asyncio.to_thread(list_files, folder_paths.get_input_directory(), INPUT_EXTENSIONS,
                                        self.limits)
        return web.json_response({"files": files})

    @_answered
    async def ports(self, request: Any) -> Any:
        name, path = self._workflow_path(request, request.query.get("workflow"))
        _, ports = await asyncio.to_thread(self._read_workflow, path, name)
        return web.json_response({"workflow": name, "ports": [
            {"unique_id": uid, "type": p.type, "mode": p.mode, "reads": p.reads and bool(p.consumers),
             "writes": p.writes} for uid, p in ports.items()]})

    @_answered
    async def start(self, request: Any) -> Any:
        address = self._address(request)
        body = await self._body(request)
        names = body.get("workflows")
        lim = self.limits
        if not isinstance(names, list) or not names:
            raise ValueError("workflows must be a non-empty list of saved workflow names")
        if len(names) > lim.max_workflows:
            raise HTTPRefusal(413, f"{len(names)} workflows: at most {lim.max_workflows} in one run "
                                   "(DISCOMFORT_PANEL_MAX_WORKFLOWS)", errors.RemoteLimitError)
        iterations = body.get("iterations", 1)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, not {iterations!r:.40}")
        if iterations > lim.max_iterations:
            raise HTTPRefusal(413, f"iterations={iterations}: at most {lim.max_iterations} "
                                   "(DISCOMFORT_PANEL_MAX_ITERATIONS)", errors.RemoteLimitError)
        until = body.get("until") or None
        if until is not None and not isinstance(until, str):
            raise ValueError("until must be a key (a string) or empty")
        bindings = body.get("inputs") or {}
        if not isinstance(bindings, dict) or len(bindings) > lim.max_inputs:
            raise ValueError(f"inputs must be an object of at most {lim.max_inputs} keys")
        paths = [self._workflow_path(request, n) for n in names]
        self.book.check_room(address)
        self.book.starting[address] += 1  # holds the slot while the run is prepared
        try:
            plan = await asyncio.to_thread(self._prepare, paths, bindings, until)
            run = await asyncio.to_thread(self._open_run)
            try:
                await asyncio.to_thread(self._load_inputs, run, plan)
            except BaseException:
                await asyncio.to_thread(run.close)
                raise
            entry = PanelRun(run.run_id, new_token(), address, [n for n, _ in paths], iterations, until,
                             loop=asyncio.get_running_loop())
            self.book.add(entry)
        finally:
            self.book.starting[address] -= 1
            if self.book.starting[address] <= 0:
                del self.book.starting[address]
        from ..run_control import CancelToken

        entry.cancel = CancelToken()
        entry.thread = threading.Thread(target=self._work, args=(entry, run, plan), daemon=True,
                                        name=f"discomfort-panel-{entry.run_id[:8]}")
        entry.publish({"kind": "start", "run_id": entry.run_id, "workflows": entry.workflows,
                       "iterations": iterations, "until": until})
        entry.thread.start()
        log.info("discomfort: panel run %s started from %s: %s x%d", entry.run_id, address,
                 ", ".join(entry.workflows), iterations)
        return web.json_response({**entry.summary(), "token": entry.token}, status=202)

    def _prepare(self, paths: list[tuple[str, str]], bindings: dict, until: str | None) -> dict:
        """Convert the workflows, check the keys and size the inputs from their headers (nothing
        is decoded yet: :meth:`_load_inputs` does, one at a time, into the run's store)."""
        import folder_paths  # type: ignore[import-not-found]

        prompts: list[dict] = []
        types: dict[str, Any] = {}
        titles: list[dict[str, str]] = []
        reads_first: list[str] = []
        written: list[str] = []
        for name, path in paths:
            prompt, ports = self._read_workflow(path, name)
            prompts.append(prompt)
            titles.append({nid: ((e.get("_meta") or {}).get("title") or e.get("class_type") or "")
                           for nid, e in prompt.items()})
            for uid, port in ports.items():
                if port.reads and port.consumers and uid not in written and uid not in reads_first:
                    reads_first.append(uid)
                types.setdefault(uid, port.type)
                if port.writes:
                    types[uid] = port.type
            written += [uid for uid, p in ports.items() if p.writes and uid not in written]
        if until is not None and until not in written:
            raise ValueError(f"until={until!r}: no output port of these workflows writes that key")
        unknown = sorted(set(bindings) - set(types))
        if unknown:
            raise ValueError(f"inputs name {', '.join(map(repr, unknown))}, which no port of these workflows has")
        missing = [uid for uid in reads_first if uid not in bindings]
        if missing:
            raise ValueError(f"bind {', '.join(map(repr, missing))}: read before any workflow writes "
                             f"{'it' if len(missing) == 1 else 'them'} (a file of the input folder or a value)")
        files: list[tuple[str, str, str]] = []
        values: dict[str, Any] = {}
        total = 0
        for uid, bind in bindings.items():
            if not isinstance(bind, dict) or len(bind) != 1 or not ({"file"} >= set(bind) or {"value"} >= set(bind)):
                raise ValueError(f"input {uid!r}: give {{\"file\": NAME}} (in the input folder) or {{\"value\": V}}")
            if "file" in bind:
                path = safe_file(folder_paths.get_input_directory(), bind["file"], f"input {uid!r}: file",
                                 self.limits, INPUT_EXTENSIONS)
                total += input_bytes(path, types.get(uid, "*"), self.limits)
                files.append((uid, path, types.get(uid, "*")))
            else:
                values[uid] = typed_value(bind["value"], types.get(uid, "*"), uid, self.limits)
            if total > self.limits.max_run_input_bytes:
                raise errors.RemoteLimitError(
                    f"the inputs of this run take {total} bytes decoded (up to input {uid!r}), over the limit "
                    f"of {self.limits.max_run_input_bytes} (DISCOMFORT_PANEL_MAX_RUN_INPUT_BYTES)")
        return {"prompts": prompts, "types": types, "titles": titles, "files": files, "values": values,
                "written": written, "until": until}

    def _load_inputs(self, run: Any, plan: dict) -> None:
        """Decode the input files one at a time, each saved into the run's store and dropped before
        the next (the run holds one decoded input at a time, besides its store)."""
        for uid, value in plan.pop("values").items():
            run.save(uid, value)
        for uid, path, port_type in plan["files"]:
            value = load_input(path, port_type, self.limits)
            run.save(uid, value)
            del value

    def _open_run(self) -> Any:
        from ..comfy import ComfyServer
        from ..context import WorkflowContext
        from ..sequential import Run

        executor = ComfyServer(own_url(), request_timeout=60)
        run = Run(executor, transport="shm", object_info=self._info[1] if self._info else None)
        assert isinstance(run.context, WorkflowContext)  # transport="shm"
        run.context.guard_nodes = True  # a chunk another process cut fails the run, not the server
        return run

    def _work(self, entry: PanelRun, run: Any, plan: dict) -> None:
        """The background thread of one run: execute, save the outputs one at a time, say how it ended."""
        import folder_paths  # type: ignore[import-not-found]

        def on_progress(ev: Any) -> None:
            data = {"kind": ev.kind, "run_id": entry.run_id, "iteration": ev.iteration,
                    "iterations": ev.iterations, "workflow": ev.workflow, "workflows": ev.workflows,
                    "name": entry.workflows[ev.workflow], "done": ev.done, "total": ev.total,
                    "node": ev.node, "value": ev.value, "max": ev.max, "seconds": ev.seconds}
            if ev.node is not None:
                data["node_title"] = plan["titles"][ev.workflow].get(str(ev.node), "")
            entry.progress = data
            entry.publish(data)

        def written(load: Any) -> Any:
            for uid in plan["written"]:
                try:
                    value = load(uid)
                except errors.ReferenceUnavailableError:
                    continue  # an object of this process's (a model): no file form
                except KeyError:
                    continue
                yield uid, value
                del value

        subfolder = f"discomfort/{entry.run_id}"
        out_dir = os.path.join(folder_paths.get_output_directory(), "discomfort", entry.run_id)
        budget = OutputBudget.history(self.limits)

        def on_iteration(iteration: int, values: Any) -> None:
            """Save this iteration's written values and list ComfyUI's files of it, within the budget;
            once the budget is spent, say so once and save no more (the run goes on)."""
            if entry.history_note is not None:
                return
            item: dict = {"iteration": iteration, "outputs": [], "files": []}
            full = budget.note(self.limits)
            try:
                if not budget.spent:
                    sub = f"{iteration + 1:05d}"
                    item["outputs"] = save_outputs(written(values.__getitem__), plan["types"],
                                                   os.path.join(out_dir, sub), f"{subfolder}/{sub}", self.limits, budget)
                    item["files"] = [{k: f[k] for k in ("node", "filename", "subfolder", "type", "workflow")}
                                     for f in getattr(values, "files", [])
                                     if f.get("type") in ("output", "temp") and budget.take(0)]
                if any(o.get("note") == full for o in item["outputs"]):
                    entry.history_note = f"iteration {iteration + 1} and later: {full}"
                elif budget.spent:
                    entry.history_note = f"iterations after {iteration + 1}: {full}"
            except OSError as exc:  # a full disk stops the history, not the run
                entry.history_note = f"iteration {iteration + 1} and later: not saved ({exc})"
            if entry.history_note is not None:
                item["note"] = entry.history_note
            if item["outputs"] or item["files"] or "note" in item:
                entry.history.append(item)
                entry.publish({"kind": "iteration", "run_id": entry.run_id, **item})

        try:
            with run:
                result = run.execute(plan["prompts"], None, entry.iterations, until=plan["until"], outputs=[],
                                     cancel=entry.cancel, progress=False, on_progress=on_progress, timeout=None,
                                     on_iteration=on_iteration)
                entry.outputs = save_outputs(written(run.load), plan["types"], out_dir, subfolder, self.limits)
                entry.progress = {**entry.progress, "iterations_run": result.iterations, "stopped": result.stopped}
            entry.state = "finished"
        except errors.RunCancelled as exc:
            entry.state, entry.error, entry.error_type = "cancelled", _where_cut(exc, entry), type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - reported to the page, logged here
            entry.state, entry.error, entry.error_type = "failed", str(exc), type(exc).__name__
            log.warning("discomfort: panel run %s failed: %s", entry.run_id, exc)
        finally:
            try:
                run.executor.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                release_run_outputs(entry.run_id)  # what ComfyUI's cache holds of its last prompt
            except Exception as exc:  # noqa: BLE001 - memory held until the next prompt, not an error
                log.warning("discomfort: panel run %s: its cached outputs stay until the next prompt (%s)",
                            entry.run_id, exc)
            entry.ended = time.time()
            entry.publish({"kind": "finished", **entry.summary()})

    @_answered
    async def list_runs(self, request: Any) -> Any:
        tokens = request.headers.get(TOKEN_HEADER, "").replace(" ", "").split(",")
        return web.json_response({"runs": [r.summary() for r in self.book.owned(tokens)]})

    @_answered_run
    async def get_run(self, request: Any) -> Any:
        return web.json_response(self._find(request).summary())

    @_answered_run
    async def events(self, request: Any) -> Any:
        """Long poll: the run's events numbered after ``after``, waiting up to ``wait`` seconds
        (default 25, at most 30) for one; ``dropped`` counts those no longer kept, ``done`` says
        the "finished" event is out (no more will come)."""
        entry = self._find(request)
        after, wait = request.query.get("after", "0"), request.query.get("wait", "25")
        if not after.isdigit() or len(after) > 12:
            raise ValueError(f"after must be an event number (0 or more), not {after[:20]!r}")
        try:
            seconds = min(30.0, max(0.0, float(wait)))
        except ValueError:
            raise ValueError(f"wait must be a number of seconds, not {wait[:20]!r}") from None
        got, last, dropped = await entry.wait_after(int(after), seconds)
        return web.json_response({"run_id": entry.run_id, "events": got, "next": last, "dropped": dropped,
                                  "state": entry.state, "done": entry.done})

    @_answered_run
    async def cancel(self, request: Any) -> Any:
        entry = self._find(request)
        if entry.state == "running":
            if entry.cancel_asked is None:
                entry.cancel_asked = time.monotonic()
            entry.cancel.cancel("cancelled from the editor panel")
        return web.json_response({"run_id": entry.run_id, "state": entry.state,
                                  "cancelling": entry.state == "running"})


def _where_cut(exc: Any, entry: PanelRun) -> str:
    """What the panel says of a cancelled run (its values are released once the thread ends)."""
    if getattr(exc, "iteration", None) is None or getattr(exc, "workflow", None) is None:
        return "cancelled before its first workflow; its values were released"
    name = entry.workflows[exc.workflow] if exc.workflow < len(entry.workflows) else f"workflow {exc.workflow}"
    return (f"cancelled {'inside' if exc.inside else 'before'} workflow {exc.workflow + 1}/{len(entry.workflows)} "
            f"({name}) of iteration {exc.iteration + 1}/{entry.iterations}; its values were released")


@functools.cache
def panel_server() -> PanelServer:
    """The process-wide :class:`PanelServer`."""
    return PanelServer()


def add_panel_routes(routes: Any) -> None:
    """Register the panel routes on an aiohttp ``RouteTableDef`` (ComfyUI's ``PromptServer.instance.routes``)."""
    srv = panel_server()
    add_route_table(routes, "/discomfort/panel", [
        ("GET", "/workflows", srv.workflows),
        ("GET", "/inputs", srv.inputs),
        ("GET", "/ports", srv.ports),
        ("POST", "/runs", srv.start),
        ("GET", "/runs", srv.list_runs),
        ("GET", "/runs/{run_id}", srv.get_run),
        ("GET", "/runs/{run_id}/events", srv.events),
        ("POST", "/runs/{run_id}/cancel", srv.cancel),
    ])
