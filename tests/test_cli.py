"""`discomfort bench` and `discomfort doctor`, run the way a user runs them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from discomfort import doctor

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the benchmark needs torch, not installed for this Python")

MiB = 1 << 20


@needs_torch
def test_bench_quick_writes_a_table_and_json(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "discomfort.cli", "bench", "--quick", "--rounds", "3",
                           "--no-progress", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "memcpy (reference)" in proc.stdout and "legacy base64 round trip" in proc.stdout
    rows = json.loads(out_json.read_text())
    methods = {r["method"] for r in rows}
    assert {"memcpy (reference)", "save [ram]", "load [ram]", "save+load [ram]"} <= methods
    loads = {r["size"]: r for r in rows if r["method"] == "load [ram]"}
    assert not loads["64 KiB"]["zero_copy"]  # a latent is copied: cheaper than a mapping
    assert loads["256 KiB"]["zero_copy"]
    ref = {r["size"]: r["median_ms"] for r in rows if r["method"].startswith("memcpy")}
    for r in rows:
        assert abs(r["ratio"] - r["median_ms"] / ref[r["size"]]) < 0.01 * r["ratio"] + 1e-3


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    from discomfort import bench

    rows = [bench.Row("1 MiB", MiB, "memcpy (reference)", "-", 0.1, 10.0, 1.0, False),
            bench.Row("1 MiB", MiB, "save [ram]", "native", 0.12, 8.0, 1.2, False)]
    path = tmp_path / "plot.png"
    bench.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_doctor_reports_and_advises(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 4000000 kB\nMemAvailable: 1000000 kB\n")
    report = doctor.collect(disk_root=str(tmp_path), meminfo=str(meminfo), cgroup_root=str(tmp_path / "none"))
    assert report["mem_available"] == 1_024_000_000 and report["ram_budget"] > 0
    assert any("available" in a for a in report["advice"])
    small_shm = doctor.advice(64 * MiB, 60 * MiB, 8 << 30, None, 100 << 30)
    assert any("--shm-size" in a for a in small_shm)
    text = doctor.format_report(report)
    assert "RAM budget" in text and str(tmp_path) in text
    proc = subprocess.run([sys.executable, "-m", "discomfort.cli", "doctor", "--disk-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "backend:" in proc.stdout, proc.stderr
