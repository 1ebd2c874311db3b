"""A loop on a real architecture against the same computation sent as one prompt, on one warm server.

    DISCOMFORT_COMFYUI=... python benchmarks/real_model_loop.py [--iterations 4] [--json out.json]

The SD1.5-shaped checkpoint and LoRA of tests/comfy/_real_models.py (random fp16 weights, built
once and cached beside the test ComfyUI), 64x64, 4 steps, CPU, ComfyUI's default cache. On one
launched server, after a warm-up prompt that loads the model:

* the single prompt's per-iteration time: (time of an N-iteration prompt - time of a 1-iteration
  one) / (N - 1), each iteration a KSampler and a VAEDecode, as the loop's; the median of
  ``--repeats`` such pairs (a shared machine's noise lands on one pair, not on the median);
* the loop (a held Run, shared memory: the load workflow, then the sample workflow, the latent
  fed back), N iterations: the median time of iterations 2..N, and the same with ``rerun="always"``
  (the load workflow queued every iteration, as before discomfort.reuse);
* the server's peak RSS in each phase (VmHWM, reset between phases through /proc/PID/clear_refs).

Prints a markdown table (docs/REAL_MODELS.md) and, with ``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "comfy"))

import _real_models as rm  # noqa: E402

from discomfort import Run  # noqa: E402
from discomfort.comfy import launch_server  # noqa: E402

GiB = 1 << 30


def _peak(pid: int) -> int:
    """The process's peak resident set (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS


def _seeded(prompt: dict, seed: int) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = seed
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _loop(server, iterations: int, rerun: str) -> list[float]:
    """Each iteration's seconds of a held Run's loop."""
    marks: list[float] = []
    with Run(server, transport="shm") as run:
        t0 = time.perf_counter()
        run.execute([rm.LOAD, rm.SAMPLE], {"latent": rm.first_latent()}, iterations, rerun=rerun,
                    on_iteration=lambda i, values: marks.append(time.perf_counter()))
    return [b - a for a, b in zip([t0, *marks], marks)]


def measure(iterations: int, repeats: int = 3) -> dict:
    comfy = Path(os.environ["DISCOMFORT_COMFYUI"])
    models, _built = rm.ensure_models(comfy)
    out: dict = {"iterations": iterations, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory() as tmp:
        config = rm.model_paths_config(models, Path(tmp))
        with launch_server(comfy, isolated=True, custom_nodes=[rm.NODE_PACK], api_nodes=False, cpu=True,
                           extra_args=["--extra-model-paths-config", str(config)], startup_timeout=300) as server:
            pid = server.process.pid
            out["warm_up_s"] = _timed(lambda: server.execute(_seeded(rm.single_prompt(1), 1), timeout=1800))
            _reset_peak(pid)
            pairs = []
            for r in range(repeats):  # new seeds each time: ComfyUI's cache answers none of them
                one = _timed(lambda: server.execute(_seeded(rm.single_prompt(1), 2 + 2 * r), timeout=1800))
                many = _timed(lambda: server.execute(_seeded(rm.single_prompt(iterations), 3 + 2 * r),
                                                     timeout=1800))
                pairs.append((one, many))
            out["single_pairs_s"] = pairs
            out["single_per_iteration_s"] = statistics.median((m - o) / (iterations - 1) for o, m in pairs)
            out["single_peak_rss"] = _peak(pid)
            for rerun in ("auto", "always"):
                _reset_peak(pid)
                times = _loop(server, iterations, rerun)
                out[f"loop_{rerun}_iterations_s"] = times
                out[f"loop_{rerun}_per_iteration_s"] = statistics.median(times[1:])
                out[f"loop_{rerun}_peak_rss"] = _peak(pid)
    return out


def table(r: dict) -> str:
    single, peak = r["single_per_iteration_s"], r["single_peak_rss"]
    rows = ["| computation | per iteration 2+ (s) | x single prompt | server peak RSS (GiB) | x single prompt |",
            "|---|---:|---:|---:|---:|",
            f"| one prompt, {r['iterations']} iterations | {single:.2f} | 1.00 | {peak / GiB:.2f} | 1.00 |"]
    for rerun, name in (("auto", "loop, held Run (default: load workflow reused)"),
                        ("always", "loop, `rerun=\"always\"` (load workflow queued every iteration)")):
        t, p = r[f"loop_{rerun}_per_iteration_s"], r[f"loop_{rerun}_peak_rss"]
        rows.append(f"| {name} | {t:.2f} | {t / single:.2f} | {p / GiB:.2f} | {p / peak:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="single-prompt pairs timed (their median is used)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be 2 or more (the per-iteration time needs two prompts)")
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    result = measure(args.iterations, args.repeats)
    print(table(result))
    print(f"\n({result['machine']}; single prompt (1, {args.iterations} iterations): {result['single_pairs_s']}; "
          f"loop iterations: auto {result['loop_auto_iterations_s']}, always {result['loop_always_iterations_s']}; "
          "medians used)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
