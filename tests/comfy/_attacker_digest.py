"""An attacker that re-queues a live run's prompt with one link turned into a literal.

    python _attacker_digest.py URL RUN_ID  ->  JSON lines on stdout

It knows only what ComfyUI's own API shows anyone: it finds the prompt naming RUN_ID in
/history (or /queue), and queues the variant the old digest could not tell apart: each link
into a CONDITIONING input becomes ``{"__value__": [node, "slot"]}``, which ComfyUI unwraps and
keeps as the literal list ``[node, "slot"]``. It prints the variant's errors, waits for a line
on stdin, then queues the very prompt again (a replay) and prints that one's errors.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import uuid

import requests

T = 10  # seconds per request


def find_prompt(url: str, run_id: str) -> dict:
    queue = requests.get(f"{url}/queue", timeout=T).json()
    found = [item[2] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])]
    found += [h["prompt"][2] for h in requests.get(f"{url}/history", timeout=T).json().values()]
    for prompt in found:
        if any(node.get("inputs", {}).get("run_id") == run_id for node in prompt.values()):
            return prompt
    raise SystemExit(f"no prompt names run {run_id}")


def queue_and_wait(url: str, prompt: dict) -> list:
    r = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=T)
    if r.status_code != 200:
        return [f"HTTP {r.status_code}: {r.text[:300]}"]
    pid = r.json()["prompt_id"]
    h: dict = {}
    for _ in range(1200):
        h = requests.get(f"{url}/history/{pid}", timeout=T).json().get(pid) or {}
        if h.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.05)  # polling ComfyUI's history, as any client of its API does
    msgs = h.get("status", {}).get("messages", [])
    return [m[1].get("exception_type") for m in msgs if m[0] == "execution_error"] or \
        ([] if h.get("status", {}).get("completed") else ["not completed"])


def main(url: str, run_id: str) -> None:
    prompt = find_prompt(url, run_id)
    variant = copy.deepcopy(prompt)
    wrapped = []
    for nid, node in variant.items():
        for name, value in node.get("inputs", {}).items():
            if name.startswith("conditioning") and isinstance(value, list) and len(value) == 2:
                node["inputs"][name] = {"__value__": [value[0], str(value[1])]}
                wrapped.append(f"{nid}.{name}")
    print(json.dumps({"wrapped": wrapped, "variant_errors": queue_and_wait(url, variant)}), flush=True)
    sys.stdin.readline()
    print(json.dumps({"replay_errors": queue_and_wait(url, prompt)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
