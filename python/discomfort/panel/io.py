"""Files of the editor panel (:mod:`.panel`): names inside ComfyUI's folders, inputs, outputs.

Every name a client sends is checked here before it touches the disk: a relative name made of
plain parts (no ``..``, no absolute path, no backslash, no NUL), that resolves (symlinks
followed) inside its folder, to a regular file. Input files are decoded as data only: images
with Pillow, ``.npy`` without pickles, ``.json``, ``.txt``. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from .. import _settings, errors
from .._names import safe_file_stem, unique_stem, windows_name_problem
from .._platform import PLATFORM
from ..errors import InvalidName

__all__ = ["PanelLimits", "OutputBudget", "InvalidName", "safe_file", "list_files", "load_input", "input_bytes", "read_json",
           "json_depth", "check_subgraphs", "typed_value", "save_outputs", "IMAGE_EXTENSIONS", "INPUT_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# What Pillow may read behind each: it goes by the content, and a ".png" holding PostScript would
# be handed to Ghostscript (EPS), or to any of its other decoders.
_PIL_FORMATS = {".png": ["PNG"], ".jpg": ["JPEG"], ".jpeg": ["JPEG"], ".webp": ["WEBP"], ".bmp": ["BMP"],
                ".gif": ["GIF"]}
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + (".npy", ".json", ".txt")
_DRIVE = re.compile(r"^[A-Za-z]:")
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


_setting = _settings.setting_field  # a field whose default is the setting's (discomfort._settings)


@dataclass
class PanelLimits:
    """What one panel request may ask: the fields made with ``_setting`` are settings, their
    defaults written once in discomfort._settings (docs/SETTINGS.md); :meth:`from_env` reads them."""

    max_workflows: int = _setting("DISCOMFORT_PANEL_MAX_WORKFLOWS")  # workflows in one run
    max_iterations: int = _setting("DISCOMFORT_PANEL_MAX_ITERATIONS")
    max_runs: int = _setting("DISCOMFORT_PANEL_MAX_RUNS")  # runs going at once, all clients together
    max_runs_per_address: int = _setting("DISCOMFORT_PANEL_MAX_RUNS_PER_ADDRESS")  # from one client address
    cancel_grace: float = _setting("DISCOMFORT_PANEL_CANCEL_GRACE")  # seconds a cancelled run may hold its slot
    max_run_input_bytes: int = _setting("DISCOMFORT_PANEL_MAX_RUN_INPUT_BYTES")  # decoded inputs of one run
    max_json_file: int = 16 << 20  # bytes of a .json input
    max_json_depth: int = 64  # nesting of a .json input or a saved workflow
    max_subgraph_depth: int = 32  # subgraphs inside subgraphs in a saved workflow
    max_expanded_nodes: int = 20000  # nodes of a saved workflow once its subgraphs are expanded
    max_body: int = 64 << 10  # bytes of a request's JSON body
    max_name: int = 255  # characters of a file name (with its folders)
    max_inputs: int = 64  # bound inputs of one run
    max_input_file: int = _setting("DISCOMFORT_PANEL_MAX_INPUT_FILE")  # bytes of one input file
    max_pixels: int = 64 << 20  # pixels of one input image
    max_value_chars: int = 64 << 10  # characters of a typed value
    max_workflow_file: int = 16 << 20  # bytes of a saved workflow
    max_listed: int = 2000  # files a listing returns
    max_output_files: int = 512  # files one run writes
    history_files: int = _setting("DISCOMFORT_PANEL_HISTORY_FILES")  # per-iteration output files one run shows
    history_bytes: int = _setting("DISCOMFORT_PANEL_HISTORY_BYTES")  # bytes of per-iteration files one run writes
    kept_runs: int = 32  # finished runs remembered for listing, per server

    @classmethod
    def from_env(cls) -> "PanelLimits":
        lim: PanelLimits = _settings.from_settings(cls)
        return lim


class OutputBudget:
    """What a run may still write of its per-iteration outputs: files and bytes (its history)."""

    def __init__(self, files: int, nbytes: int) -> None:
        self.files, self.bytes = files, nbytes

    @classmethod
    def history(cls, limits: PanelLimits) -> "OutputBudget":
        return cls(limits.history_files, limits.history_bytes)

    @property
    def spent(self) -> bool:
        return self.files < 1 or self.bytes < 1

    def take(self, nbytes: int) -> bool:
        """Count one file of ``nbytes`` if it fits; False (and nothing counted) if not."""
        if self.files < 1 or nbytes > self.bytes:
            return False
        self.files -= 1
        self.bytes -= nbytes
        return True

    def note(self, limits: PanelLimits) -> str:
        return (f"not saved: over the run's {limits.history_files} files or {limits.history_bytes} bytes of "
                "per-iteration outputs (DISCOMFORT_PANEL_HISTORY_FILES, DISCOMFORT_PANEL_HISTORY_BYTES)")


def safe_file(root: str | os.PathLike, name: Any, what: str, limits: PanelLimits,
              extensions: Iterable[str] | None = None) -> str:
    """The real path of the regular file ``name`` inside ``root``; raises :class:`InvalidName`
    (400) for a name that is not a plain relative name inside it, FileNotFoundError (404) when
    there is no such file."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what}: a name must be a non-empty string, not {name!r:.60}")
    if len(name) > limits.max_name:
        raise InvalidName(f"{what}: a name is at most {limits.max_name} characters")
    if "\x00" in name or "\\" in name or name.startswith(("/", "~")) or _DRIVE.match(name) or os.path.isabs(name):
        raise InvalidName(f"{what} {name!r}: only a relative name inside the folder (no absolute path, "
                          "backslash, ~ or NUL)")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidName(f"{what} {name!r}: '..', '.' and empty parts are not allowed in a name")
    if PLATFORM == "win32":  # Windows would open a device, a stream or another file instead
        for part in parts:
            problem = windows_name_problem(part)
            if problem:
                raise InvalidName(f"{what} {name!r}: {problem}")
    if extensions is not None and not name.lower().endswith(tuple(extensions)):
        raise InvalidName(f"{what} {name!r}: expected one of {', '.join(extensions)}")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, *parts))
    if os.path.commonpath([base, real]) != base or real == base:
        raise InvalidName(f"{what} {name!r}: it leads out of its folder (a symlink?)")
    if not os.path.isfile(real):
        raise FileNotFoundError(f"{what} {name!r}: no such file")
    return real


def list_files(root: str | os.PathLike, extensions: Iterable[str], limits: PanelLimits) -> list[dict]:
    """Regular files under ``root`` with those extensions (symlinks leading out are left out):
    ``[{"name", "size", "modified"}]``, sorted by name."""
    base = os.path.realpath(root)
    exts = tuple(extensions)
    out: list[dict] = []
    if not os.path.isdir(base):
        return out
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.lower().endswith(exts) or fn.startswith("."):
                continue
            full = os.path.join(dirpath, fn)
            real = os.path.realpath(full)
            if os.path.commonpath([base, real]) != base or not os.path.isfile(real):
                continue
            st = os.stat(real)
            out.append({"name": os.path.relpath(full, base).replace(os.sep, "/"), "size": st.st_size,
                        "modified": st.st_mtime})
            if len(out) >= limits.max_listed:
                return out
    return out


# ------------------------------------------------------------------------------------- inputs


def json_depth(text: str) -> int:
    """How deep ``text``'s arrays and objects nest, counted without recursion (strings skipped)."""
    import numpy as np

    raw = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8", "replace"), np.uint8)
    step = (raw == ord("[")).astype(np.int32) + (raw == ord("{"))
    step -= (raw == ord("]")).astype(np.int32) + (raw == ord("}"))
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def read_json(text: str, what: str, limits: PanelLimits) -> Any:
    """``text`` as JSON, refused (400) when it nests deeper than ``limits.max_json_depth`` (checked
    before parsing: Python's parser recurses) or is not JSON."""
    depth = json_depth(text)
    if depth > limits.max_json_depth:
        raise errors.DiscomfortError(f"{what} nests {depth} levels deep, over the limit of {limits.max_json_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise errors.DiscomfortError(f"{what} is not valid JSON ({exc})") from None


def check_subgraphs(workflow: Any, what: str, limits: PanelLimits) -> None:
    """Refuse (400) a UI workflow whose subgraphs nest deeper than ``limits.max_subgraph_depth``
    or expand to more than ``limits.max_expanded_nodes`` nodes (two instances per level double
    them), counted without recursion before the conversion expands them."""
    if not isinstance(workflow, dict):
        return
    raw = (workflow.get("definitions") or {}).get("subgraphs") if isinstance(workflow.get("definitions"), dict) else None
    defs = {sg["id"]: sg for sg in raw or () if isinstance(sg, dict) and "id" in sg and isinstance(sg["id"], str)}

    def inner(graph: Any) -> list[str]:
        nodes = graph.get("nodes") if isinstance(graph, dict) else None
        return [n["type"] for n in nodes or () if isinstance(n, dict) and n.get("type") in defs]

    sizes: dict[str, tuple[int, int]] = {}  # id -> (expanded nodes, depth)
    for start in defs:  # an iterative depth-first walk; a cycle is left to the conversion to name
        stack, seen = [start], {start}
        while stack:
            sid = stack[-1]
            todo = [c for c in inner(defs[sid]) if c not in sizes and c not in seen]
            if todo:
                seen.update(todo)
                stack.extend(todo)
                continue
            stack.pop()
            subs = [sizes.get(c, (0, 0)) for c in inner(defs[sid])]
            nodes = len((defs[sid].get("nodes") or ())) + sum(n for n, _ in subs)
            sizes[sid] = (min(nodes, 1 << 62), 1 + max((d for _, d in subs), default=0))
    subs = [sizes[c] for c in inner(workflow)]
    total = len(workflow.get("nodes") or ()) + sum(n for n, _ in subs)
    depth = max((d for _, d in subs), default=0)
    if depth > limits.max_subgraph_depth:
        raise errors.DiscomfortError(f"{what}: subgraphs nest {depth} levels deep, over the limit of "
                                     f"{limits.max_subgraph_depth}")
    if total > limits.max_expanded_nodes:
        raise errors.DiscomfortError(f"{what}: its subgraphs expand to {total} nodes, over the limit of "
                                     f"{limits.max_expanded_nodes}")


def _check_size(path: str, limits: PanelLimits) -> int:
    size = os.path.getsize(path)
    cap = limits.max_json_file if path.lower().endswith(".json") else limits.max_input_file
    if size > cap:
        raise errors.RemoteLimitError(f"{os.path.basename(path)} is {size} bytes, over the limit of {cap}"
                                      + ("" if path.lower().endswith(".json") else " (DISCOMFORT_PANEL_MAX_INPUT_FILE)"))
    return size


def input_bytes(path: str, port_type: str, limits: PanelLimits) -> int:
    """The bytes ``path`` takes once decoded for a port of ``port_type``, read from its header
    (nothing is decoded): float32 pixels of an image, an array's data, 8 per byte of JSON."""
    size = _check_size(path, limits)
    lower = path.lower()
    name = os.path.basename(path)
    if lower.endswith(IMAGE_EXTENSIONS):
        from PIL import Image

        try:
            with _open_image(path) as img:
                w, h = img.size
        except (OSError, Image.DecompressionBombError) as exc:
            raise errors.DiscomfortError(f"{name}: not an image Pillow can read ({exc})") from None
        if w * h > limits.max_pixels:
            raise errors.RemoteLimitError(f"{name} has {w}x{h} pixels, over the limit of {limits.max_pixels}")
        return w * h * (1 if port_type == "MASK" else 3) * 4
    if lower.endswith(".npy"):
        import numpy as np

        with open(path, "rb") as f:
            try:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f".npy format version {version} is not read here (1.0 and 2.0 are)")
                shape, _, dtype = reader(f)
            except (ValueError, OSError) as exc:
                raise errors.DiscomfortError(f"{name}: not a plain .npy array ({exc})") from None
        if dtype.hasobject:
            raise errors.DiscomfortError(f"{name}: an array of Python objects is not data")
        if any(int(d) < 0 for d in shape):
            raise errors.DiscomfortError(f"{name}: its header gives a negative dimension {tuple(shape)}")
        # Python ints: an int64 product of a lying shape wraps (to 0 or below), and would take
        # bytes off the run's budget
        return math.prod(int(d) for d in shape) * dtype.itemsize
    return size * 8 if lower.endswith(".json") else size


def load_input(path: str, port_type: str, limits: PanelLimits) -> Any:
    """The value of an input file for a port of ``port_type``: an image as IMAGE ``[1,H,W,3]``
    (or MASK ``[1,H,W]``: its alpha channel if it has one, else its luminance), ``.npy`` as a
    tensor (no pickles), ``.json`` as its value, ``.txt`` as a string."""
    _check_size(path, limits)
    lower = path.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return _load_image(path, port_type, limits)
    if lower.endswith(".npy"):
        import numpy as np
        import torch

        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise errors.DiscomfortError(f"{os.path.basename(path)}: not a plain .npy array ({exc})") from None
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        return {"samples": tensor} if port_type == "LATENT" else tensor
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if lower.endswith(".json"):
        return read_json(text, os.path.basename(path), limits)
    return text


def _load_image(path: str, port_type: str, limits: PanelLimits) -> Any:
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        with _open_image(path) as opened:
            img: Any = opened
            if img.width * img.height > limits.max_pixels:
                raise errors.DiscomfortError(f"{os.path.basename(path)} has {img.width}x{img.height} pixels, "
                                             f"over the limit of {limits.max_pixels}")
            img = ImageOps.exif_transpose(img)
            if port_type == "MASK":
                img = img.getchannel("A") if "A" in img.getbands() else img.convert("L")
            else:
                img = img.convert("RGB")
            # uint8 pixels, then one float32 tensor divided in place: no float64, no extra copies
            pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
            del img
            out = torch.empty(pixels.shape, dtype=torch.float32)
            out.copy_(pixels).div_(255.0)
            return out[None]
    except (OSError, Image.DecompressionBombError) as exc:
        raise errors.DiscomfortError(f"{os.path.basename(path)}: not an image Pillow can read ({exc})") from None


def _open_image(path: str) -> Any:
    """``path`` opened by Pillow as the format its extension names, and no other."""
    from PIL import Image

    formats = _PIL_FORMATS[os.path.splitext(path)[1].lower()]
    try:
        return Image.open(path, formats=formats)
    except Image.UnidentifiedImageError:
        raise errors.DiscomfortError(f"{os.path.basename(path)}: not a {' or '.join(formats)} image (only its "
                                     "extension's format is read)") from None


def typed_value(value: Any, port_type: str, key: str, limits: PanelLimits) -> Any:
    """A value typed in the panel, checked against the port's type (JSON scalars and lists only)."""
    if isinstance(value, str) and len(value) > limits.max_value_chars:
        raise ValueError(f"input {key!r}: a typed value is at most {limits.max_value_chars} characters")
    if port_type in ("IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING"):
        raise ValueError(f"input {key!r} is a {port_type}: bind a file from ComfyUI's input folder, not a typed value")
    if port_type == "INT":
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"input {key!r} is an INT: {value!r:.40} is not an integer") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"input {key!r} is an INT, not {value!r:.40}")
        return value
    if port_type == "FLOAT":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"input {key!r} is a FLOAT: {value!r:.40} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"input {key!r} is a FLOAT, not {value!r:.40}")
        return float(value)
    if port_type == "BOOLEAN":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"input {key!r} is a BOOLEAN: true or false, not {value!r:.40}")
        return value
    if port_type in ("STRING", "COMBO"):
        if not isinstance(value, str):
            raise ValueError(f"input {key!r} is a {port_type}: a string, not {value!r:.40}")
        return value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) and len(value) <= 4096 and all(
            v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return value
    raise ValueError(f"input {key!r}: a typed value is a JSON number, string, boolean or a list of them")


# ------------------------------------------------------------------------------------ outputs


def _safe_stem(key: str, taken: set[str]) -> str:
    """A key's file stem, valid on Windows and unique in ``taken`` ignoring case (_names)."""
    return unique_stem(safe_file_stem(key, 80), taken, "_")


def _to_numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach") and hasattr(value, "cpu"):
        import torch

        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()  # numpy has no bfloat16; float32 and float64 are saved as they are
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    return None


def _image_kind(arr: Any, port_type: str) -> str | None:
    """"image" for an IMAGE (``[B,H,W,C]`` or ``[H,W,C]``), "mask" for a MASK (``[B,H,W]`` or
    ``[H,W]``), None for anything else (saved as .npy)."""
    channels_last = arr.ndim in (3, 4) and arr.shape[-1] in (1, 3, 4)
    if port_type == "IMAGE" and channels_last:
        return "image"
    if port_type == "*" and arr.ndim == 4 and channels_last:
        return "image"
    if port_type == "MASK" and arr.ndim in (2, 3):
        return "mask"
    return None


def _to_uint8(item: Any) -> Any:
    """``clip(255 * item)`` as uint8, a band of rows at a time: float32 temporaries of a band only."""
    import numpy as np

    out = np.empty(item.shape, dtype=np.uint8)
    band = max(1, (8 << 20) // max(1, item[0].nbytes if item.ndim > 1 else 1))
    tmp = None
    for r in range(0, item.shape[0], band):
        src = np.asarray(item[r:r + band], dtype=np.float32)
        tmp = np.multiply(src, np.float32(255.0), out=tmp if tmp is not None and tmp.shape == src.shape else None)
        np.clip(tmp, 0, 255, out=tmp)
        out[r:r + band] = tmp
    return out


def save_outputs(values: Any, types: dict, out_dir: str, subfolder: str, limits: PanelLimits,
                 budget: OutputBudget | None = None) -> list[dict]:
    """Write a run's results into ``out_dir`` (in ComfyUI's output folder, ``subfolder`` of it):
    images and masks as PNG (one per batch item), other arrays as ``.npy``, strings as ``.txt``,
    other JSON values as ``.json``. ``values``: a dict, or ``(key, value)`` pairs loaded one at a
    time (each dropped before the next). With a ``budget``, a file that does not fit it is not
    written (its size is known before it is). Returns what was written, and what could not be."""
    import io

    import numpy as np
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    taken: set[str] = set()
    listed: list[dict] = []
    count = 0

    def entry(key: str, kind: str, filename: str | None, note: str | None = None) -> None:
        listed.append({"key": key, "kind": kind, "filename": filename, "subfolder": subfolder,
                       "type": "output", **({"note": note} if note else {})})

    def put(key: str, kind: str, filename: str, data: bytes) -> bool:
        if budget is not None and not budget.take(len(data)):
            entry(key, "skipped", None, budget.note(limits))
            return False
        with open(os.path.join(out_dir, filename), "wb") as f:
            f.write(data)
        entry(key, kind, filename)
        return True

    for key, value in (values.items() if isinstance(values, dict) else values):
        port_type = types.get(key, "*")
        stem = _safe_stem(key, taken)
        if isinstance(value, dict) and "samples" in value and _to_numpy(value["samples"]) is not None:
            value = value["samples"]  # a LATENT: its samples
        arr = _to_numpy(value)
        if count >= limits.max_output_files:
            entry(key, "skipped", None, f"not saved: over {limits.max_output_files} files")
            continue
        if arr is not None:
            kind = _image_kind(arr, port_type)
            if kind is not None:
                batch = arr if (kind == "image" and arr.ndim == 4) or (kind == "mask" and arr.ndim == 3) else arr[None]
                for i, item in enumerate(batch[: max(1, limits.max_output_files - count)]):
                    pixels = _to_uint8(item)
                    if kind == "image" and pixels.shape[-1] == 1:
                        pixels = pixels[..., 0]
                    fn = f"{stem}.png" if len(batch) == 1 else f"{stem}_{i:05d}.png"
                    png = io.BytesIO()
                    Image.fromarray(pixels).save(png, format="PNG", compress_level=4)
                    count += put(key, kind, fn, png.getvalue())
                continue
            fn = f"{stem}.npy"
            if budget is not None and not budget.take(arr.nbytes + 4096):  # the .npy header is smaller
                entry(key, "skipped", None, budget.note(limits))
                continue
            np.save(os.path.join(out_dir, fn), np.ascontiguousarray(arr), allow_pickle=False)
            entry(key, "npy", fn)
        elif isinstance(value, str):
            if not put(key, "txt", f"{stem}.txt", value.encode("utf-8")):
                continue
        else:
            try:
                text = json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                entry(key, "skipped", None, f"not saved: a {type(value).__name__} has no file form")
                continue
            if not put(key, "json", f"{stem}.json", text.encode("utf-8")):
                continue
        count += 1
    return listed
