"""Test-only (tests/_simplatform): on PYTHONPATH with DISCOMFORT_TEST_PLATFORM=win32|darwin, makes
this process's discomfort code see that system (see _dcf_simhook). Runs any other sitecustomize
further down the path too."""

import importlib.machinery
import importlib.util
import os
import sys

import _dcf_simhook

_dcf_simhook.install_from_environment()

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _other = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_other)
