"""An attacker of the second round, run as a process of its own against a launched server.

    python _attacker_round2.py MODE URL [ARG...]  ->  one JSON line on stdout: what it got

It holds no token: only what anyone who reaches the server can do. Modes:

- ``eps URL WORKFLOW PORT``: uploads PostScript named ``r2_evil.png`` through ComfyUI's
  ``/upload/image`` (which takes any bytes), then starts a panel run of WORKFLOW with that file
  bound to PORT: the panel's image decoder must not hand it to Ghostscript.
"""

from __future__ import annotations

import json
import sys

import requests

T = 30  # seconds per request
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(pwned) print showpage\n"


def eps(url: str, workflow: str, port: str) -> dict:
    up = requests.post(f"{url}/upload/image", files={"image": ("r2_evil.png", EPS, "image/png")},
                       data={"overwrite": "true"}, timeout=T)
    body = {"workflows": [workflow], "inputs": {port: {"file": up.json()["name"]}}}
    start = requests.post(f"{url}/discomfort/panel/runs", json=body, timeout=T)
    return {"upload": up.status_code, "status": start.status_code, "answer": start.json()}


if __name__ == "__main__":
    mode, url, *args = sys.argv[1:]
    print(json.dumps({"eps": eps}[mode](url, *args)))
