"""The backend switch: DISCOMFORT_BACKEND, DISCOMFORT_REQUIRE_NATIVE and the fallback rule."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full, timeout=120)


def test_python_backend_by_environment():
    out = run_python("import discomfort; print(discomfort.backend, discomfort.Store.__module__)",
                     DISCOMFORT_BACKEND="python")
    assert out.stdout.split() == ["python", "discomfort._pystore"], out.stderr


def test_invalid_backend_names_the_valid_ones():
    out = run_python("import discomfort", DISCOMFORT_BACKEND="fast")
    assert out.returncode != 0
    assert "DISCOMFORT_BACKEND='fast'" in out.stderr and "auto, native, python" in out.stderr


def test_require_native_conflicts_with_python():
    out = run_python("import discomfort", DISCOMFORT_BACKEND="python", DISCOMFORT_REQUIRE_NATIVE="1")
    assert out.returncode != 0 and "DISCOMFORT_REQUIRE_NATIVE" in out.stderr


def _shipped_core() -> bool:
    files = importlib.metadata.files("discomfort") or []
    return any(f.name.startswith("_core") and f.name.endswith(".so") for f in files)


def test_installed_native_wheel_loads_its_core():
    """A wheel that ships the core must use it: a silent fallback would hide a broken build."""
    try:
        shipped = _shipped_core()
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("discomfort is not installed as a distribution (running from a source tree)")
    if not shipped and os.environ.get("DISCOMFORT_REQUIRE_NATIVE") == "1":
        pytest.fail("DISCOMFORT_REQUIRE_NATIVE=1 but the installed wheel has no native core")
    if not shipped:
        pytest.skip("this installation is pure Python")
    out = run_python("import discomfort, discomfort._core as c; print(discomfort.backend, c.FORMAT_VERSION)")
    assert out.stdout.split() == ["native", "1"], out.stderr
    out = run_python("import discomfort; print(discomfort.backend)", DISCOMFORT_REQUIRE_NATIVE="1")
    assert out.stdout.strip() == "native", out.stderr


def test_fallback_only_when_the_core_itself_is_missing(tmp_path):
    """An ImportError raised inside the core for another module must propagate."""
    import discomfort

    src = os.path.dirname(discomfort.__file__)
    pkg = tmp_path / "discomfort"
    pkg.mkdir()
    for name in os.listdir(src):
        if name.endswith(".py"):
            (pkg / name).write_bytes(open(os.path.join(src, name), "rb").read())
    (pkg / "_core.py").write_text("import a_dependency_that_is_not_there\n")
    out = run_python(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import discomfort")
    assert out.returncode != 0 and "a_dependency_that_is_not_there" in out.stderr
    (pkg / "_core.py").unlink()
    out = run_python(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import discomfort; print(discomfort.backend)")
    assert out.stdout.strip() == "python", out.stderr
    out = run_python(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import discomfort",
                     DISCOMFORT_REQUIRE_NATIVE="1")
    assert out.returncode != 0 and "discomfort._core" in out.stderr


def test_source_build_without_a_compiler_installs_pure_python(tmp_path):
    """No C++ compiler: the wheel has no core and imports with the Python backend; unless
    DISCOMFORT_REQUIRE_NATIVE=1, which makes the build fail."""
    import zipfile

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(repo, "CMakeLists.txt")):
        pytest.skip("needs the source tree")
    pytest.importorskip("scikit_build_core")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}
    env["CXX"] = "/nonexistent/c++"

    def build(out: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
             "-C", f"build-dir={tmp_path / (out + '-build')}", "-w", str(tmp_path / out), repo],
            capture_output=True, text=True, env={**env, **extra}, timeout=600)

    out = build("plain")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "plain").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("discomfort/_core") and n.endswith(".so") for n in names)
    assert "discomfort/node_pack/__init__.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = run_python(f"import sys; sys.path.insert(0, {str(site)!r}); import discomfort; "
                       "print(discomfort.backend, discomfort.__file__)")
    assert probe.stdout.split()[0] == "python" and str(site) in probe.stdout, probe.stderr
    refused = build("required", DISCOMFORT_REQUIRE_NATIVE="1")
    assert refused.returncode != 0 and "no C++ compiler" in refused.stdout + refused.stderr
