"""A ComfyUI server over HTTP: queue a prompt, wait for it on the websocket, surface errors."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import ComfyConnectionError, RunCancelled
from ..run_control import CancelToken
from ._common import raise_for_messages, validation_error

__all__ = ["ComfyServer"]

_CANCELLED = object()  # what _wait returns when the cancel token fired


def _require(name: str):
    try:
        return __import__(name)
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            f"discomfort.comfy.ComfyServer needs the {name!r} package (pip install requests websocket-client)"
        ) from exc


class ComfyServer:
    """A running ComfyUI server, e.g. ``ComfyServer("http://127.0.0.1:8188")``.

    ``execute(prompt)`` posts to ``/prompt``, follows the run on the ``/ws`` websocket until the
    server reports it finished, and returns ComfyUI's outputs of the prompt ``{node_id: ui}``
    (from ``GET /history/{prompt_id}``). ``output_dir``: the server's output folder where it is
    known (a server :func:`~discomfort.comfy.launch_server` started), else None (a remote one):
    an output's file is ``output_dir / subfolder / filename``.
    """

    def __init__(self, url: str, *, request_timeout: float = 30.0, log_tail=None) -> None:
        self.url = url.rstrip("/")
        self.request_timeout = request_timeout
        self.client_id = uuid.uuid4().hex
        self._log_tail = log_tail  # callable giving the server log's tail, for error messages
        self._requests = _require("requests")
        self._session = self._requests.Session()
        self.last_messages: list = []  # ComfyUI's status messages of the last execute()
        # Set by launch_server() for a server it started.
        self.process: Any = None
        self.log_path: Any = None
        self.work_dir: Any = None
        self.output_dir: Path | None = None
        self.accelerator: str | None = None  # what launch_server's probe found ("cuda", ...; None: CPU)
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:
        return f"ComfyServer({self.url!r})"

    # -- plain HTTP ---------------------------------------------------------------------------

    def _context(self) -> str:
        if self._log_tail is None:
            return ""
        tail = self._log_tail()
        return f"\n--- server log (tail) ---\n{tail}" if tail else ""

    def _request(self, method: str, route: str, **kw):
        kw.setdefault("timeout", self.request_timeout)
        try:
            return self._session.request(method, self.url + route, **kw)
        except self._requests.RequestException as exc:
            raise ComfyConnectionError(f"{method} {self.url}{route} failed: {exc}{self._context()}") from exc

    def get_json(self, route: str, **kw) -> Any:
        """GET ``route`` (e.g. ``/system_stats``) and decode the JSON answer."""
        if not route.startswith("/"):
            route = "/" + route
        resp = self._request("GET", route, **kw)
        if resp.status_code != 200:
            raise ComfyConnectionError(f"GET {route} answered HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json(f"/object_info/{node_class}" if node_class else "/object_info")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """Ask the server to drop its caches (POST /free); it acts between prompts."""
        resp = self._request("POST", "/free", json={"unload_models": unload_models, "free_memory": free_memory})
        if resp.status_code != 200:
            raise ComfyConnectionError(f"POST /free answered HTTP {resp.status_code}: {resp.text[:500]}")

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def host_info(self, nonce: str | None = None) -> dict:
        """The node pack's ``/discomfort/host_info`` answer for ``nonce`` (default: a fresh one):
        digests to compare with :func:`discomfort.comfy.host_info` of the same nonce."""
        from ..sysinfo import new_nonce

        return self.get_json("/discomfort/host_info", params={"nonce": nonce or new_nonce()})

    # -- running prompts ----------------------------------------------------------------------

    def _ws_url(self, client_id: str) -> str:
        base = self.url
        if base.startswith("https://"):
            base = "wss://" + base[len("https://"):]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://"):]
        return f"{base}/ws?clientId={client_id}"

    def execute(self, prompt: dict, timeout: float | None = 600.0, *, extra_data: dict | None = None,
                cancel: CancelToken | None = None, on_event: Callable[[str, dict], Any] | None = None) -> dict:
        """Run an API-format prompt; returns ComfyUI's outputs of it, ``{node_id: ui}`` (e.g.
        ``{"9": {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}}``),
        from ``GET /history/{prompt_id}``.

        Raises :class:`~discomfort.errors.PromptValidationError` when the server rejects the
        prompt (HTTP 400 with node errors), :class:`~discomfort.errors.NodeExecutionError` when a
        node fails, ``TimeoutError`` after ``timeout`` seconds, and
        :class:`~discomfort.errors.ComfyConnectionError` when the server cannot be reached.

        ``cancel``: a :class:`~discomfort.run_control.CancelToken`; when it fires (or on Ctrl-C),
        the prompt is removed from the server's queue or interrupted, this waits until the server
        let go of it, then raises :class:`~discomfort.errors.RunCancelled` (or re-raises the
        KeyboardInterrupt). ``on_event(kind, data)`` hears this prompt's websocket messages
        ("executing", "progress", "execution_cached", ...).
        """
        websocket = _require("websocket")
        deadline = None if timeout is None else time.monotonic() + timeout
        # One websocket client id per call: calls from several threads do not steal each
        # other's socket (the server keeps one socket per client id).
        client_id = f"{self.client_id}-{uuid.uuid4().hex[:12]}"
        ws_url = self._ws_url(client_id)
        try:
            ws = websocket.create_connection(ws_url, timeout=self.request_timeout)
        except (OSError, websocket.WebSocketException) as exc:
            raise ComfyConnectionError(f"cannot open {ws_url}: {exc}{self._context()}") from exc
        # The id is ours, sent with the prompt: a Ctrl-C that lands while the answer to POST /prompt
        # is on its way (the prompt may already run) still knows which prompt to withdraw.
        prompt_id = str(uuid.uuid4())
        try:
            if cancel is not None and cancel.cancelled:
                raise RunCancelled("the run was cancelled before the prompt was sent")
            body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
            if extra_data:
                body["extra_data"] = dict(extra_data)
            try:
                resp = self._request("POST", "/prompt", json=body)
            except KeyboardInterrupt:
                self._withdraw(ws, websocket, prompt_id)
                raise
            if resp.status_code == 400:
                try:
                    data = resp.json()
                except ValueError:
                    data = {"error": {"message": resp.text[:500]}, "node_errors": {}}
                raise validation_error(data.get("error"), data.get("node_errors"))
            if resp.status_code != 200:
                raise ComfyConnectionError(f"POST /prompt answered HTTP {resp.status_code}: {resp.text[:500]}")
            answer = resp.json()
            prompt_id = str(answer.get("prompt_id") or prompt_id)
            if answer.get("node_errors"):
                raise validation_error(None, answer["node_errors"])
            try:
                error_message = self._wait(ws, websocket, prompt_id, deadline, timeout, cancel, on_event)
            except KeyboardInterrupt:
                self._withdraw(ws, websocket, prompt_id)
                raise
            if error_message is _CANCELLED:
                self._withdraw(ws, websocket, prompt_id)
                raise RunCancelled(f"prompt {prompt_id} was cancelled; the server was told to drop it")
        finally:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        entry = self.history(prompt_id)
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        self.last_messages = [tuple(m) for m in messages]
        raise_for_messages(messages, prompt_id)
        if error_message is not None:
            raise_for_messages([("execution_error", error_message)], prompt_id)
        if status.get("status_str") not in (None, "success") or not entry:
            raise ComfyConnectionError(f"prompt {prompt_id} ended with status {status!r}{self._context()}")
        return entry.get("outputs", {})

    def _wait(self, ws, websocket, prompt_id: str, deadline: float | None, timeout,
              cancel: CancelToken | None = None, on_event: Callable[[str, dict], Any] | None = None) -> Any:
        """Read websocket messages until the server reports the prompt done; the error, if any
        (``_CANCELLED`` when ``cancel`` fired first)."""
        error = None
        # With a token, wake up often enough to notice it; its callback cannot reach this thread.
        tick = 60.0 if cancel is None else 0.2
        while True:
            if cancel is not None and cancel.cancelled:
                return _CANCELLED
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._interrupt(prompt_id)
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
                ws.settimeout(min(remaining, tick))
            else:
                ws.settimeout(tick)
            try:
                msg = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue  # the deadline and the token are checked above
            except (OSError, websocket.WebSocketException) as exc:
                raise ComfyConnectionError(f"lost the websocket while waiting for prompt {prompt_id}: "
                                           f"{exc}{self._context()}") from exc
            if not isinstance(msg, str):
                continue  # binary previews
            try:
                event = json.loads(msg)
            except ValueError:
                continue
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if on_event is not None:
                on_event(kind, data)
            if kind == "execution_error":
                error = data
            elif kind == "executing" and data.get("node") is None:
                # Sent by the prompt worker after the history is written, success or not.
                return error

    def _interrupt(self, prompt_id: str) -> None:
        try:
            self._request("POST", "/queue", json={"delete": [prompt_id]})  # if still queued
            self._request("POST", "/interrupt", json={"prompt_id": prompt_id})  # if running
        except ComfyConnectionError:
            pass

    def queue(self) -> dict:
        """``GET /queue``: ``{"queue_running": [...], "queue_pending": [...]}``."""
        return self.get_json("/queue")

    def in_queue(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is running or waiting on the server."""
        q = self.queue()
        return any(item[1] == prompt_id for part in ("queue_running", "queue_pending") for item in q.get(part, []))

    def _withdraw(self, ws, websocket, prompt_id: str, grace: float = 30.0) -> None:
        """Remove ``prompt_id`` from the queue or interrupt it, and wait (up to ``grace`` seconds)
        until the server no longer lists it, so the run's store can go away under no node.

        The queue is the judge: ComfyUI says "executing: None" a moment before it takes the prompt
        off its running list. The websocket only paces the checks (a message, or 0.1 s)."""
        self._interrupt(prompt_id)
        deadline = time.monotonic() + grace
        listen = True  # a recv cut by Ctrl-C can leave the socket unusable: then just pace by time
        try:
            while time.monotonic() < deadline and self.in_queue(prompt_id):
                if not listen:
                    time.sleep(0.1)
                    continue
                ws.settimeout(0.1)
                try:
                    ws.recv()
                except websocket.WebSocketTimeoutException:
                    pass
                except (OSError, websocket.WebSocketException):
                    listen = False
        except ComfyConnectionError:
            return  # the server went away: nothing left to wait for

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
