"""The import paths of modules that moved into packages keep working.

``discomfort.cli_run`` is ``discomfort.cli.run``, ``discomfort.workflow_format`` is
``discomfort.workflows.format``, ``discomfort.nodes.panel`` is ``discomfort.panel.runner``, and so
on: importing an old path gives the very module object of the new one (so ``mock.patch`` and
``isinstance`` checks see one module), and it is imported only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old dotted name -> new dotted name
MOVED: dict[str, str] = {
    **{f"discomfort.cli_{m}": f"discomfort.cli.{m}" for m in ("common", "run", "loops", "convert", "install", "demo")},
    **{f"discomfort.workflow_{m}": f"discomfort.workflows.{m}" for m in ("format", "widgets", "subgraphs", "tools", "ids")},
    "discomfort.nodes.panel": "discomfort.panel.runner",
    **{f"discomfort.nodes.panel_{m}": f"discomfort.panel.{m}" for m in ("io", "runs", "cache")},
}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The new module has run already."""


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
