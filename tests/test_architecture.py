"""The package's shape, checked on the installed sources: imports point one way, private names
stay in their module, modules stay small enough to read."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.find_spec("discomfort")
assert SPEC is not None and SPEC.submodule_search_locations
ROOT = Path(list(SPEC.submodule_search_locations)[0])
PKG = "discomfort"

#: Modules over ~600 lines, and why.
LONG_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        if "node_pack" in rel.parts:  # the ComfyUI folder shipped as data, loaded by ComfyUI
            continue
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every import of this package, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    base = _package_of(module)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == PKG or target.startswith(PKG + "."):
                found += [(target, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names
                      if a.name == PKG or a.name.startswith(PKG + ".")]
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, name, _line in _imports(m):
            sub = f"{target}.{name}" if name else None
            dest = sub if sub in MODULES else target
            if dest in MODULES and dest != m:
                edges[m].add(dest)
    return edges


def test_the_walk_sees_the_package():
    assert {"discomfort.context", "discomfort.runs", "discomfort.remote.server", "discomfort.nodes.support"} \
        <= set(MODULES)
    assert "discomfort.context" in _edges()["discomfort.remote.server"]


def test_no_import_cycles():
    """Layers point one way; a package importing its own children is the only way down."""
    edges = _edges()

    def upward(a: str, b: str) -> bool:  # a parent package importing its child is not a cycle
        return b.startswith(a + ".")

    graph = {m: {t for t in ts if not upward(m, t)} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    """A leading underscore means: this module's own. Private modules serve their own package."""
    bad = []
    for m in MODULES:
        for target, name, line in _imports(m):
            if name is None or not name.startswith("_") or name.startswith("__"):
                continue
            sub = f"{target}.{name}"
            if sub in MODULES and (m.startswith(target + ".") or _package_of(m) == target):
                continue  # a private module of the importer's own package
            bad.append(f"{m}:{line} imports {name} from {target}")
    assert not bad, "\n".join(bad)


def test_submodules_never_import_the_package_root():
    bad = [f"{m}:{line}" for m in MODULES if m != PKG for target, name, line in _imports(m)
           if target == PKG and (name is None or f"{PKG}.{name}" not in MODULES)]
    assert not bad, "import of the package root from inside it: " + ", ".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    lines = len(MODULES[module].read_text().splitlines())
    if module in LONG_MODULES:
        return
    assert lines <= 650, f"{module} has {lines} lines (add it to LONG_MODULES with the reason, or split it)"


#: The steps of the run loop (plan, stitch, let a prompt use the run, check inputs, until, a cut
#: run's message, releases): called by the engine only.
RUN_STEPS = {"plan_workflows", "port_io", "prepare_prompt", "missing_inputs_error", "prompt_as_run",
             "allow_prompt", "revoke_prompt", "stitch_recipe", "extract", "until_holds", "cut_error",
             "plan_releases", "check_recipe"}


def _calls(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            out.add(fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else "")
    return out


def test_the_run_loop_exists_once():
    """Run and RayRun are thin over discomfort.engine: no second copy of the run steps in
    sequential or distributed/ (a placement says where a workflow runs, nothing more)."""
    thin = ["discomfort.sequential"] + [m for m in MODULES if m.startswith("discomfort.distributed")]
    copies = {m: sorted(_calls(m) & RUN_STEPS) for m in thin}
    assert not any(copies.values()), {m: c for m, c in copies.items() if c}
    engine = _calls("discomfort.engine")
    assert RUN_STEPS <= engine, RUN_STEPS - engine
    assert "discomfort.engine" in _edges()["discomfort.distributed._runner"]
    assert "discomfort.engine" in _edges()["discomfort.sequential"]
    assert not {m for m in _edges()["discomfort.engine"] if m.startswith("discomfort.distributed")}
    # the wording of a run's errors lives in one module
    said = [m for m in MODULES if "did not save a value" in MODULES[m].read_text()]
    assert said == ["discomfort.engine"], said


def test_the_engine_does_not_import_ray():
    import subprocess
    import sys

    code = ("import sys, discomfort.engine, discomfort.sequential; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
