"""Every iteration's results, not only the last: kept values (``keep=``), the files ComfyUI's
output nodes wrote (``result.files``), the controlled widget values used (``result.controls``)
and the ``on_iteration`` callback.

A run's store holds one value per key, replaced by the next iteration; ``keep=["image"]`` copies
the key's value into this process after each iteration (``result.history["image"]``), counted
against the run's RAM budget so a long loop fails with a clear error instead of exhausting memory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ReferenceUnavailableError, StoreFullError, UnknownKeyError, WorkflowError
from .run_control import RunValues
from .runs import RunContext

__all__ = ["IterationValues", "Recorder", "OnIteration", "output_files", "owned_copy", "check_keep", "ram_budget_of"]

OnIteration = Callable[[int, Mapping[str, Any]], Any]


def check_keep(keep: Any) -> list[str]:
    """``keep=`` as a list of keys (a single key may be given as a str)."""
    if keep is None:
        return []
    keys = [keep] if isinstance(keep, str) else keep
    try:
        keys = list(dict.fromkeys(keys))
    except TypeError:
        raise TypeError(f"keep= is a list of keys, not {keep!r}") from None
    bad = [k for k in keys if not isinstance(k, str) or not k]
    if bad:
        raise TypeError(f"keep= names keys (non-empty strings), not {bad[0]!r}")
    return keys


def owned_copy(value: Any, depth: int = 0) -> tuple[Any, int]:
    """A copy of ``value`` that owns its memory (a loaded value may be a view into the run's
    store, which the next iteration reuses), and about how many bytes it holds."""
    if depth > 64:
        raise ValueError("keep=: the value nests more than 64 levels deep")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().clone(), value.numel() * value.element_size()
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return value.copy(), int(value.nbytes)
    if isinstance(value, (bytes, str)):
        return value, len(value)
    if isinstance(value, (bytearray, memoryview)):
        data = bytes(value)
        return data, len(data)
    if isinstance(value, dict):
        out, size = {}, sys.getsizeof(value)
        for k, v in value.items():
            out[k], n = owned_copy(v, depth + 1)
            size += n
        return (type(value)(out) if type(value) is not dict else out), size
    if isinstance(value, (list, tuple)):
        items, size = [], sys.getsizeof(value)
        for v in value:
            c, n = owned_copy(v, depth + 1)
            items.append(c)
            size += n
        return (items if isinstance(value, list) else type(value)(items) if type(value) is tuple
                else value.__class__(*items)), size
    import copy

    return copy.deepcopy(value), sys.getsizeof(value)


def output_files(outputs: Any, workflow: int, output_dir: Any) -> list[dict]:
    """The files of ComfyUI's outputs of a prompt (``{node_id: ui_output}``): one dict per file,
    {"node", "filename", "subfolder", "type", "workflow", "path"}; ``path`` is absolute for files
    of ``"type": "output"`` when the output folder is known, else None."""
    if not isinstance(outputs, Mapping):
        return []
    root = Path(output_dir).resolve() if output_dir else None
    files = []
    for node, ui in outputs.items():
        if not isinstance(ui, Mapping):
            continue
        for items in ui.values():
            for item in items if isinstance(items, (list, tuple)) else ():
                if not isinstance(item, Mapping) or not isinstance(item.get("filename"), str):
                    continue
                subfolder = item.get("subfolder") or ""
                kind = item.get("type") or "output"
                files.append({"node": str(node), "filename": item["filename"], "subfolder": str(subfolder),
                              "type": str(kind), "workflow": workflow,
                              "path": _inside(root, str(subfolder), item["filename"]) if kind == "output" else None})
    return files


def _inside(root: Path | None, subfolder: str, filename: str) -> str | None:
    """``root/subfolder/filename``, or None when the root is not known or the name leaves it."""
    if root is None:
        return None
    path = (root / subfolder / filename).resolve()
    return str(path) if path.is_relative_to(root) and path != root else None


class IterationValues(RunValues):
    """What ``on_iteration(iteration, values)`` gets: the run's current values (read-only, loaded
    when asked for, as ``until``'s), with this iteration's ``files`` and ``controls``."""

    def __init__(self, ctx: RunContext, iteration: int, files: list[dict], controls: list[dict]) -> None:
        super().__init__(ctx)
        self.iteration = iteration
        self.files = files
        self.controls = controls


class Recorder:
    """Collects a call's per-iteration results into its :class:`~discomfort.engine.Result`."""

    def __init__(self, result: Any, ctx: RunContext, keep: list[str], on_iteration: OnIteration | None,
                 load: Callable[[str], Any], budget: Callable[[], int]) -> None:
        if on_iteration is not None and not callable(on_iteration):
            raise TypeError(f"on_iteration= is a function (iteration, values), not {on_iteration!r}")
        self.result, self.ctx, self.keep, self.on_iteration = result, ctx, keep, on_iteration
        self._load, self._budget = load, budget
        self._limit: int | None = None
        self.kept_bytes = 0
        self.result.history = {k: [] for k in keep}
        self.files: list[dict] = []
        self.controls: list[dict] = []

    def workflow_done(self, k: int, outputs: Any, output_dir: Any, used: dict[str, Any]) -> None:
        self.files += output_files(outputs, k, output_dir)
        self.controls.append(used)

    def iteration_done(self, iteration: int) -> None:
        """After an iteration: its files and controls, the kept values, then ``on_iteration``."""
        files, controls = self.files, self.controls
        self.files, self.controls = [], []
        self.result.files.append(files)
        self.result.controls.append(controls)
        for uid in self.keep:
            self._keep(uid, iteration)
        if self.on_iteration is not None:
            self.on_iteration(iteration, IterationValues(self.ctx, iteration, files, controls))

    def _keep(self, uid: str, iteration: int) -> None:
        try:
            value = self._load(uid)
        except ReferenceUnavailableError as exc:
            raise WorkflowError(f"keep=[{uid!r}]: the value is a reference to an object in the ComfyUI server's "
                                "process; it cannot be kept per iteration in this one") from exc
        except UnknownKeyError:
            raise UnknownKeyError(f"keep=[{uid!r}]: no value is stored under that key after iteration "
                                  f"{iteration + 1}") from None
        kept, size = owned_copy(value)
        if self._limit is None:
            self._limit = self._budget()
        if self.kept_bytes + size > self._limit:
            n = sum(len(v) for v in self.result.history.values())
            raise StoreFullError(
                f"keep=: the kept values would take {self.kept_bytes + size} bytes after iteration "
                f"{iteration + 1} ({n} kept so far), over the run's RAM budget of {self._limit} bytes; "
                "keep fewer keys or iterations, or give a larger ram_budget= (or $DISCOMFORT_RAM_BUDGET)")
        self.kept_bytes += size
        self.result.history[uid].append(kept)


def ram_budget_of(ctx: RunContext) -> int:
    """The run's RAM budget (its store's; a Ray run: this machine's default)."""
    try:
        budget = ctx.stats().get("ram_budget")
    except Exception:  # noqa: BLE001 - a context without stats: the machine's budget
        budget = None
    if isinstance(budget, int) and budget > 0:
        return budget
    from .sysinfo import ram_budget

    return ram_budget(None)

