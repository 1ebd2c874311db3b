"""An attacker on the editor panel's routes, run as a process of its own against a launched server.

    python _attacker_panel.py MODE URL [ARG...]   ->  JSON lines on stdout; the last: what it got

It holds no token: only what anyone who reaches the server can read or make up. Modes:

- ``rebind URL``: what a DNS-rebinding page sends: a foreign ``Host`` (and ``Origin``) on every
  kind of ``/discomfort`` route, ``Origin: null``, a foreign ``Origin`` with a good ``Host``; and a
  plain request as the control.
- ``snoop URL``: while a victim's panel run is going, reads client ids (``extra_data``) and run ids
  from ComfyUI's ``/queue`` and ``/history``, then tries to list, read, follow and cancel the run
  with them, and listens on ``/ws?clientId=`` of every client id it found. Prints ``{"ready"}``,
  waits for a line on stdin (the victim's run has ended), then queues a prompt of its own under
  each client id and reads each socket up to that prompt's end: every message sent to those
  clients before is then in hand.
- ``slots URL WORKFLOW``: starts runs of a held workflow under made-up client ids until refused,
  then cancels its own and follows each to its end.
"""

from __future__ import annotations

import json
import sys
import uuid

import requests

T = 30  # seconds per request
TOKEN = "X-Discomfort-Panel-Token"


def rebind(url: str) -> dict:
    port = url.rsplit(":", 1)[1]
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    out: dict = {}
    for name, method, route, body in [
        ("runs_create", "POST", "/discomfort/runs", {}),
        ("runs_get", "GET", "/discomfort/runs/" + "ab" * 16, None),
        ("panel_start", "POST", "/discomfort/panel/runs", {"workflows": ["invert"], "inputs": {}}),
        ("panel_workflows", "GET", "/discomfort/panel/workflows", None),
        ("panel_workflows_api", "GET", "/api/discomfort/panel/workflows", None),
        ("panel_ports", "GET", "/discomfort/panel/ports?workflow=invert", None),
        ("host_info", "GET", "/discomfort/host_info?nonce=" + "00" * 16, None),
    ]:
        r = requests.request(method, url + route, json=body, headers=evil, timeout=T)
        out[name] = [r.status_code, r.json().get("type") if r.headers.get("Content-Type", "").startswith(
            "application/json") else None, "token" in r.text, "workflows" in r.text and r.status_code == 200]
    r = requests.post(url + "/discomfort/runs", json={}, headers={"Host": f"evil.example:{port}"}, timeout=T)
    out["host_only"] = r.status_code
    r = requests.get(url + "/discomfort/panel/workflows", headers={"Origin": "null"}, timeout=T)
    out["origin_null"] = r.status_code
    r = requests.post(url + "/discomfort/panel/runs", json={}, headers={"Origin": f"http://evil.example:{port}"},
                      timeout=T)
    out["origin_foreign"] = r.status_code
    r = requests.get(url + "/discomfort/panel/workflows", headers={"Origin": f"http://127.0.0.1:{int(port) + 1}"},
                     timeout=T)
    out["origin_other_port"] = r.status_code
    out["control"] = requests.get(url + "/discomfort/panel/workflows", timeout=T).status_code
    return out


def _harvest(url: str) -> tuple[set[str], set[str], set[str]]:
    """Client ids, run ids, and the client ids of editors (prompts with no Discomfort run: the
    panel's page used to get its events under its editor's id), as anyone reads them from
    ComfyUI's queue and history."""
    clients: set[str] = set()
    editors: set[str] = set()
    runs: set[str] = set()
    queue = requests.get(f"{url}/queue", timeout=T).json()
    items = queue.get("queue_running", []) + queue.get("queue_pending", [])
    history = list(requests.get(f"{url}/history", timeout=T).json().values())
    for prompt, extra in [(i[2], i[3]) for i in items] + [(h["prompt"][2], h["prompt"][3]) for h in history]:
        cid = extra.get("client_id") if isinstance(extra, dict) else None
        found = {node.get("inputs", {}).get("run_id") for node in prompt.values()} - {None, ""}
        runs |= {r for r in found if isinstance(r, str)}
        if isinstance(cid, str):
            clients.add(cid)
            if not found:
                editors.add(cid)
    return clients, runs, editors


def snoop(url: str) -> dict:
    import websocket

    clients, runs, editors = _harvest(url)
    out: dict = {"clients": sorted(clients), "run_ids": sorted(runs), "editors": sorted(editors), "routes": []}
    # (Not on the panel's own executor's id: a second socket under an id takes over the first one,
    # and ComfyUI drops the id when the first closes.)
    sockets = {cid: websocket.create_connection(url.replace("http://", "ws://") + f"/ws?clientId={cid}", timeout=T)
               for cid in sorted(editors)[:20]}
    forged = {TOKEN: "A" * 43}
    for cid in sorted(clients):
        r = requests.get(f"{url}/discomfort/panel/runs", params={"client_id": cid}, timeout=T)
        out["routes"].append(("list", r.status_code, r.json().get("runs")))
    r = requests.get(f"{url}/discomfort/panel/runs", headers=forged, timeout=T)
    out["routes"].append(("list:forged", r.status_code, r.json().get("runs")))
    for rid in sorted(runs):
        base = f"{url}/discomfort/panel/runs/{rid}"
        for tag, head in (("none", {}), ("forged", forged)):
            out["routes"].append((f"get:{tag}", requests.get(base, params={"client_id": next(iter(clients), "")},
                                                             headers=head, timeout=T).status_code, None))
            out["routes"].append((f"events:{tag}", requests.get(f"{base}/events", params={"after": 0, "wait": 0},
                                                                headers=head, timeout=T).status_code, None))
            for cid in sorted(clients) or [""]:
                out["routes"].append((f"cancel:{tag}", requests.post(f"{base}/cancel", json={"client_id": cid},
                                                                     headers=head, timeout=T).status_code, None))
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the victim's run has ended
    seen: list[str] = []
    for cid, ws in sockets.items():
        prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                  "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        r = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": cid}, timeout=T)
        pid = r.json()["prompt_id"]
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                continue
            event = json.loads(msg)
            seen.append(event.get("type"))
            data = event.get("data") or {}
            if event.get("type") in ("execution_success", "execution_error") and data.get("prompt_id") == pid:
                break
        ws.close()
    out["ws_types"] = sorted(set(seen))
    out["ws_discomfort"] = [t for t in seen if t and t.startswith("discomfort")]
    return out


def slots(url: str, workflow: str) -> dict:
    out: dict = {"statuses": []}
    mine = []
    for i in range(4):
        body = {"client_id": f"spoof-{i}-{uuid.uuid4().hex[:6]}", "workflows": [workflow], "iterations": 1,
                "inputs": {"image": {"file": "start.png"}}}
        r = requests.post(f"{url}/discomfort/panel/runs", json=body, timeout=T)
        out["statuses"].append(r.status_code)
        if r.status_code == 202:
            mine.append(r.json())
        else:
            out["refusal"] = r.json()
    for run in mine:
        head = {TOKEN: run["token"]}
        base = f"{url}/discomfort/panel/runs/{run['run_id']}"
        requests.post(f"{base}/cancel", headers=head, timeout=T)
        after, state = 0, "running"
        while state == "running":  # long poll to the end
            body = requests.get(f"{base}/events", params={"after": after}, headers=head, timeout=T).json()
            after = body["next"]
            if any(e["kind"] == "finished" for e in body["events"]):
                state = [e for e in body["events"] if e["kind"] == "finished"][-1]["state"]
        out.setdefault("ended", []).append(state)
    return out


if __name__ == "__main__":
    mode, url, *rest = sys.argv[1:]
    result = {"rebind": rebind, "snoop": snoop, "slots": slots}[mode](url, *rest)
    print(json.dumps(result), flush=True)
