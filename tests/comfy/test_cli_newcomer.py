"""The command line with a real ComfyUI, as a newcomer meets it (issue 18): a quiet in-process run,
ComfyUI's log named when a run fails, and ``discomfort install-comfyui`` into a fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

WORKFLOWS = Path(__file__).resolve().parents[1] / "fixtures" / "workflows"
pytestmark = pytest.mark.comfy


def discomfort(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DISCOMFORT_COMFYUI"}
    return subprocess.run([sys.executable, "-m", "discomfort.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(path)
    return path


def test_inprocess_run_keeps_comfyuis_start_up_out_of_the_terminal(comfy_path, tmp_path, png):
    import tempfile

    logs = lambda: set(Path(tempfile.gettempdir()).glob("discomfort-comfyui-*.log"))  # noqa: E731
    before = logs()
    out = tmp_path / "out"
    proc = discomfort("run", str(WORKFLOWS / "run_loop_invert.json"), "-i", f"image={png}", "-o", str(out),
                      "--comfyui", str(comfy_path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no torchaudio tracebacks, no "pip install -r requirements.txt"
    assert proc.stdout.splitlines() == [f"image: {out / 'image_000.png'} (Tensor 1x5x6x3 torch.float32)",
                                        f"1 file(s) written to {out}"]
    assert logs() <= before  # the log of a run that succeeded is removed


def test_inprocess_failure_names_comfyuis_log_and_verbose_shows_it(comfy_path, tmp_path):
    proc = discomfort("run", str(WORKFLOWS / "run_loop_invert.json"), "-o", str(tmp_path / "out"),
                      "--comfyui", str(comfy_path), "--no-progress")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(err) == 2, err
    assert err[0].startswith("discomfort run: error:") and "'image'" in err[0] and "--input KEY=FILE" in err[0]
    assert err[1].startswith("ComfyUI's log: ")
    log = Path(err[1].split(": ", 1)[1])
    try:
        assert log.stat().st_size > 0
    finally:
        log.unlink()

    logged = tmp_path / "comfy.log"
    proc = discomfort("run", str(WORKFLOWS / "run_loop_invert.json"), "-o", str(tmp_path / "out"),
                      "--comfyui", str(comfy_path), "--log", str(logged), "-v")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) > 3  # -v: ComfyUI's own log on stderr
    assert "Traceback (most recent call last)" not in proc.stderr.split("discomfort run: error:")[-1]


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def test_install_comfyui_into_a_fresh_venv(comfy_path, tmp_path):
    from discomfort.cli import install as cli_install

    if cli_install._this_checkout() is None and cli_install._installed_from() is None:  # noqa: SLF001
        pytest.skip("this discomfort was not installed from a wheel file or checkout that still exists")
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(comfy_path, comfy, ignore=shutil.ignore_patterns("__pycache__", "models", "output", "input",
                                                                       "temp", "user", "tests*"))
    (comfy / "custom_nodes").mkdir(exist_ok=True)
    subprocess.run([_base_python(), "-m", "venv", str(comfy / "venv")], check=True, timeout=300,
                   capture_output=True)
    venv_python = comfy / "venv" / "bin" / "python"
    pack = comfy / "custom_nodes" / "discomfort_nodes"

    proc = discomfort("install-comfyui", str(comfy), timeout=1200)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "backend) installed for" in lines[0] and str(comfy / "venv") in lines[0], lines
    assert lines[-1] == "Now restart ComfyUI to load the Discomfort nodes."
    assert (pack / "__init__.py").is_file() and not pack.is_symlink()
    check = subprocess.run([str(venv_python), "-c", "import discomfort, discomfort.nodes; print(discomfort.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert check.returncode == 0 and str(comfy / "venv") in check.stdout, check.stderr

    proc = discomfort("install-comfyui", str(comfy), "--python", str(venv_python), "--link", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert pack.is_symlink() and (pack / "__init__.py").is_file()

    proc = discomfort("install-comfyui", str(comfy), "--remove")
    assert proc.returncode == 0, proc.stderr
    assert "uninstalled discomfort" in proc.stdout and "restart ComfyUI" in proc.stdout
    assert not pack.exists() and not pack.is_symlink()
    gone = subprocess.run([str(venv_python), "-c", "import discomfort"], capture_output=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert gone.returncode != 0

    (pack).mkdir()
    (pack / "__init__.py").write_text("# someone else's\n")
    proc = discomfort("install-comfyui", str(comfy))
    assert proc.returncode == 1 and "is not a Discomfort node pack" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
