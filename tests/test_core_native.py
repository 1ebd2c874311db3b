"""What only the compiled core, discomfort._core, has: its build's version and its binding
contract with discomfort.errors. Everything both backends share runs on both in
test_store.py and test_store_*.py (the `backend` fixture of conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from _helpers import load_backend


@pytest.fixture
def core():
    return load_backend("native")


def test_the_core_names_its_build(core):
    """Native only: the Python twin is the package's own source, the core a separate build that
    must say which it is (discomfort doctor reports it)."""
    assert isinstance(core.__version__, str) and core.__version__


def test_error_classes_are_looked_up_when_the_core_loads(core):
    """Native only (the binding contract): a class of discomfort.errors the core raises, renamed
    or gone: the import fails, naming it."""
    code = """
        import discomfort.errors  # the Python backend is chosen: the core is not loaded yet
        del discomfort.errors.DiskFullError
        import discomfort._core
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**env, "DISCOMFORT_BACKEND": "python"}, timeout=120)
    assert out.returncode != 0 and "DiskFullError" in out.stderr, out.stderr
    assert core.BACKEND == "native" and core.Store.backend == "native"
