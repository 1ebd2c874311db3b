"""Seeded fuzzing of discomfort.datacodec and the frame parser (discomfort.remote.framing).

The bulk runs in a subprocess worker (tests/_datacodec_fuzz_worker.py) with its address space
capped, so a segfault, a hang or an allocation past the cap fails a test instead of killing
pytest. The property: every damaged input either decodes to a value made only of the allowed
types or is refused with a SerializationError (ValueError from framing) that has a message.

Scale with DISCOMFORT_FUZZ_CASES (cases per seed; default 1000, so 6000 cases in all).
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

from discomfort import datacodec
from discomfort.errors import SerializationError
from discomfort.remote import framing

pytest.importorskip("torch")
pytest.importorskip("numpy")

WORKER = pathlib.Path(__file__).resolve().with_name("_datacodec_fuzz_worker.py")
CASES = int(os.environ.get("DISCOMFORT_FUZZ_CASES", "1000"))
SEEDS = {"bytes": [1101, 1102], "struct": [2201, 2202], "frames": [3301, 3302]}
MEM_MIB = 64


def run_worker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", ARROW_DEFAULT_MEMORY_POOL="system")
    return subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def last_case(stderr: str) -> str:
    """The case the worker was running when it stopped (its last 'case MODE SEED N' line)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("case ")]
    return lines[-1] if lines else "(none)"


def explain(proc: subprocess.CompletedProcess) -> str:
    """The failure message: the case it died in (by a signal: a crash, or SIGALRM for a hang) or the
    FAIL lines, each naming its seed and case, and how to rerun one case alone."""
    where = last_case(proc.stderr).split()
    cmd = f"{sys.executable} {WORKER}"
    repro = ""
    if proc.returncode < 0 and len(where) == 4:
        repro = f"died in that case; rerun it alone: {cmd} {where[1]} 1 {where[2]} --only {where[3]}"
    elif proc.returncode > 0:
        repro = f"rerun one FAIL case alone: {cmd} MODE 1 SEED --only CASE"
    fails = "\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL "))
    return (f"worker exit code {proc.returncode}; last case: {last_case(proc.stderr)}\n{repro}\n"
            f"{fails}\nstderr tail:\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("mode", ["bytes", "struct", "frames"])
def test_fuzz_decodes_or_refuses_never_crashes(mode):
    """(a) byte mutations of metas and buffers, (b) mutations of description trees, (c) whole frames:
    no crash, no hang, no other exception type, no allocation past the cap; both outcomes occur."""
    seeds = SEEDS[mode]
    proc = run_worker(mode, str(CASES), *map(str, seeds), "--mem", str(MEM_MIB))
    assert proc.returncode == 0, explain(proc)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cases"] == CASES * len(seeds) and summary["failures"] == 0, summary
    assert summary["limit_works"], "the address-space cap did not stop a larger allocation: memory unchecked"
    refused = summary["refused"] + summary["refused_check"] + summary["refused_frame"]
    assert summary["decoded"] > 0 and refused > 0, summary
    assert summary["decoded"] + refused == summary["cases"], summary
    if mode != "bytes":  # the structure-aware cases reach decode's content checks, not only check()
        assert summary["refused"] > 0, summary
    print(f"\n{mode}: {summary}")


def test_harness_sees_a_crash_and_names_the_case():
    """The worker dying by a signal must fail the fuzz test, with the case it was on."""
    proc = run_worker("_crash", "1", "77", timeout=60)
    assert proc.returncode != 0
    assert last_case(proc.stderr) == "case _crash 77 0"


def test_one_case_can_be_rerun_alone():
    """--only N reruns case N of a seed alone (each case seeds its own generator)."""
    proc = run_worker("struct", "1", str(SEEDS["struct"][0]), "--only", "17", timeout=120)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cases"] == 1 and last_case(proc.stderr) == f"case struct {SEEDS['struct'][0]} 17"


# -------------------------------------------------------------------- sizes before allocation


def tensor_doc(dtype: str, shape: list) -> bytes:
    node = {"t": "tensor", "dtype": dtype, "shape": shape, "buf": 0, "device": "cpu", "grad": False}
    return json.dumps({"format": 1, "value": node}).encode()


def test_check_refuses_a_2_to_60_byte_tensor_announced_with_small_buffers():
    """The description's own size must match the frame's: a 2**60-byte tensor over 16 bytes is refused."""
    meta = tensor_doc("uint8", [2**30, 2**30])
    with pytest.raises(SerializationError, match=rf"is {2**60} bytes but its buffer has 16"):
        datacodec.check(meta, [16])
    with pytest.raises(SerializationError, match="bytes of buffers"):
        datacodec.check(meta, [2**60])  # announced in full: over max_bytes
    head = framing.frame_header(len(meta), [2**60])
    with pytest.raises(ValueError, match="bytes of buffers"):
        framing.parse_header(head + meta)


def test_check_allocates_nothing_for_large_announced_sizes():
    """check() of a 2**39-byte tensor (within max_bytes) passes without allocating anything of that size."""
    meta = tensor_doc("float32", [2**37])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        datacodec.check(meta, [2**39])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 << 10  # KiB: < 64 MiB


def test_limits_shrink_what_check_accepts():
    """A server's smaller Limits(max_bytes) applies before any buffer exists, in check and in the frame."""
    small = datacodec.Limits(max_bytes=1 << 20)
    meta = tensor_doc("uint8", [2 << 20])
    with pytest.raises(SerializationError, match=r"at most 1048576"):
        datacodec.check(meta, [2 << 20], small)
    with pytest.raises(ValueError, match=r"at most 1048576"):
        framing.parse_header(framing.frame_header(len(meta), [2 << 20]) + meta, small)


def test_parsing_a_description_of_max_meta_bytes_stays_within_8x_its_size():
    """A description at the max_meta limit made of empty lists ('[],' * 5.6M) must be refused without
    building millions of Python objects first: peak memory growth at most 8 times the description."""
    code = textwrap.dedent("""
        import resource
        from discomfort import datacodec
        from discomfort.errors import SerializationError
        limit = datacodec.DEFAULT_LIMITS.max_meta
        meta = b'{"format":1,"value":[' + b"[]," * (limit // 3 - 20) + b"[]]}"
        assert len(meta) <= limit
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            datacodec.check(meta, [])
        except SerializationError as exc:
            print("refused", exc)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print("grown", grown, "meta", len(meta))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused" in proc.stdout, proc.stdout
    grown, meta_len = (int(w) for w in proc.stdout.split()[-3::2])
    assert grown <= 8 * meta_len, f"parsing {meta_len} bytes of description took {grown >> 20} MiB"
