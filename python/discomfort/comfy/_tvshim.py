"""Make ``import torchvision`` work with a CPU torch and PyPI's CUDA torchvision build.

PyPI's torchvision wheel is built against CUDA; with the CPU torch its ``_C`` extension does not
load, and ``import torchvision`` then fails in ``_meta_registrations`` with
``operator torchvision::nms does not exist``. ComfyUI imports torchvision (kornia, spandrel, its
own extras), and no weights-free node needs nms, so it is enough that the op schemas exist.

:func:`install` puts a ``sys.meta_path`` hook in front of the import system. On the first
``import torchvision`` (and only then: ComfyUI's import order, which wants torch imported late, is
kept) it loads torchvision's ``_C`` library if that works, and otherwise defines the two op
schemas ``torchvision::nms`` and ``torchvision::qnms`` without kernels. Calling them raises;
nothing else changes.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import os
import sys
import threading

__all__ = ["install", "installed", "ensure_ops"]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_lock = threading.Lock()
_libraries: list = []  # keeps the torch.library.Library objects (and so the schemas) alive
_done = False


def _has_op(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_load_extension(torch, path) -> bool:
    spec = importlib.machinery.PathFinder.find_spec("torchvision", path)
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        for lib in sorted(glob.glob(os.path.join(location, "_C*.so")) + glob.glob(os.path.join(location, "_C*.pyd"))):
            try:
                torch.ops.load_library(lib)
            except (OSError, RuntimeError, ImportError):
                continue
            return True
    return False


def ensure_ops(path=None) -> str:
    """Make sure ``torchvision::nms``/``qnms`` exist; returns how: "present", "extension" or "schemas"."""
    global _done
    with _lock:
        import torch

        if _has_op(torch, "nms") and _has_op(torch, "qnms"):
            _done = True
            return "present"
        if _try_load_extension(torch, path) and _has_op(torch, "nms") and _has_op(torch, "qnms"):
            _done = True
            return "extension"
        try:
            lib = torch.library.Library("torchvision", "DEF")
        except RuntimeError:  # the namespace exists already: add to it
            lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            if not _has_op(torch, schema.split("(", 1)[0]):
                lib.define(schema)
        _libraries.append(lib)
        _done = True
        return "schemas"


class _TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_ops` just before torchvision is first imported, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        _remove()
        ensure_ops()
        return None  # the regular finders import torchvision itself


_finder = _TorchvisionShimFinder()


def _remove() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def installed() -> bool:
    return _finder in sys.meta_path or _done


def install() -> None:
    """Install the hook (idempotent). If torchvision is already imported this does nothing."""
    if _done or "torchvision" in sys.modules or _finder in sys.meta_path:
        return
    sys.meta_path.insert(0, _finder)
