"""Runs in a subprocess: feed datacodec (and the frame parser) damaged values; never crash.

    python _datacodec_fuzz_worker.py MODE CASES SEED [SEED ...] [--only N] [--mem MiB]

MODE is ``bytes`` (byte-level mutations of valid metas and buffers), ``struct`` (mutations of
the parsed description tree) or ``frames`` (whole frames through framing.parse_header, check and
decode). Each case draws from its own ``random.Random(f"{mode}:{seed}:{case}")``, so one case can
be rerun alone with ``--only``. Before each case the worker writes ``case MODE SEED N`` to stderr,
so a crash (the process dying by a signal) names the case that caused it.

Every case must end in a decoded value (made only of the allowed types, whose memory can be read
in full) or a SerializationError (ValueError from framing) with a message. The address space is
capped at what the warm process uses plus --mem MiB (default 64): an allocation past it shows up
as a MemoryError, reported as a failure. The last stdout line is a JSON summary; the exit code is 0
only when no case failed.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import math
import mmap
import random
import resource
import signal
import sys
import time

MODES = ("bytes", "struct", "frames")
CASE_TIMEOUT = 30  # seconds; a case running longer is a hang: SIGALRM ends the process


def main(argv: list[str]) -> int:
    args = list(argv)
    only = _option(args, "--only")
    mem = int(_option(args, "--mem") or 64)
    mode, cases, seeds = args[0], int(args[1]), [int(s) for s in args[2:]]
    if mode == "_crash":  # a self-test of the harness: die the way a segfault in the decoder would
        print(f"case {mode} {seeds[0]} 0", file=sys.stderr, flush=True)
        import ctypes

        ctypes.string_at(0)
    assert mode in MODES, mode
    faulthandler.enable()  # a crash prints the Python stack under the case line
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    try:
        import pyarrow as pa

        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
    except ImportError:
        pa = None
    from discomfort import datacodec
    from discomfort.errors import SerializationError
    from discomfort.remote import framing

    fz = Fuzzer(mode, datacodec, framing, SerializationError, np, torch, pa)
    fz.warm_up()
    headroom = mem << 20
    base = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (base + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:  # the cap must bite, or the memory property would hold vacuously (an mmap, not malloc:
        mmap.mmap(-1, headroom + (16 << 20)).close()  # a failed malloc leaves address space taken)
        limit_works = False
    except OSError:
        limit_works = True

    started = time.monotonic()
    picked = [int(only)] if only is not None else range(cases)
    for seed in seeds:
        for case in picked:
            print(f"case {mode} {seed} {case}", file=sys.stderr, flush=True)
            signal.alarm(CASE_TIMEOUT)  # default action: the process dies by SIGALRM
            fz.run_case(seed, case)
            signal.alarm(0)
    summary = {"mode": mode, "seeds": seeds, "cases": len(picked) * len(seeds), **fz.counts,
               "failures": len(fz.failures), "limit_works": limit_works, "mem_mib": mem,
               "seconds": round(time.monotonic() - started, 2)}
    for f in fz.failures[:25]:
        print("FAIL " + json.dumps(f))
    print(json.dumps(summary), flush=True)
    return 1 if fz.failures else 0


def _option(args: list[str], name: str) -> str | None:
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i : i + 2]
        return value
    return None


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class Fuzzer:
    """The corpus of valid values and the three ways of damaging them."""

    INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 255, 256, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                        2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]
    TOKENS = [b"[", b"]", b"{", b"}", b",", b":", b'"', b"-", b"0", b"9", b"1e999", b"-1", b"NaN", b"Infinity",
              b"null", b"true", b'"t"', b'"tensor"', b'"buf"', b"\\u0000", b"\\ud800", b"\xff", b"\xc3", b" ",
              b'"bool"', b'"shape"', b"[" * 50, b"9" * 30]

    def __init__(self, mode, datacodec, framing, SerializationError, np, torch, pa):
        self.mode = mode
        self.dc, self.framing, self.SE = datacodec, framing, SerializationError
        self.np, self.torch, self.pa = np, torch, pa
        self.counts = {"decoded": 0, "refused": 0, "refused_check": 0, "refused_frame": 0}
        self.failures: list[dict] = []
        self.corpus = [self.dc.encode(v) for v in self.values()]
        self.corpus = [(bytes(m), [bytes(b) for b in bufs]) for m, bufs in self.corpus]

    # ------------------------------------------------------------------------------ the corpus

    def values(self) -> list:
        np, torch, pa = self.np, self.torch, self.pa
        g = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)
        out: list = [None, True, 0, -5, 2**64 + 1, -(2**70), 1.5, math.nan, -math.inf, "", "héllo ☃",
                     b"bytes", bytearray(b"ba"), [], (), {}, [1, (2, "x"), {"k": None, "t": "tensor"}],
                     {"a": [[[[(1,)]]]]}]
        for name, size in self.dc.DTYPES.items():
            dtype = getattr(torch, name)
            raw = torch.randint(0, 256, (6 * size,), dtype=torch.uint8, generator=g)
            t = (raw % 2).view(torch.bool) if name == "bool" else raw.view(dtype)
            out.append(t.reshape(2, 3))
            if name != "bfloat16":
                a = rng.integers(0, 2 if name == "bool" else 256, 4 * size, dtype=np.uint8)
                out.append(a.view(name).reshape(4))
                out.append(a.view(name)[0])  # a numpy scalar
        out += [torch.zeros(()), torch.empty(0, 3), torch.ones(2, requires_grad=True), np.zeros((0, 2)),
                np.array(3.5), np.bool_(True),
                {"samples": torch.randn(1, 4, 2, 2, generator=g), "batch_index": [0]},
                [[torch.randn(1, 3, 4, generator=g), {"pooled_output": torch.randn(1, 4, generator=g)}]],
                torch.rand(1, 4, 4, 3, generator=g), [torch.ones(1), np.ones(2), b"x", bytearray(3)]]
        if pa is not None:
            out += [pa.array([1, 2, None]), pa.array(["a", "bb", None, "dddd"]),
                    pa.table({"s": ["x", "y"], "i": [1, 2]}), pa.record_batch({"f": [1.5, 2.5]}),
                    pa.chunked_array([pa.array([1]), pa.array([2, 3])]),
                    pa.array([[1, 2], [], None]), pa.array(["a", "b", "a"]).dictionary_encode(),
                    pa.array([{"x": 1, "y": "s"}]), pa.array([b"\0\1", b""], pa.large_binary()),
                    [pa.array([True, False]), torch.ones(2)]]
        return out

    def warm_up(self) -> None:
        """Decode everything once, both ways, so imports, pools and arenas exist before the cap."""
        for meta, bufs in self.corpus:
            self.dc.check(meta, [len(b) for b in bufs])
            self.touch(self.dc.decode(meta, bufs))
            self.touch(self.dc.decode(meta, [bytearray(b) for b in bufs]))
        for i in range(200):  # and a few cases (seed -1: failures here are reported like any other)
            self.run_case(-1, i)
        self.counts = dict.fromkeys(self.counts, 0)

    # ------------------------------------------------------------------------------ one case

    def run_case(self, seed: int, case: int) -> None:
        rng = random.Random(f"{self.mode}:{seed}:{case}")
        stage = "mutate"
        try:
            if self.mode == "frames":
                data = self.make_frame(rng)
                stage = "parse_header"
                try:
                    meta_len, sizes, head = self.framing.parse_header(data)
                except ValueError as exc:
                    if type(exc) is not ValueError or not str(exc).strip():
                        raise
                    self.counts["refused_frame"] += 1
                    return
                if len(data) != head + meta_len + sum(sizes):  # what server and client check first
                    self.counts["refused_frame"] += 1
                    return
                body = memoryview(bytearray(data)) if rng.random() < 0.5 else memoryview(data)
                meta = body[head : head + meta_len]
                bufs, pos = [], head + meta_len
                for n in sizes:
                    bufs.append(body[pos : pos + n])
                    pos += n
            elif self.mode == "bytes":
                meta, bufs = self.mutate_bytes(rng)
            else:
                meta, bufs = self.mutate_struct(rng)
            stage = "check"
            check_refused = None
            try:
                self.dc.check(meta, [memoryview(b).nbytes for b in bufs])
            except self.SE as exc:
                self.expect_message(exc)
                check_refused = exc
            stage = "decode"
            try:
                value = self.dc.decode(meta, bufs)
            except self.SE as exc:
                self.expect_message(exc)
                self.counts["refused_check" if check_refused else "refused"] += 1
                return
            if check_refused is not None:
                raise AssertionError(f"check refused ({check_refused}) but decode built a value")
            stage = "touch"
            self.touch(value)
            self.counts["decoded"] += 1
        except BaseException as exc:  # noqa: BLE001 - every other outcome is the failure we look for
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self.failures.append({"mode": self.mode, "seed": seed, "case": case, "stage": stage,
                                  "error": f"{type(exc).__name__}: {exc}"[:400]})

    def expect_message(self, exc: BaseException) -> None:
        msg = str(exc)
        if type(exc) is not self.SE:
            raise AssertionError(f"a subclass of SerializationError: {type(exc).__name__}: {msg}")
        if not msg.strip():
            raise AssertionError("a SerializationError without a message")
        cause = exc.__cause__  # decode wraps what torch/numpy raised; Arrow's errors keep only the text
        if isinstance(cause, MemoryError) or msg.startswith("cannot build the value: MemoryError") \
                or any(s in msg for s in ("ArrowMemoryError", "Out of memory", "malloc of size", "realloc of size")):
            raise AssertionError(f"an allocation over the memory cap, reported as: {msg[:300]}")

    def touch(self, value, depth: int = 0) -> None:
        """Read every byte the decoded value claims to hold; only the allowed types may appear."""
        np, torch, pa = self.np, self.torch, self.pa
        if value is None or type(value) in (bool, int, float, str, bytes, bytearray):
            return
        if type(value) in (list, tuple):
            for v in value:
                self.touch(v, depth + 1)
            return
        if type(value) is dict:
            for k, v in value.items():
                assert type(k) is str, f"a dict key of type {type(k)}"
                self.touch(v, depth + 1)
            return
        if type(value) is torch.Tensor:
            assert str(value.dtype).removeprefix("torch.") in self.dc.DTYPES, value.dtype
            assert value.device.type == "cpu" and value.layout == torch.strided
            raw = value.detach().contiguous().reshape(-1).view(torch.uint8)
            assert raw.numel() == value.numel() * value.element_size()
            int(raw.sum())
            if value.dtype == torch.bool:
                assert int(raw.max()) <= 1 if raw.numel() else True, "a bool tensor holding other bytes"
            return
        if type(value) is np.ndarray or isinstance(value, np.generic):
            assert value.dtype.name in self.dc.DTYPES and value.dtype.isnative, value.dtype
            raw = value.tobytes()
            assert len(raw) == value.nbytes
            if value.dtype == np.bool_:
                assert set(raw) <= {0, 1}, "a bool array holding other bytes"
            return
        if pa is not None and isinstance(value, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
            value.validate(full=True)
            if len(value) <= 10_000:
                value.to_pylist() if not isinstance(value, pa.Table) else value.to_pydict()
            return
        raise AssertionError(f"decode built a {type(value).__module__}.{type(value).__qualname__}")

    # -------------------------------------------------------------------- (a) byte mutations

    def mutate_bytes(self, rng: random.Random) -> tuple[bytes, list]:
        meta, bufs = rng.choice(self.corpus)
        meta, bufs = bytearray(meta), [bytearray(b) for b in bufs]
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
            if rng.random() < 0.5 or not bufs:
                meta = self.mutate_blob(rng, meta)
            else:
                op = rng.randrange(7)
                i = rng.randrange(len(bufs))
                if op == 0:
                    bufs[i] = self.mutate_blob(rng, bufs[i])
                elif op == 1:
                    del bufs[i]
                elif op == 2:
                    bufs.insert(i, bytearray(rng.randbytes(rng.choice([0, 1, 2, 4, 8, 24]))))
                elif op == 3:
                    j = rng.randrange(len(bufs))
                    bufs[i], bufs[j] = bufs[j], bufs[i]
                elif op == 4:
                    bufs[i] = bytearray(rng.choice(rng.choice(self.corpus)[1] or [b""]))
                elif op == 5 and len(bufs[i]) >= 8:  # an aligned int32/int64 in place: offsets, lengths, indices
                    width = rng.choice([4, 8])
                    at = rng.randrange(len(bufs[i]) // width) * width
                    value = rng.choice(self.INTERESTING_INTS) * rng.choice([1, -1])
                    bufs[i][at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
                else:  # random values in place, sizes kept: bool contents, Arrow offsets
                    for _ in range(rng.randint(1, 4)):
                        if bufs[i]:
                            bufs[i][rng.randrange(len(bufs[i]))] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF,
                                                                               rng.randrange(256)])
        return bytes(meta), [b if rng.random() < 0.5 else bytes(b) for b in bufs]

    def mutate_blob(self, rng: random.Random, blob: bytearray) -> bytearray:
        blob = bytearray(blob)
        op = rng.randrange(8)
        pos = rng.randrange(len(blob) + 1)
        if op == 0 and blob:  # bit flip
            p = min(pos, len(blob) - 1)
            blob[p] ^= 1 << rng.randrange(8)
        elif op == 1 and blob:  # byte set
            blob[min(pos, len(blob) - 1)] = rng.choice([0, 0xFF, ord('"'), ord("["), ord("{"), ord("-"),
                                                        ord("9"), ord(","), ord("e"), rng.randrange(256)])
        elif op == 2:  # truncate
            del blob[pos:]
        elif op == 3:  # insert a token or random bytes
            ins = rng.choice(self.TOKENS) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 8))
            blob[pos:pos] = ins
        elif op == 4:  # delete a range
            del blob[pos : pos + rng.randint(1, 16)]
        elif op == 5:  # duplicate a range
            end = min(len(blob), pos + rng.randint(1, 32))
            blob[end:end] = blob[pos:end]
        elif op == 6:  # splice with another corpus meta
            other = rng.choice(self.corpus)[0]
            blob = blob[:pos] + bytearray(other[rng.randrange(len(other) + 1) :])
        else:  # replace a number with an interesting one
            digits = [i for i, c in enumerate(blob) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                j = i
                while j < len(blob) and 48 <= blob[j] <= 57:
                    j += 1
                blob[i:j] = str(rng.choice(self.INTERESTING_INTS)).encode()
        return blob

    # ---------------------------------------------------------------- (b) structure mutations

    def palette(self, rng: random.Random):
        """A JSON value to drop in somewhere: boundary numbers, wrong types, near-valid nodes."""
        dtypes = list(self.dc.DTYPES) + ["float128", "object", "", "Float32", "<f4", "complex32"]
        choices = [
            lambda: rng.choice(self.INTERESTING_INTS), lambda: -rng.choice(self.INTERESTING_INTS),
            lambda: rng.choice([0.5, -0.0, 1e308, 2.0, float("nan"), float("inf")]),
            lambda: rng.choice([None, True, False, "", "x" * rng.randint(1, 300), [], {}, [1, 2], {"t": None}]),
            lambda: rng.choice(dtypes),
            lambda: rng.choice(["cpu", "cuda", "cuda:0", "cuda:99", "mps", "xpu:1", "cpu:1", "cpu\n", "gpu", "meta"]),
            lambda: rng.choice(["tensor", "ndarray", "bytes", "arrow", "tuple", "dict", "int", "float", "pickle"]),
            lambda: {"t": "int", "v": rng.choice(["9" * rng.choice([1, 19, 20, 4000, 4001]), "-1", "1e5", "0x1", ""])},
            lambda: {"t": "float", "v": rng.choice(["nan", "inf", "-inf", "1.5", "NaN", None])},
            lambda: {"t": rng.choice(["tensor", "ndarray"]), "dtype": rng.choice(dtypes),
                     "shape": [rng.choice([0, 1, 2, 3, 2**20]) for _ in range(rng.randint(0, 4))],
                     "buf": rng.randrange(-1, 4), "device": "cpu", "grad": rng.random() < 0.2,
                     "scalar": rng.random() < 0.2},
            lambda: {"t": "arrow", "kind": rng.choice(["table", "batch", "array", "chunked", "frame"]),
                     "buf": rng.randrange(-1, 4)},
            lambda: {"t": "bytes", "buf": rng.randrange(-1, 4), "mutable": rng.random() < 0.5},
        ]
        return rng.choice(choices)()

    def mutate_struct(self, rng: random.Random) -> tuple[bytes, list]:
        meta, bufs = rng.choice(self.corpus)
        top = json.loads(meta)
        bufs = [bytearray(b) for b in bufs]
        for _ in range(rng.choice([1, 1, 2, 3])):
            self.mutate_tree(rng, top, bufs)
        if rng.random() < 0.05:  # the top level itself
            rng.choice([lambda: top.pop("format"), lambda: top.update(format=rng.choice([0, 2, "1", None])),
                        lambda: top.update(extra=1)])()
        out = json.dumps(top, allow_nan=True).encode()  # NaN now and then: must be refused
        return out, [b if rng.random() < 0.5 else bytes(b) for b in bufs]

    def nodes(self, top: dict) -> list[tuple]:
        """(container, key) of every slot in the value tree, the tree itself first."""
        out = [(top, "value")]
        stack = [top["value"]]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                for i, v in enumerate(node):
                    out.append((node, i))
                    stack.append(v)
            elif isinstance(node, dict):
                for k, v in node.items():
                    out.append((node, k))
                    stack.append(v)
        return out

    def mutate_tree(self, rng: random.Random, top: dict, bufs: list) -> None:
        slots = self.nodes(top)
        typed = [(c, k) for c, k in slots if isinstance(c[k], dict) and "t" in c[k]]
        arrays = [(c, k) for c, k in typed if c[k].get("t") in ("tensor", "ndarray")]
        op = rng.randrange(10)
        if op <= 2 and arrays:  # the fields that say how big a buffer is and how to read it
            node = (lambda c_k: c_k[0][c_k[1]])(rng.choice(arrays))
            self.mutate_array_node(rng, node, bufs)
        elif op == 3 and typed:  # a field of a typed node: replaced, deleted, or one added
            node = (lambda c_k: c_k[0][c_k[1]])(rng.choice(typed))
            field = rng.choice(sorted(node))
            r = rng.random()
            if r < 0.6:
                node[field] = self.palette(rng)
            elif r < 0.8:
                del node[field]
            else:
                node[rng.choice(["x", "owner", "device", "scalar", "grad", "items", "v"])] = self.palette(rng)
        elif op == 4:  # any slot replaced
            c, k = rng.choice(slots)
            c[k] = self.palette(rng)
        elif op == 5:  # nesting: wrap a slot in containers, sometimes past the depth limit
            c, k = rng.choice(slots)
            v = c[k]
            for _ in range(rng.choice([1, 2, 5, 30, 31, 32, 33, 40, 200])):
                v = rng.choice([[v], {"t": "tuple", "items": [v]}, {"t": "dict", "items": [["k", v]]}])
            c[k] = v
        elif op == 6:  # a subtree twice (a buffer used twice), or dropped (a buffer unused)
            lists = [(c, k) for c, k in slots if isinstance(c[k], list) and c[k]]
            if lists:
                c, k = rng.choice(lists)
                lst = c[k]
                i = rng.randrange(len(lst))
                if rng.random() < 0.5:
                    lst.insert(i, copy.deepcopy(lst[i]))
                else:
                    del lst[i]
        elif op == 7 and typed:  # a buffer index moved
            node = (lambda c_k: c_k[0][c_k[1]])(rng.choice(typed))
            if "buf" in node:
                old = node["buf"] if type(node["buf"]) is int else 0
                node["buf"] = rng.choice([old + 1, old - 1, len(bufs), 0, -1, 2**63, float(old), str(old)])
        elif op == 8 and bufs:  # the buffers themselves
            i = rng.randrange(len(bufs))
            r = rng.random()
            if r < 0.4:
                bufs[i] = bytearray(rng.randbytes(len(bufs[i])))
            elif r < 0.6:
                bufs[i] = bufs[i][: rng.randrange(len(bufs[i]) + 1)]
            elif r < 0.8:
                bufs.append(bytearray(rng.randbytes(rng.choice([0, 1, 8]))))
            else:
                del bufs[i]
        else:  # the kind of a typed node changed, fields kept
            if typed:
                node = (lambda c_k: c_k[0][c_k[1]])(rng.choice(typed))
                node["t"] = rng.choice(["tensor", "ndarray", "bytes", "arrow", "tuple", "dict", "int", "float"])

    def mutate_array_node(self, rng: random.Random, node: dict, bufs: list) -> None:
        i = node.get("buf")
        nbytes = len(bufs[i]) if type(i) is int and 0 <= i < len(bufs) else 0
        r = rng.random()
        shape = node.get("shape")
        if r < 0.35:  # reinterpret: a dtype whose size divides the buffer, a shape that fits (check passes)
            fits = [d for d, s in self.dc.DTYPES.items() if nbytes % s == 0
                    and not (node.get("t") == "ndarray" and d == "bfloat16")]
            if fits:
                d = rng.choice(fits)
                node["dtype"] = d
                n = nbytes // self.dc.DTYPES[d]
                node["shape"] = self.factor(rng, n)
                if node.get("t") == "tensor" and node.get("grad"):
                    node["grad"] = d.startswith(("float", "bfloat", "complex"))
                if node.get("t") == "ndarray":
                    node["scalar"] = node["shape"] == [] and rng.random() < 0.5
        elif r < 0.55 and type(shape) is list:  # a dim changed
            shape = list(shape) or [1]
            j = rng.randrange(len(shape))
            old = shape[j] if type(shape[j]) is int else 1
            shape[j] = rng.choice([0, 1, -1, old * 2, old + 1, 2**31, 2**62, 2**64, 1.0, "2", True])
            node["shape"] = shape
        elif r < 0.7 and type(shape) is list:  # dims added or removed
            node["shape"] = shape + [1] * rng.choice([1, 2, 13, 14, 15, 16]) if rng.random() < 0.5 else shape[:-1]
        elif r < 0.8:
            node["dtype"] = rng.choice(list(self.dc.DTYPES) + ["float128", "O", "", 4])
        elif r < 0.9 and node.get("t") == "tensor":
            node["device"] = rng.choice(["cpu", "cpu:0", "cuda", "cuda:7", "mps", "xpu", "cpu\n", "CPU", 0])
            node["grad"] = rng.choice([True, False, 1, None])
        else:
            node["scalar" if node.get("t") == "ndarray" else "grad"] = rng.choice([True, False, 1, "yes"])

    @staticmethod
    def factor(rng: random.Random, n: int) -> list[int]:
        if n == 1 and rng.random() < 0.3:
            return []
        if n == 0:
            return rng.choice([[0], [0, 3], [2, 0], [0, 2**62]])
        dims = []
        while n > 1 and len(dims) < 6 and rng.random() < 0.6:
            divisors = [d for d in range(2, min(n, 64) + 1) if n % d == 0]
            if not divisors:
                break
            d = rng.choice(divisors)
            dims.append(d)
            n //= d
        dims.append(n)
        rng.shuffle(dims)
        return dims

    # --------------------------------------------------------------------------- (c) frames

    def make_frame(self, rng: random.Random) -> bytes:
        fr = self.framing
        if rng.random() < 0.4:
            meta, bufs = self.mutate_struct(rng)
        else:
            meta, bufs = rng.choice(self.corpus)
        bufs = [bytes(b) for b in bufs]
        data = bytearray(fr.frame_header(len(meta), [len(b) for b in bufs]) + meta + b"".join(bufs))
        nbuf = len(bufs)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            r = rng.random()
            if len(data) < fr.HEAD.size + 8 * nbuf:
                data = self.mutate_blob(rng, data)
            elif r < 0.1:  # magic, version, flags
                pos = rng.randrange(0, 8)
                data[pos] ^= 1 << rng.randrange(8)
            elif r < 0.25:  # buffer count
                data[8:12] = rng.choice([0, 1, nbuf - 1 if nbuf else 0, nbuf + 1, 4096, 4097, 2**32 - 1]).to_bytes(
                    4, "little")
            elif r < 0.4:  # metadata length
                data[12:20] = rng.choice([0, 1, len(meta) - 1, len(meta) + 1, 16 << 20, (16 << 20) + 1,
                                          2**63, 2**64 - 1]).to_bytes(8, "little")
            elif r < 0.6 and nbuf:  # one buffer's size, total kept or not
                i = rng.randrange(nbuf)
                at = fr.HEAD.size + 8 * i
                old = int.from_bytes(data[at : at + 8], "little")
                new = rng.choice([0, old + 1, max(old - 1, 0), old * 2, 2**40, 2**60, 2**64 - 1])
                data[at : at + 8] = (new % 2**64).to_bytes(8, "little")
                if rng.random() < 0.5 and nbuf > 1:  # move the difference to another buffer: length fits
                    j = (i + 1) % nbuf
                    at2 = fr.HEAD.size + 8 * j
                    other = int.from_bytes(data[at2 : at2 + 8], "little") + old - new
                    if 0 <= other < 2**64:
                        data[at2 : at2 + 8] = other.to_bytes(8, "little")
            elif r < 0.7:
                del data[rng.randrange(len(data) + 1) :]
            elif r < 0.8:
                data += rng.randbytes(rng.randint(1, 16))
            else:
                data = self.mutate_blob(rng, data)
        return bytes(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
