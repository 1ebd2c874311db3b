"""What the command line says when something is off: one or two lines on stderr with the fix,
a non-zero exit, never a traceback (issue 18). Each case runs the command as a user does."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from discomfort import cli

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="the benchmark needs torch, not installed for this Python")
needs_requests = pytest.mark.skipif(
    importlib.util.find_spec("requests") is None or importlib.util.find_spec("websocket") is None,
    reason='reaching a server needs the comfy extra (pip install "discomfort[comfy]")')


def discomfort(*args: str, env: dict | None = None, code: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """``discomfort ARGS`` in a fresh process (``code`` runs first, e.g. to hide a module)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")
                or k in ("DISCOMFORT_REQUIRE_NATIVE", "DISCOMFORT_BACKEND")}
    full_env.update(env or {})
    prog = (code or "") + "\nimport sys\nfrom discomfort.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, rc: int, *needles: str, lines: int = 1) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == rc, (proc.returncode, proc.stdout[-2000:], err)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert 1 <= len(err.splitlines()) <= lines, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def free_port() -> int:
    """A port with nothing listening: bound to port 0, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- doctor


def test_doctor_healthy_setup_runs_a_tiny_run_and_exits_0(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    proc = discomfort("doctor", "--disk-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "created and removed: both tiers written and read back" in proc.stdout
    assert os.listdir(root) == []  # the test run left nothing


def test_doctor_missing_disk_root_is_created_and_removed_again(tmp_path):
    root = tmp_path / "missing" / "deeper"
    for how in (["--disk-dir", str(root)], []):
        proc = discomfort("doctor", *how, env={} if how else {"DISCOMFORT_DISK_DIR": str(root)})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "does not exist yet; a run creates it" in proc.stdout
        assert not (tmp_path / "missing").exists()  # what the check made, it removed


def test_doctor_ram_budget_that_is_not_a_size(tmp_path):
    proc = discomfort("doctor", "--disk-dir", str(tmp_path), env={"DISCOMFORT_RAM_BUDGET": "lots"})
    one_line_error(proc, 1, "DISCOMFORT_RAM_BUDGET='lots'", "DISCOMFORT_RAM_BUDGET=8G")


def test_doctor_disk_root_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(discomfort("doctor", env={"DISCOMFORT_DISK_DIR": str(f)}), 1, "not a directory",
                   "DISCOMFORT_DISK_DIR")
    one_line_error(discomfort("doctor", "--disk-dir", str(f / "below")), 1, f"{f} is not a directory",
                   "--disk-dir")


def test_doctor_disk_root_writable_by_others(tmp_path):
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    one_line_error(discomfort("doctor", "--disk-dir", str(root)), 1, "sticky bit", "chmod 700")


def test_doctor_disk_root_that_is_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    one_line_error(discomfort("doctor", "--disk-dir", str(tmp_path / "link")), 1, "symbolic link")


def test_doctor_transport_that_is_not_one(tmp_path):
    proc = discomfort("doctor", "--disk-dir", str(tmp_path), env={"DISCOMFORT_TRANSPORT": "carrier"})
    one_line_error(proc, 1, "DISCOMFORT_TRANSPORT='carrier'", "auto, shm or http")


def test_doctor_a_run_that_fails_is_reported(tmp_path):
    """A disk root the store cannot create a run in (here: no space for a run's folder: a
    read-only root for a non-root user, or a run failing to write) fails the check, exit 1."""
    root = tmp_path / "ro"
    root.mkdir(mode=0o700)
    code = ("import discomfort.context as c\n"
            "class Broken:\n"
            "    def __init__(self, *a, **k): raise OSError(28, 'No space left on device')\n"
            "c.WorkflowContext = Broken\n")
    proc = discomfort("doctor", "--disk-dir", str(root), code=code)
    one_line_error(proc, 1, "a test run failed", "No space left on device", "DISCOMFORT_DISK_DIR")


# ----------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("rounds", ["0", "-1", "two"])
def test_bench_rounds_must_be_positive(rounds):
    one_line_error(discomfort("bench", "--rounds", rounds), 2, "--rounds", "discomfort bench --help")


def test_bench_unknown_size_is_refused_before_work():
    one_line_error(discomfort("bench", "--sizes", "3MiB"), 1, "choose from", "12MiB")


def test_bench_sizes_accept_both_spellings():
    assert cli.bench_sizes(["12MiB", "1 MiB", "512mib"]) == ("12 MiB", "1 MiB", "512 MiB")
    assert cli.bench_sizes(["1MiB,12MiB"]) == ("1 MiB", "12 MiB")  # as DISCOMFORT_BENCH_SIZES


@pytest.mark.parametrize("option", ["--plot", "--json"])
def test_bench_output_path_is_checked_before_the_benchmark(option, tmp_path):
    t0 = time.monotonic()
    name = "x.png" if option == "--plot" else "x.json"
    proc = discomfort("bench", option, str(tmp_path / "nonexistent" / "dir" / name))
    if option == "--plot" and importlib.util.find_spec("matplotlib") is None:
        one_line_error(proc, 1, "matplotlib")
        return
    one_line_error(proc, 1, "does not exist", "create it first")
    assert "memcpy" not in proc.stdout and time.monotonic() - t0 < 60  # no benchmark ran
    one_line_error(discomfort("bench", option, str(tmp_path)), 1, "is a folder")


@needs_torch
def test_bench_plot_without_matplotlib_is_refused_before_the_benchmark(tmp_path):
    proc = discomfort("bench", "--plot", str(tmp_path / "x.png"), code="import sys; sys.modules['matplotlib'] = None")
    one_line_error(proc, 1, "--plot needs matplotlib", "pip install")
    assert "memcpy" not in proc.stdout and not (tmp_path / "x.png").exists()


@needs_torch
def test_bench_quick_honours_rounds_and_sizes_and_draws_no_bar_into_logs(monkeypatch, capsys):
    from discomfort import bench

    seen = {}

    def fake_run(sizes, backends, rounds, disk_tier=True, legacy=True, progress=None, http=False):
        seen.update(sizes=sizes, rounds=rounds, disk_tier=disk_tier, http=http)
        progress("[1/1] step")
        return []

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["bench", "--quick", "--rounds", "5", "--sizes", "12MiB"]) == 0
    assert seen == {"sizes": ("12 MiB",), "rounds": 5, "disk_tier": False, "http": False}
    assert "bench" not in capsys.readouterr().err  # stderr is not a terminal here: no tqdm bar
    assert cli.main(["bench", "--quick"]) == 0
    assert seen["rounds"] == 3 and seen["sizes"] == bench.QUICK_SIZES[:2]
    assert cli.main(["bench"]) == 0
    assert seen["rounds"] == 7 and seen["sizes"] == bench.QUICK_SIZES and seen["disk_tier"]
    assert seen["http"] == bench.http_available()  # HTTP rows wherever aiohttp and requests are


# ------------------------------------------------------------------------------------------- run


@needs_requests
@pytest.mark.parametrize("transport", [None, "auto", "http", "shm"])
def test_run_against_a_url_where_nothing_listens(transport, tmp_path):
    wf = tmp_path / "w.json"
    wf.write_text(json.dumps({"1": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "x"}}}))
    url = f"http://127.0.0.1:{free_port()}"
    proc = discomfort("run", str(wf), "-o", str(tmp_path / "out"), "--server", url,
                      *(["--transport", transport] if transport else []))
    err = one_line_error(proc, 1, f"nothing answers at {url}", "is ComfyUI running there?", "--transport")
    assert "node pack" not in err and "transport='" not in err and "Max retries" not in err
    assert len(err) < 300


def test_run_workflow_that_is_not_json_names_the_file(tmp_path):
    wf = tmp_path / "broken.json"
    wf.write_text('{"1": {"class_type": ')
    proc = discomfort("run", str(wf), "-o", str(tmp_path / "out"), "--server", "http://127.0.0.1:1")
    one_line_error(proc, 1, str(wf), "not valid JSON", "line 1")
    proc = discomfort("convert", str(wf), "--object-info", str(wf))
    one_line_error(proc, 1, str(wf), "not valid JSON")


def test_run_without_an_executor_says_which_options(tmp_path):
    wf = tmp_path / "w.json"
    wf.write_text("{}")
    one_line_error(discomfort("run", str(wf), "-o", str(tmp_path)), 1, "--server URL", "--comfyui PATH")
    one_line_error(discomfort("run", str(wf), "-o", str(tmp_path), "--comfyui", str(tmp_path / "nope")), 1,
                   "no such folder")


def test_wrong_command_line_is_one_line():
    one_line_error(discomfort("bench", "--sizez", "1MiB"), 2, "unrecognized arguments", "--help")
    one_line_error(discomfort("frobnicate"), 2, "invalid choice")


# ------------------------------------------------------------------------------- install-comfyui


def test_install_comfyui_refuses_what_is_not_a_comfyui(tmp_path):
    one_line_error(discomfort("install-comfyui", str(tmp_path / "nope")), 1, "no such folder")
    one_line_error(discomfort("install-comfyui", str(tmp_path)), 1, "no main.py")
    (tmp_path / "main.py").write_text("")
    one_line_error(discomfort("install-comfyui", str(tmp_path)), 1, "cannot find the Python", "--python")
    one_line_error(discomfort("install-comfyui", str(tmp_path), "--python", str(tmp_path / "py")), 1,
                   "no such program")
    old = tmp_path / "old"
    old.write_text("#!/bin/sh\necho '{\"version\": [3, 8], \"prefix\": \"/x\", \"executable\": \"/x\"}'\n")
    old.chmod(0o755)
    one_line_error(discomfort("install-comfyui", str(tmp_path), "--python", str(old)), 1, "needs 3.10 or newer")
