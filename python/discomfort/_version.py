"""The package's version: pyproject.toml's, read from the installed metadata (the one place it is
written). A source tree without installed metadata says "0+unknown"."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("discomfort")
except metadata.PackageNotFoundError:
    __version__ = "0+unknown"
