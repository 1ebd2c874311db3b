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


# ------------------------------------------------------------------ the layers (docs/ARCHITECTURE.md)

#: The layers of docs/ARCHITECTURE.md, bottom first, each module or package (all its modules) in
#: one; where a package's module sits elsewhere, the longer name wins. An import, at any depth of
#: a function, points down or within its layer.
LAYERS: list[tuple[str, list[str]]] = [
    ("platform and names", ["discomfort._platform", "discomfort._names", "discomfort._types", "discomfort._version",
                            "discomfort._settings", "discomfort._runfiles", "discomfort._aliases", "discomfort.errors",
                            "discomfort.sysinfo"]),
    ("store backends", ["discomfort._backend", "discomfort._pystore", "discomfort._localstore", "discomfort._sweep"]),
    ("values and prompts", ["discomfort.codecs", "discomfort.datacodec", "discomfort.prompt_forms",
                            "discomfort.workflows"]),
    ("runs", ["discomfort.runs", "discomfort.run_control", "discomfort.context", "discomfort.distributed",
              "discomfort.distributed._context", "discomfort.distributed._directory", "discomfort.distributed._ray"]),
    # workflows.tools chooses an executor and a transport: it resolves a URL to a ComfyServer
    ("executors and transports", ["discomfort.comfy", "discomfort.remote", "discomfort.workflows.tools"]),
    ("running workflows", ["discomfort.sequential", "discomfort.engine", "discomfort.recipes", "discomfort.controls",
                           "discomfort.history", "discomfort.reuse", "discomfort.parallel",
                           "discomfort.distributed._runner", "discomfort.distributed._pool"]),
    ("panel, node side, command line", ["discomfort", "discomfort.panel", "discomfort.nodes", "discomfort.cli",
                                        "discomfort.bench", "discomfort.doctor", "discomfort.distributed.bench"]),
]

#: Imports across the layers all the same: (importer, imported) -> why. None today.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}

#: The two sides never import each other; they meet below (context, runs, the served half of
#: remote/). The panel is above both (it runs a sequential.Run on a ComfyServer, served from the
#: ComfyUI process): the node pack folder adds its routes, no module of the package imports it.
NODE_SIDE = ["discomfort.nodes"]
ORCHESTRATOR_SIDE = ["discomfort.comfy", "discomfort.remote.client", "discomfort.workflows.tools", "discomfort.cli",
                     *dict(LAYERS)["running workflows"]]
PANEL = ["discomfort.panel"]


def _in(module: str, names: list[str]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _layer(module: str) -> int | None:
    found = [(len(n), i) for i, (_, names) in enumerate(LAYERS) for n in names
             if module == n or module.startswith(n + ".")]
    return max(found)[1] if found else None


def _import_edges() -> list[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of a module of the package, at any depth."""
    out = set()
    for m in MODULES:
        for target, name, line in _imports(m):
            sub = f"{target}.{name}" if name else None
            dest = sub if sub in MODULES else target
            if dest in MODULES and dest != m:
                out.add((m, dest, line))
    return sorted(out)


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _layer(m) is None], "add these to LAYERS (docs/ARCHITECTURE.md says where)"
    named = [n for _, names in LAYERS for n in names]
    assert len(named) == len(set(named)) and set(named) <= set(MODULES), \
        sorted(set(named) - set(MODULES)) or "a name in two layers"
    assert set(LAYER_EXCEPTIONS) <= {(m, d) for m, d, _ in _import_edges()}, "an exception nothing needs any more"


def test_imports_point_down_the_layers():
    up = [f"{m}:{line} imports {d} ({LAYERS[_layer(d)][0]}, above {LAYERS[_layer(m)][0]})"  # type: ignore[index]
          for m, d, line in _import_edges()
          if _layer(d) > _layer(m) and (m, d) not in LAYER_EXCEPTIONS]  # type: ignore[operator]
    assert not up, "\n".join(up)


def test_the_node_side_and_the_orchestrator_side_never_import_each_other():
    assert _in("discomfort.sequential", ORCHESTRATOR_SIDE) and _in("discomfort.nodes.support", NODE_SIDE)
    crossed = [f"{m}:{line} imports {d}" for m, d, line in _import_edges()
               if (_in(m, NODE_SIDE) and (_in(d, ORCHESTRATOR_SIDE) or _in(d, PANEL)))
               or (_in(m, ORCHESTRATOR_SIDE) and (_in(d, NODE_SIDE) or _in(d, PANEL)))
               or (_in(d, PANEL) and not _in(m, PANEL))]
    assert not crossed, "\n".join(crossed)


def test_the_old_import_paths_give_the_new_modules():
    """discomfort.cli_run and the other paths from before the grouping are the very same modules."""
    import importlib
    import sys

    from discomfort._aliases import MOVED

    assert MOVED and all(new in MODULES for new in MOVED.values()), sorted(set(MOVED.values()) - set(MODULES))
    checked = 0
    for old, new in sorted(MOVED.items()):
        try:
            module = importlib.import_module(new)
        except ModuleNotFoundError as exc:  # a third-party package this environment lacks (aiohttp)
            assert exc.name and not exc.name.startswith(PKG), exc
            continue
        assert importlib.import_module(old) is module and sys.modules[old] is module, old
        checked += 1
    assert checked >= len([m for m in MOVED if "workflow_" in m]), "the workflow format's need nothing else"


#: Modules and packages at the top of python/discomfort/: 33 once the command line, the workflow
#: format and the panel were grouped into packages, then _settings, _localstore and _runfiles.
#: A new concern goes into a package (or grows one), not beside the others.
TOP_LEVEL_MAX = 36


def test_the_top_level_stays_readable():
    top = sorted(p.name for p in ROOT.iterdir()
                 if p.suffix == ".py" or (p.is_dir() and p.name != "node_pack" and (p / "__init__.py").exists()))
    assert "cli" in top and "workflows" in top and "panel" in top
    assert len(top) <= TOP_LEVEL_MAX, f"{len(top)} modules at the top of discomfort/: {', '.join(top)}"


def test_the_native_backend_does_not_load_the_python_twin():
    """The sweep and doctor's checks are backend-neutral (_runfiles): on the native backend,
    import discomfort loads no module of discomfort._pystore."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys, discomfort, discomfort.doctor; print(json.dumps([discomfort.backend, "
            "sorted(m for m in sys.modules if m.startswith('discomfort._pystore'))]))")
    env = {**os.environ, "DISCOMFORT_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    backend, twin = json.loads(done.stdout.strip().splitlines()[-1])
    if backend != "native":
        pytest.skip(f"the native core does not run here (backend {backend})")
    assert twin == [], twin
