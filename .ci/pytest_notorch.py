"""pytest plugin for the suite on a Python without torch (scripts/test.sh, Python 3.10 and 3.13).

torch is installed only where a wheel is at hand offline (the project's 3.11 environment). Test
modules that import torch at their top (``import torch``) cannot even be collected without it:
this plugin turns each of them into one skipped item with the reason, so the summary counts them
(``-rs``). Modules that use ``pytest.importorskip("torch")`` skip themselves with their reason.
A test function whose own source names torch (``import torch`` inside it, or in the code it hands
to a subprocess) is skipped with the same reason.

    PYTHONPATH=.ci python -m pytest -p pytest_notorch -rs tests --ignore=tests/comfy
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re

import pytest

HAVE_TORCH = importlib.util.find_spec("torch") is not None
REASON = "needs torch, which is not installed for this Python (scripts/test.sh installs it for 3.11 only)"


def _imports_torch_at_top(path) -> bool:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch" and not node.level:
            return True
    return False


class _SkippedModule(pytest.File):
    def collect(self):
        yield _SkippedItem.from_parent(self, name="(module)")


class _SkippedItem(pytest.Item):
    def runtest(self) -> None:
        pytest.skip(REASON)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}: {REASON}"


def pytest_pycollect_makemodule(module_path, parent):
    if HAVE_TORCH or not module_path.name.startswith("test_") or not _imports_torch_at_top(module_path):
        return None
    return _SkippedModule.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(config, items):
    if HAVE_TORCH:
        return
    skip = pytest.mark.skip(reason=REASON)
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if re.search(r"\bimport\s+[\w., ]*\btorch\b|\bfrom\s+torch\b", source, re.M):
            item.add_marker(skip)
