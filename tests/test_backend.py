"""The backend switch: DISCOMFORT_BACKEND, DISCOMFORT_REQUIRE_NATIVE and the fallback rule."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
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
    out = run_python("import discomfort; print(discomfort.backend, discomfort.Store.backend, "
                     "discomfort._backend.module().__name__, discomfort.Store.__module__.split('.')[1])",
                     DISCOMFORT_BACKEND="python")
    assert out.stdout.split() == ["python", "python", "discomfort._pystore", "_pystore"], out.stderr


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
    assert out.stdout.split() == ["native", "2"], out.stderr
    out = run_python("import discomfort; print(discomfort.backend)", DISCOMFORT_REQUIRE_NATIVE="1")
    assert out.stdout.strip() == "native", out.stderr


def test_fallback_only_when_the_core_itself_is_missing(tmp_path):
    """An ImportError raised inside the core for another module must propagate."""
    import discomfort

    src = os.path.dirname(discomfort.__file__)
    pkg = tmp_path / "discomfort"
    shutil.copytree(src, pkg, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("_core*.so", "__pycache__", "node_pack"))
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


# ---- what each backend says it is, and the dicts it returns ---------------------------------------

@pytest.fixture(params=["native", "python"])
def backend_mod(request):
    from _helpers import load_backend

    return load_backend(request.param)


def test_each_backend_names_itself(backend_mod):
    from discomfort import _backend

    name = backend_mod.BACKEND
    assert name in ("native", "python")
    assert backend_mod.Store.backend == name
    assert _backend.module(name) is backend_mod
    assert _backend.module() is _backend.module()  # chosen once
    assert _backend.module().BACKEND == _backend.name()


def _check_typed(value: dict, typed: type) -> None:
    """`value` has exactly the TypedDict's keys, each of its declared type."""
    import typing

    hints = typing.get_type_hints(typed)
    assert set(value) == set(hints), (sorted(value), sorted(hints))
    for key, hint in hints.items():
        if typing.get_origin(hint) is typing.Literal:
            assert value[key] in typing.get_args(hint), (key, value[key])
        elif typing.get_origin(hint) is list:
            assert isinstance(value[key], list), key
        else:
            allowed = typing.get_args(hint) or (hint,)  # int | None -> (int, NoneType)
            assert isinstance(value[key], allowed), (key, value[key], hint)
            assert not (isinstance(value[key], bool) and bool not in allowed), key


def test_result_dicts_are_the_typed_ones(backend_mod, tmp_path):
    from discomfort import _types

    run_id = "typed" + os.urandom(6).hex()
    store = backend_mod.Store.create(run_id, ram_budget=1 << 20, disk_root=str(tmp_path), pool=True)
    try:
        store.put("ram", b"meta", [b"x" * 70000])
        store.put("disk", b"", [b"y" * (2 << 20)])  # over the budget: the disk tier
        for key in ("ram", "disk"):
            _check_typed(store.get(key)[2], _types.LoadInfo)
            _check_typed(store.info(key), _types.ObjectInfo)
        assert store.info("ram")["chunk"] == 0 and store.info("disk")["chunk"] is None
        _check_typed(store.stats(), _types.StoreStats)
    finally:
        store.destroy()
    info = backend_mod.pool_info()
    _check_typed(info, _types.PoolInfo)
    for f in info["files"]:
        _check_typed(f, _types.PoolFile)
    backend_mod.release_pool()


def test_native_binding_writes_the_typed_keys():
    """The C++ binding names the keys itself (convert.hpp): they must be the TypedDicts'."""
    from _helpers import load_backend

    from discomfort import _types

    core = load_backend("native")
    store = core.Store.create("keys" + os.urandom(6).hex(), ram_budget=1 << 20)
    try:
        store.put("k", b"", [b"z"])
        assert list(store.info("k")) == list(_types.ObjectInfo.__annotations__)
        assert list(store.stats()) == list(_types.StoreStats.__annotations__)
        assert list(store.get("k")[2]) == list(_types.LoadInfo.__annotations__)
    finally:
        store.destroy()
    assert list(core.pool_info()) == list(_types.PoolInfo.__annotations__)
