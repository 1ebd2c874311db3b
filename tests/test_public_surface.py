"""The public surface, stated: every exception in errors.py (or private), every module public
(listed in docs/ARCHITECTURE.md, with an ``__all__`` whose names exist) or internal (a leading
underscore, or a docstring that says "Internal:"), and the run contexts typed precisely."""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import re
import typing
from pathlib import Path

import pytest

import discomfort
from discomfort import errors
from test_architecture import MODULES  # module name -> its installed file

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

#: Exceptions that are neither private nor in errors.py, and why; each must live in an internal module.
INTERNAL_EXCEPTIONS = {
    "HTTPRefusal": "a route's refusal with its HTTP status, caught by the routes' own error handling",
}

#: Where users imported each moved exception before it moved to errors.py (the same class there).
OLD_HOMES = [
    ("discomfort.recipes", "RecipeError"),
    ("discomfort.workflows.widgets", "WidgetMismatchError"),
    ("discomfort.workflow_widgets", "WidgetMismatchError"),
    ("discomfort.distributed", "ValueLostError"),
    ("discomfort.distributed", "ServerDiedError"),
    ("discomfort.panel.io", "InvalidName"),
    ("discomfort._backend", "BackendUnavailableError"),
    ("discomfort.cli.common", "CommandError"),
    ("discomfort.remote", "TransportWarning"),
    ("discomfort.remote.client", "TransportWarning"),
]


TREES = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}


def _says_internal(module: str) -> bool:
    doc = ast.get_docstring(TREES[module]) or ""
    return doc.startswith("Internal:")


def _is_internal(module: str) -> bool:
    """A part of the name with a leading underscore (``_pystore``, ``__main__``), or a docstring
    starting "Internal:" on the module or on a package above it."""
    parts = module.split(".")
    if any(p.startswith("_") for p in parts):
        return True
    return any(_says_internal(".".join(parts[:i])) for i in range(2, len(parts) + 1))


def _public_list() -> set[str]:
    text = ARCHITECTURE.read_text()
    match = re.search(r"^## Public modules\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "docs/ARCHITECTURE.md has no '## Public modules' section"
    return set(re.findall(r"`(discomfort(?:\.[a-z_]+)*)`", match.group(1)))


PUBLIC = _public_list()


def _exception_classes() -> list[tuple[str, str, int]]:
    """(module, class, line) of every class whose bases lead to a built-in exception."""
    builtin = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
               and issubclass(getattr(builtins, n), BaseException)}
    bases: dict[str, set[str]] = {}
    where = []
    for m, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                bases.setdefault(node.name, set()).update(names)
                where.append((m, node.name, node.lineno))
    exc = set(builtin)
    grew = True
    while grew:
        new = {c for c, bs in bases.items() if c not in exc and bs & exc}
        exc |= new
        grew = bool(new)
    return [(m, c, line) for m, c, line in where if c in exc]


def test_the_scans_see_the_package():
    found = {c for _m, c, _l in _exception_classes()}
    assert {"DiscomfortError", "RunInterrupted", "ServerDiedError", "_ChildFailed"} <= found
    assert {"discomfort", "discomfort.errors", "discomfort.workflows.tools"} <= PUBLIC
    assert _is_internal("discomfort.panel.runner") and _is_internal("discomfort._pystore.store")
    assert not _is_internal("discomfort.context")


def test_every_exception_is_private_or_in_errors():
    """One home for the errors a user may catch: errors.py, listed in its ``__all__``."""
    bad = []
    for m, c, line in _exception_classes():
        if c.startswith("_"):
            continue
        if m == "discomfort.errors":
            if c not in errors.__all__:
                bad.append(f"{m}:{line} {c} is not in errors.__all__")
        elif c in INTERNAL_EXCEPTIONS:
            if not _is_internal(m):
                bad.append(f"{m}:{line} {c} is allowed only in an internal module")
        else:
            bad.append(f"{m}:{line} {c}: define it in errors.py (and import it here), or name it _{c}")
    assert not bad, "\n".join(bad)


def test_errors_lists_only_its_own_classes():
    for name in errors.__all__:
        obj = getattr(errors, name)
        assert isinstance(obj, type) and issubclass(obj, BaseException), name
        assert obj.__module__ == "discomfort.errors", name


@pytest.mark.parametrize("module,name", OLD_HOMES)
def test_old_import_paths_give_the_same_class(module, name):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:  # aiohttp, say, on a numpy-only Python
        pytest.skip(f"{module} needs {exc.name}")
    assert getattr(mod, name) is getattr(errors, name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_is_public_or_internal(module):
    internal, listed = _is_internal(module), module in PUBLIC
    assert not (internal and listed), f"{module} is listed public in docs/ARCHITECTURE.md but is internal"
    assert internal or listed, (f"{module}: list it under 'Public modules' in docs/ARCHITECTURE.md, or start "
                                "its docstring with 'Internal:' (or give it a leading underscore)")


def test_every_listed_module_exists():
    assert PUBLIC <= set(MODULES), f"listed but not in the package: {sorted(PUBLIC - set(MODULES))}"


def _lazy_names(tree: ast.Module) -> set[str]:
    """Names a module gives through ``__getattr__`` (the string constants it and ``_LAZY`` hold)."""
    names: set[str] = set()
    for node in tree.body:
        if (isinstance(node, ast.FunctionDef) and node.name == "__getattr__") or (
                isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets)):
            names |= {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return names


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_modules_state_their_names(module):
    """Each public module has an ``__all__``; each name in it exists, and each function or class
    listed is defined there (or is one of errors.py's, or a package's own submodule's)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("discomfort"):
            raise
        pytest.skip(f"{module} needs {exc.name}")
    assert isinstance(getattr(mod, "__all__", None), list), f"{module} has no __all__"
    is_package = MODULES[module].name == "__init__.py"
    lazy = _lazy_names(TREES[module])
    for name in mod.__all__:
        if name in vars(mod):
            obj = vars(mod)[name]
        elif name in lazy:
            continue  # loaded on first use (it may need Ray); the name is the module's own table
        elif is_package and importlib.util.find_spec(f"{module}.{name}") is not None:
            continue
        else:
            raise AssertionError(f"{module}.__all__ names {name!r}, which it does not define")
        if not (isinstance(obj, type) or inspect.isfunction(obj)):
            continue  # a constant or a type alias (typing's objects)
        home = obj.__module__
        own = home == module or home == "discomfort.errors" or (is_package and home.startswith(module + "."))
        assert own, f"{module}.__all__ lists {name!r}, which lives in {home}: list it there instead"


def test_star_import_of_the_package():
    space: dict = {}
    exec("from discomfort import *", space)
    assert set(discomfort.__all__) <= set(space)
    assert space["ServerDiedError"] is errors.ServerDiedError and space["get_context"] is discomfort.get_context


def test_register_resolver_is_public():
    from discomfort import runs

    assert "register_resolver" in discomfort.__all__ and discomfort.register_resolver is runs.register_resolver


def test_run_contexts_are_typed():
    """get_context and Run.context name the RunContext protocol, not Any."""
    from discomfort import engine, runs

    hints = typing.get_type_hints(discomfort.get_context)
    assert hints["return"] is runs.SharedRunContext and runs.RunContext in runs.SharedRunContext.__mro__
    assert typing.get_type_hints(engine.RunEngine)["context"] is runs.RunContext
    for name in ("check_prompt", "save", "load", "allow_prompt"):
        assert hasattr(runs.SharedRunContext, name) and hasattr(discomfort.WorkflowContext, name)
