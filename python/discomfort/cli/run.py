"""discomfort run: run workflows from the command line, inputs read from files, outputs written to files.

    discomfort run WORKFLOW... [--iterations N] [--until KEY] [--input KEY=FILE ...] --output-dir DIR
                   (--server URL | --comfyui PATH) [--transport auto|shm|http] [--timeout S]
                   [--keep KEY ...] [--set NODE.INPUT=VALUE ...] [--input-dir KEY=DIR] [--controls fixed]

--keep KEY writes KEY's value after every iteration ({key}_it001..., as the outputs below).
--set NODE.INPUT=VALUE sets a widget of the node with that id or title (VALUE is read as JSON,
else as text), in every workflow that has the node. --input-dir KEY=DIR runs once per input file
in DIR (several: files paired by name), each run's outputs in DIR/<file name>/; the widgets'
seed controls go on from one run to the next, as the editor's queue does. --controls fixed: no
"control after generate" changes a widget between iterations.

Inputs, by the file's extension: .png/.jpg/.jpeg/.webp -> IMAGE tensor [1,H,W,3] float32 in 0..1
(RGB; alpha dropped), .npy -> tensor, .pt -> torch.load(weights_only=True), .safetensors ->
its single tensor or a dict (a dict written by this command comes back whole, with its .json
part), .txt -> str, .json -> the JSON value (always data: JSON shaped like a recipe is not one).

Outputs, one or more files per unique_id in DIR: IMAGE-like tensors ([B,H,W,C], C in 1/3/4,
float) -> {key}_{i:03d}.png per batch item, MASK-like ([B,H,W], float) -> grayscale PNGs,
other tensors and arrays -> .npy (.pt for dtypes numpy lacks, such as bfloat16), dicts holding
tensors (LATENT) -> .safetensors plus .json for the other entries, str -> .txt, plain JSON data
-> .json, a reference's recipe -> its JSON (.json; ``Recipe.from_json`` reads it back in Python),
anything else -> .pkl (cloudpickle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from .. import _settings
from .common import check_output_path, read_json_file
from .loops import apply_sets, input_dir_jobs, parse_set_spec
from .._names import safe_file_stem, unique_stem
from ..recipes import Recipe

__all__ = ["add_run_parser", "run_command", "load_input", "parse_input_spec", "write_output",
           "write_outputs", "IMAGE_EXTENSIONS", "INPUT_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + (".npy", ".pt", ".safetensors", ".txt", ".json")

_KIND = "discomfort.kind"  # safetensors metadata written for dicts
_JSON_PART = "discomfort.json"


# ---------------------------------------------------------------------------------------- inputs


def parse_input_spec(spec: str) -> tuple[str, Path]:
    """``KEY=FILE`` -> (key, path)."""
    key, sep, path = spec.partition("=")
    if not sep or not key or not path:
        raise ValueError(f"--input {spec!r}: expected KEY=FILE, e.g. image=photo.png")
    return key, Path(path).expanduser()


def _need(module: str, what: str, package: str | None = None) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {package or module} (pip install {package or module})") from exc


def load_input(path: os.PathLike | str) -> Any:
    """The value a file holds, chosen by its extension (see the module docstring)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in INPUT_EXTENSIONS:
        raise ValueError(f"{path}: unsupported input type {ext or '(no extension)'!r}; "
                         f"supported: {', '.join(INPUT_EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if ext in IMAGE_EXTENSIONS:
        return _load_image(path)
    if ext == ".txt":
        return path.read_text(encoding="utf-8")
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    torch = _need("torch", f"reading {path.name}")
    if ext == ".npy":
        np = _need("numpy", f"reading {path.name}")
        array = np.load(path, allow_pickle=False)
        try:
            return torch.from_numpy(array)
        except (TypeError, ValueError):
            if not array.dtype.isnative:
                return torch.from_numpy(array.astype(array.dtype.newbyteorder("=")))
            raise ValueError(f"{path}: numpy dtype {array.dtype} has no torch equivalent") from None
    if ext == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    return _load_safetensors(path)


def _load_image(path: Path) -> Any:
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise ImportError(f"reading the image {path.name} needs Pillow (pip install pillow)") from exc
    np = _need("numpy", f"reading the image {path.name}")
    torch = _need("torch", f"reading the image {path.name}")
    with Image.open(path) as opened:
        im = ImageOps.exif_transpose(opened)
        if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grayscale: keep its precision
            gray = np.asarray(im.convert("I"), dtype=np.float32) / np.float32(65535.0)
            array = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
        else:
            rgb = im.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]


def _load_safetensors(path: Path) -> Any:
    st = _need("safetensors", f"reading {path.name}")
    with st.safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get(_KIND) == "dict":
        value: dict = dict(tensors)
        part = metadata.get(_JSON_PART)
        if part:
            side = path.with_name(part)
            if side.is_file():
                with open(side, encoding="utf-8") as fh:
                    value.update(json.load(fh))
        return value
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    return tensors


# --------------------------------------------------------------------------------------- outputs


def _safe_stem(key: str) -> str:
    """A file stem for a key or an input's name: the same on every system, valid on Windows."""
    return safe_file_stem(key, 120)


def _is_jsonable(value: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_jsonable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_jsonable(v, depth + 1) for k, v in value.items())
    return False


def _tensor_type() -> Any:
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else ()


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} {'x'.join(str(int(n)) for n in shape)} {getattr(value, 'dtype', '')}".strip()
    return type(value).__name__


def _write_pngs(stem: str, t: Any, out: Path) -> list[Path]:
    """One PNG per batch item: [H,W] or [H,W,1] -> L, [H,W,3] -> RGB, [H,W,4] -> RGBA."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("writing IMAGE/MASK outputs as PNG needs Pillow (pip install pillow)") from exc
    pixels = (t.detach().to("cpu").float().clamp(0.0, 1.0) * 255.0).round().to(dtype=_torch().uint8).numpy()
    pixels = pixels.copy() if not pixels.flags.c_contiguous else pixels
    paths = []
    for i in range(pixels.shape[0]):
        item = pixels[i]
        if item.ndim == 3 and item.shape[-1] == 1:
            item = item[..., 0]
        image = Image.fromarray(item)
        p = out / f"{stem}_{i:03d}.png"
        image.save(p)
        paths.append(p)
    return paths


def _torch() -> Any:
    import torch

    return torch


def _write_tensor(stem: str, t: Any, out: Path) -> list[Path]:
    torch = _torch()
    if t.is_floating_point() and not t.is_complex():
        if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[0] > 0:
            return _write_pngs(stem, t, out)
        if t.dim() == 3 and t.shape[0] > 0:
            return _write_pngs(stem, t, out)
    data = t.detach().to("cpu").resolve_conj().resolve_neg()
    try:
        array = data.numpy()
    except (TypeError, RuntimeError):  # bfloat16, float8...: numpy has no such dtype
        p = out / f"{stem}.pt"
        torch.save(data.contiguous().clone(), p)
        return [p]
    return _write_npy(stem, array, out)


def _write_npy(stem: str, array: Any, out: Path) -> list[Path]:
    import numpy as np

    p = out / f"{stem}.npy"
    np.save(p, array, allow_pickle=False)
    return [p]


def _write_tensor_dict(stem: str, value: dict, out: Path) -> list[Path]:
    st = _need("safetensors.torch", "writing tensors to .safetensors", "safetensors")
    tensor_cls = _tensor_type()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in value.items() if isinstance(v, tensor_cls)}
    rest = {k: v for k, v in value.items() if not isinstance(v, tensor_cls)}
    paths = []
    metadata = {_KIND: "dict"}
    if rest:
        p = out / f"{stem}.json"
        with open(p, "w", encoding="utf-8") as f:
            json.dump(rest, f, indent=1, ensure_ascii=False)
        metadata[_JSON_PART] = p.name
        paths.append(p)
    seen: set = set()
    for k, t in list(tensors.items()):  # safetensors refuses tensors that share memory
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            tensors[k] = t.clone()
        seen.add(ptr)
    p = out / f"{stem}.safetensors"
    st.save_file(tensors, str(p), metadata=metadata)
    return [p, *paths]


def write_output(key: str, value: Any, out_dir: os.PathLike | str, stem: str | None = None) -> list[Path]:
    """Write one result to ``out_dir``; returns the files written (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or _safe_stem(key)
    tensor_cls = _tensor_type()
    np = sys.modules.get("numpy")
    if tensor_cls and isinstance(value, tensor_cls):
        return _write_tensor(stem, value, out)
    if np is not None and isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return _write_npy(stem, value, out)
    if isinstance(value, Recipe):
        value = value.to_json()
    if isinstance(value, str):
        p = out / f"{stem}.txt"
        p.write_text(value, encoding="utf-8")
        return [p]
    if (tensor_cls and isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
            and any(isinstance(v, tensor_cls) for v in value.values())
            and _is_jsonable({k: v for k, v in value.items() if not isinstance(v, tensor_cls)})):
        return _write_tensor_dict(stem, value, out)
    if _is_jsonable(value):
        p = out / f"{stem}.json"
        with open(p, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, ensure_ascii=False)
        return [p]
    import cloudpickle

    p = out / f"{stem}.pkl"
    with open(p, "wb") as f:
        cloudpickle.dump(value, f, protocol=5)
    return [p]


def write_outputs(results: dict, out_dir: os.PathLike | str) -> dict[str, list[Path]]:
    """Write every result; keys that map to the same file name get a numeric suffix."""
    used: set[str] = set()  # ignoring case: "Image" and "image" are one file on Windows and macOS
    written = {}
    for key, value in results.items():
        written[key] = write_output(key, value, out_dir, stem=unique_stem(_safe_stem(key), used))
    return written


# -------------------------------------------------------------------------------------- command


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run", help="run workflows in sequence/loops; inputs from files, outputs to files",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workflows", nargs="+", metavar="WORKFLOW", help="workflow JSON files (API or UI format), run in order")
    p.add_argument("--iterations", "-n", type=int, default=None, metavar="N",
                   help="run the sequence N times (default 1; with --until, the most times)")
    p.add_argument("--until", metavar="KEY", default=None,
                   help="stop after the iteration in which the BOOLEAN or INT an output port writes to KEY is true")
    p.add_argument("--input", "-i", action="append", default=[], metavar="KEY=FILE",
                   help="a value for the INPUT port KEY, read from FILE (repeatable)")
    p.add_argument("--output-dir", "-o", required=True, metavar="DIR", help="where the outputs are written")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="URL", help="a running ComfyUI server with the discomfort node pack")
    where.add_argument("--comfyui", metavar="PATH",
                       help="run this ComfyUI tree in this process as its main.py would: its GPU, custom "
                            "nodes and folders (default: $DISCOMFORT_COMFYUI)")
    p.add_argument("--transport", choices=_settings.TRANSPORTS, default=None,
                   help="how values reach a server (default: auto, or $DISCOMFORT_TRANSPORT)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="seconds allowed per workflow")
    p.add_argument("--keep", action="append", default=[], metavar="KEY",
                   help="write KEY's value after every iteration, numbered per iteration (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set a widget of a node (id or title) before the run; VALUE as JSON, else text (repeatable)")
    p.add_argument("--input-dir", action="append", default=[], metavar="KEY=DIR",
                   help="run once per input file in DIR, its value as KEY (several: files paired by name)")
    p.add_argument("--controls", choices=["fixed"], default=None,
                   help="fixed: no seed control changes a widget between iterations (default: each widget's own)")
    p.add_argument("--release-unused", action="store_true",
                   help="delete each value as soon as no later workflow reads it (less memory in long loops)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="show the progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show in-process ComfyUI's own log (start-up and nodes) on stderr")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="write in-process ComfyUI's own log to FILE (default: kept out of the terminal, "
                        "and named when the run fails)")
    p.set_defaults(func=run_command)
    return p


def _executor(args: argparse.Namespace) -> Any:
    if args.server:
        from ..comfy import ComfyServer

        return ComfyServer(args.server)
    path = args.comfyui or _settings.get("DISCOMFORT_COMFYUI")
    if path:
        if not Path(path).expanduser().is_dir():
            where = "--comfyui" if args.comfyui else "DISCOMFORT_COMFYUI="
            raise ValueError(f"{where}{'' if where.endswith('=') else ' '}{path}: no such folder; give the "
                             "ComfyUI folder (the one with main.py)")
        from ..comfy import InProcessComfy

        return InProcessComfy(path)
    raise ValueError("give --server URL (a running ComfyUI) or --comfyui PATH (ComfyUI in this process), "
                     "or set DISCOMFORT_COMFYUI")


class _ComfyLog:
    """In-process ComfyUI logs through the root logger (and prints a little): keep that out of
    the terminal unless asked (``--verbose``), in ``--log FILE`` or a temporary file that is named
    when the run fails and removed when it succeeds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.active = not args.server and not args.verbose
        self.verbose = args.verbose and not args.server
        self.path: str | None = args.log
        self.keep = args.log is not None
        self.handler: Any = None
        self.saved: Any = None

    def __enter__(self) -> "_ComfyLog":
        import logging

        root = logging.getLogger()
        if self.verbose:
            if not root.handlers:
                logging.basicConfig(level=logging.INFO, format="%(message)s")
            return self
        if not self.active:
            return self
        if self.path is None:
            import tempfile

            fd, self.path = tempfile.mkstemp(prefix="discomfort-comfyui-", suffix=".log")
            os.close(fd)
        self.handler = logging.FileHandler(self.path, mode="w", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.saved = (list(root.handlers), root.level)
        for h in self.saved[0]:
            root.removeHandler(h)
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: Any) -> None:
        import logging

        if self.handler is None:
            return
        root = logging.getLogger()
        root.removeHandler(self.handler)
        self.handler.close()
        for h in self.saved[0]:
            root.addHandler(h)
        root.setLevel(self.saved[1])

    def finish(self, ok: bool) -> str | None:
        """The line naming the log, or None (the temporary log of a run that succeeded is removed)."""
        if not self.active or self.path is None:
            return None
        if ok and not self.keep:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return None
        if not os.path.exists(self.path) or (not ok and os.path.getsize(self.path) == 0):
            return None
        return f"ComfyUI's log: {self.path}"


def _connection_failure(exc: BaseException, url: str | None) -> str | None:
    """A one-line reason when ``exc`` (or what caused it) is a connection that nothing answered."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    try:
        import requests

        refused: tuple[type, ...] = (requests.exceptions.ConnectionError, ConnectionRefusedError)
        timeouts: tuple[type, ...] = (requests.exceptions.Timeout,)
    except ImportError:
        refused, timeouts = (ConnectionRefusedError,), ()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if timeouts and isinstance(cur, timeouts) or isinstance(cur, TimeoutError) and url:
            return (f"the ComfyUI server at {url} did not answer in time: is it running and reachable? "
                    "(check the address given with --server)")
        if isinstance(cur, refused):
            return (f"nothing answers at {url}: is ComfyUI running there? Start it (python main.py) or give "
                    "its address with --server URL; --transport shm|http chooses how values travel")
        cur = cur.__cause__ or cur.__context__
    return None


def _cli_wording(text: str) -> str:
    """Library advice in Python syntax, as the command line's options."""
    return (text.replace("Pass transport='shm' or 'http'", "Pass --transport shm or --transport http")
            .replace("transport='shm' or 'http'", "--transport shm or --transport http")
            .replace("Use transport='http' (or 'auto')", "Use --transport http (or auto)")
            .replace("transport='http'", "--transport http").replace("transport='shm'", "--transport shm")
            .replace("pass it in inputs=", "give it with --input KEY=FILE"))


def run_command(args: argparse.Namespace) -> int:
    from ..errors import DiscomfortError, RunInterrupted

    log = _ComfyLog(args)
    ok = False
    try:
        with log:
            rc = _run(args)
        ok = rc == 0
        return rc
    except RunInterrupted as exc:
        print(f"discomfort run: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("discomfort run: interrupted", file=sys.stderr)
        return 130
    except (DiscomfortError, OSError, ValueError, ImportError, TimeoutError) as exc:
        reason = _connection_failure(exc, args.server) if args.server else None
        text = reason or _cli_wording(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        print(f"discomfort run: error: {text}", file=sys.stderr)
        return 1
    finally:
        line = log.finish(ok)
        if line:
            print(line, file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from ..sequential import Run

    if args.iterations is not None and args.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, not {args.iterations}")
    iterations = args.iterations if args.iterations is not None or args.until else 1
    for w in args.workflows:
        if not Path(w).is_file():
            raise FileNotFoundError(f"workflow file {w} does not exist")
        read_json_file(w, "workflow file")
    if args.log:
        check_output_path("--log", args.log)
    sets = [parse_set_spec(spec) for spec in args.set]
    inputs: dict[str, Any] = {}
    for spec in args.input:
        key, path = parse_input_spec(spec)
        if key in inputs:
            raise ValueError(f"--input {key}=... given twice")
        inputs[key] = load_input(path)
    jobs = input_dir_jobs(args.input_dir, inputs, INPUT_EXTENSIONS)
    executor = _executor(args)
    workflows: list[Any] = list(args.workflows)
    controls: Any = args.controls
    if sets:
        workflows, found = apply_sets(workflows, sets, executor.object_info())
        controls = controls or found or None
    with Run(executor, transport=args.transport) as run:
        for name, folder, files in jobs:
            out = Path(args.output_dir) / folder if folder else Path(args.output_dir)
            if name:
                print(f"{name}: {', '.join(str(p) for p in files.values())}")
            job_inputs = {**inputs, **{key: load_input(p) for key, p in files.items()}}
            results = run.execute(workflows, job_inputs, iterations, until=args.until, timeout=args.timeout,
                                  progress=args.progress, release_unused=args.release_unused, controls=controls,
                                  keep=args.keep)
            _report(args, results, out)
    return 0


def _report(args: argparse.Namespace, results: Any, out: Path) -> None:
    """Write a run's outputs (and each kept iteration's values) and say what was written."""
    written = write_outputs(results, out)
    count = 0
    for key, paths in written.items():
        for p in paths:
            print(f"{key}: {p} ({_describe(results[key])})")
            count += 1
    kept: set[str] = set()
    for key in dict.fromkeys(args.keep):
        stem = unique_stem(_safe_stem(key), kept)
        for i, value in enumerate(results.history.get(key, [])):
            for p in write_output(key, value, out, stem=f"{stem}_it{i + 1:03d}"):
                print(f"{key} (iteration {i + 1}): {p} ({_describe(value)})")
                count += 1
    print(f"{count} file(s) written to {out}")
    saved = [f for files in results.files for f in files if f["type"] == "output"]
    for f in saved:
        where = f["path"] or f"{Path(f['subfolder'], f['filename'])} (in the server's output folder)"
        print(f"saved by node {f['node']}: {where}")
    if args.until:
        why = f"{args.until} was true" if results.stopped == "until" else f"{args.until} stayed false"
        print(f"{results.iterations} iteration(s): {why}")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discomfort")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["run", *(list(argv) if argv is not None else sys.argv[1:])])
    return args.func(args)
