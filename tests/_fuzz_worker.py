"""Runs in a subprocess: mutate copies of a store's segments and use them; never crash.

`python _fuzz_worker.py BACKEND SOURCE_RUN SEED CASES` prints "ok N" when every case ended in
success or a DiscomfortError. A crash (SIGSEGV, SIGBUS) shows as the process dying by a signal.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

from discomfort import _backend, errors
from discomfort._pystore.format import OBJ_OFF, PIN_OFF, TOTAL

SHM = "/dev/shm"


def clone(source: str, target: str, rng: random.Random) -> None:
    """Copy a run's control segment and chunks under a new name, then damage the copy."""
    ctl = bytearray(open(os.path.join(SHM, f"dcf-{source}"), "rb").read())
    ctl[112:176] = target.encode().ljust(64, b"\0")
    n = int.from_bytes(ctl[176:180], "little")
    if n:  # the copy gets its own disk directory, so nothing it does can touch the source's
        src_dir = ctl[256 : 256 + n].decode()
        new_dir = os.path.join(os.path.dirname(src_dir), f"dcf-{target}")
        shutil.copytree(src_dir, new_dir)
        raw = new_dir.encode()
        ctl[176:180] = len(raw).to_bytes(4, "little")
        ctl[256:1280] = raw.ljust(1024, b"\0")
    chunks = sorted(n for n in os.listdir(SHM) if n.startswith(f"dcf-{source}.c"))
    for _ in range(rng.randint(1, 8)):
        region = rng.choice(["header", "header", "chunks", "table", "table", "pins", "extent"])
        if region == "header":
            pos = rng.randrange(0, 1280)
        elif region == "chunks":
            pos = rng.randrange(4096, 4096 + 64 * 32)
        elif region == "table":  # mostly the entries that hold the source's objects
            pos = OBJ_OFF + hash_home(rng) * 320 + rng.randrange(0, 320)
        elif region == "pins":
            pos = PIN_OFF + rng.randrange(0, 32 * 8)
        else:
            pos = -1
        if pos >= 0:
            ctl[pos] = rng.randrange(256) if rng.random() < 0.8 else rng.choice([0, 255, 1, 2, 3])
    if rng.random() < 0.3:
        ctl[28] = 1  # dirty: the next locker must repair
    if rng.random() < 0.05:
        ctl = ctl[: rng.randrange(0, TOTAL)]
    with open(os.path.join(SHM, f"dcf-{target}"), "xb") as fh:
        fh.write(ctl)
    for name in chunks:
        data = bytearray(open(os.path.join(SHM, name), "rb").read())
        if rng.random() < 0.5:  # damage extent directories, which sit at object starts
            for _ in range(rng.randint(1, 4)):
                pos = rng.choice([0, 4096, 8192, 1 << 20]) + rng.randrange(0, 64)
                if pos < len(data):
                    data[pos] = rng.randrange(256)
        if rng.random() < 0.1:
            data = data[: rng.randrange(0, len(data) + 1)]
        suffix = name.split(".c", 1)[1]
        with open(os.path.join(SHM, f"dcf-{target}.c{suffix}"), "xb") as fh:
            fh.write(data)


_HOMES: list[int] = []


def hash_home(rng: random.Random) -> int:
    return rng.choice(_HOMES) if _HOMES and rng.random() < 0.8 else rng.randrange(4096)


def exercise(mod, run_id: str) -> None:
    store = mod.Store.attach(run_id)
    try:
        for key in store.keys():
            store.info(key)
            meta, views, _ = store.get(key)
            for v in views:
                if v.nbytes:
                    v[0], v[-1]  # touch both ends
        store.put("fuzz-new", b"m", [b"x" * 70000])
        store.get("fuzz-new")
        store.delete("fuzz-new")
        store.stats()
        store.reclaim()
    finally:
        store.close()


def main() -> None:
    backend, source, seed, cases = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from discomfort._pystore.layout import fnv1a64

    _HOMES.extend(fnv1a64(k.encode()) % 4096 for k in ("small", "large", "disk", "many"))
    mod = _backend.load(backend)
    rng = random.Random(seed)
    outcomes = {"ok": 0, "refused": 0}
    disk_dir = os.path.dirname(mod.Store.attach(source).disk_dir or "") or None
    for case in range(cases):
        target = f"fz{seed}x{case}"
        clone(source, target, rng)
        try:
            exercise(mod, target)
            outcomes["ok"] += 1
        except errors.DiscomfortError:
            outcomes["refused"] += 1
        finally:
            for name in os.listdir(SHM):
                if name == f"dcf-{target}" or name.startswith(f"dcf-{target}."):
                    os.unlink(os.path.join(SHM, name))
            if disk_dir:
                shutil.rmtree(os.path.join(disk_dir, f"dcf-{target}"), ignore_errors=True)
    print("ok", outcomes["ok"], "refused", outcomes["refused"], flush=True)


if __name__ == "__main__":
    main()
