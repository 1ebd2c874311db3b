#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one short run (about 3-5 minutes on a warm machine):
#   1. the CUDA codec tests (tests/test_codecs.py, those marked needs_cuda);
#   2. CUDA rows of the benchmark: device -> store (save of a CUDA tensor) and store -> device
#      (load + .to("cuda")), against torch's own device<->host copies into pageable and pinned
#      memory measured in the same run;
#   3. a real ComfyUI server started with cpu=False (no --cpu) running one tensor handoff
#      (DiscomfortPort in -> ImageInvert -> DiscomfortPort out), checked against 1 - image.
#
#   scripts/gpu-check.sh                # everything; exits 1 if a check fails
#   scripts/gpu-check.sh --dry-run      # no GPU: runs what it can (syntax, imports, the CPU
#                                       # reference rows), says what it skipped
# Environment: PYTHON (default .venv/bin/python), DISCOMFORT_COMFYUI (a ComfyUI tree; default
# ~/.cache/discomfort/comfyui-0.3.75), OUT (where results go; default ./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-$PWD/.venv/bin/python}"
COMFY="${DISCOMFORT_COMFYUI:-$HOME/.cache/discomfort/comfyui-0.3.75}"
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
FAILED=()

step() { echo; echo "== $*"; }
fail() { echo "FAILED: $*"; FAILED+=("$*"); }

step "environment"
"$PY" - <<'EOF' | tee "$OUT/env.txt"
import torch, discomfort
from discomfort import bench
print("discomfort", discomfort.__version__, "torch", torch.__version__, "cuda", torch.version.cuda)
print("machine:", bench.machine_line())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0))
EOF
HAVE_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ "$HAVE_CUDA" != 1 && "$DRY" != 1 ]]; then
    echo "no CUDA device here: run with --dry-run, or on a GPU machine"
    exit 2
fi

step "1. CUDA codec tests"
if [[ "$HAVE_CUDA" == 1 ]]; then
    (cd tests && "$PY" -m pytest -p no:cacheprovider -q -rs --timeout 300 test_codecs.py -k "cuda" \
        | tee "$OUT/codec-tests.txt") || fail "CUDA codec tests"
else
    echo "skipped (no CUDA): would run tests/test_codecs.py -k cuda"
fi

step "2. CUDA benchmark rows"
DRY="$DRY" "$PY" - <<'EOF' | tee "$OUT/cuda-bench.txt" || fail "CUDA benchmark rows"
import json, os, statistics, tempfile, time
import torch
from discomfort import bench
from discomfort.context import WorkflowContext

MiB = 1 << 20
cuda = torch.cuda.is_available() and os.environ.get("DRY") != "1"
dev = "cuda" if cuda else "cpu"

def sync():
    if cuda:
        torch.cuda.synchronize()

def timed(fn, rounds):
    def run():
        fn()
        sync()
    return bench.median_ms(run, rounds)

rows = []
for size in ("64 KiB", "12 MiB", "192 MiB"):
    t = torch.rand(bench.SIZES[size], device=dev)
    nbytes = t.numel() * t.element_size()
    r = 20 if nbytes <= MiB else (7 if nbytes < 100 * MiB else 3)
    ref = bench.memcpy_ms(nbytes, r)
    pageable = torch.empty(t.shape, dtype=t.dtype)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
    out = {
        "memcpy (host reference)": ref,
        "device->host, pageable (torch)": timed(lambda: pageable.copy_(t), r),
        "device->host, pinned (torch)": timed(lambda: pinned.copy_(t, non_blocking=True), r),
        "host->device, pinned (torch)": timed(lambda: t.copy_(pinned, non_blocking=True), r),
    }
    with WorkflowContext(ram_budget=3 * nbytes + 64 * MiB) as ctx:
        out["save of a device tensor (device->store)"] = timed(lambda: ctx.save("x", t), r)
        ctx.save("x", t)
        out["load to device (store->device)"] = timed(lambda: ctx.load("x"), r)  # decode restores the device
        ctx.save("h", t.cpu())
        out["load + .to(device) of a host value"] = timed(lambda: ctx.load("h").to(dev, non_blocking=True), r)
        assert torch.equal(ctx.load("x"), t) and ctx.load("x").device == t.device
    for name, ms in out.items():
        rows.append({"size": size, "method": name, "device": dev, "median_ms": round(ms, 4),
                     "x_memcpy": round(ms / ref, 3), "gbps": round(nbytes / (ms / 1e3) / 1e9, 2)})
        print(f"{size:>8}  {name:<42} {ms:9.3f} ms  {ms / ref:7.2f}x memcpy  {nbytes / (ms / 1e3) / 1e9:7.2f} GB/s")
print("(dry run: every row ran on the CPU, so only the plumbing was checked)" if not cuda else "")
with open(os.path.join(os.environ.get("OUT", "."), "cuda-bench.json"), "w") as fh:
    json.dump(rows, fh, indent=2)
EOF

step "3. a real ComfyUI server on the GPU (cpu=False): one tensor handoff"
if [[ ! -f "$COMFY/main.py" ]]; then
    echo "skipped: no ComfyUI at $COMFY (set DISCOMFORT_COMFYUI)"
elif [[ "$HAVE_CUDA" != 1 ]]; then
    echo "skipped (no CUDA): would start ComfyUI at $COMFY with cpu=False and run one handoff"
else
    COMFY="$COMFY" "$PY" - <<'EOF' | tee "$OUT/comfy-gpu.txt" || fail "ComfyUI handoff on the GPU"
import os, torch
from discomfort.comfy import launch_server
from discomfort.sequential import run_sequential

wf = {"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "image"}},
      "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
      "3": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "out", "input_data": ["2", 0]}}}
image = torch.rand(1, 512, 512, 3)
with launch_server(os.environ["COMFY"], isolated=True, cpu=False, api_nodes=False, startup_timeout=300) as server:
    out = run_sequential(wf, {"image": image}, executor=server, timeout=300)
got = out["out"]
assert torch.allclose(got.cpu(), 1.0 - image), "wrong result"
print("ok: ComfyUI on the GPU inverted a 512x512 image through the store;", got.device, got.dtype)
EOF
fi

step "summary"
if ((${#FAILED[@]})); then
    printf 'failed: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all checks that could run passed; results in $OUT"
