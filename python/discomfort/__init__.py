"""discomfort: fast hand-off of tensors and other values between ComfyUI workflows."""

from __future__ import annotations

from . import errors
from ._backend import select as _select
from .errors import *  # noqa: F403

backend, _store_module = _select()
"""Which store implementation is active: "native" (the C++ core) or "python"."""

Store = _store_module.Store

__version__ = "0.1.0"

__all__ = ["backend", "Store", "errors", "__version__", *errors.__all__]
