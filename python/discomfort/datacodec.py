"""A data-only encoding for values that cross a trust boundary (HTTP, in both directions).

:mod:`discomfort.codecs` pickles, which is right for what this user's own processes write into
their own store and wrong for anything a client or a server sent: unpickling runs code. This
codec can only build data: tensors and numpy arrays (raw bytes with a dtype from a fixed list and
a shape whose byte count is checked), None, bool, int, float, str, bytes, lists, tuples and
str-keyed dicts of those, and Arrow data after Arrow's own full validation. Everything else is
refused with an error naming where in the value it sits and its type.

An encoded value is ``(meta, buffers)``: ``meta`` is UTF-8 JSON describing the structure,
``buffers`` are the raw payloads it points to by index, each used exactly once. Every limit
(meta size, depth, node count, buffer count, dimensions) is checked before anything is built,
and :func:`check` validates a description against the buffer sizes announced in a frame before
any buffer memory is allocated.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .errors import SerializationError

__all__ = ["Limits", "DEFAULT_LIMITS", "encode", "check", "decode", "DTYPES"]

FORMAT = 1

#: dtype name -> item size. The same names for torch and numpy (numpy has no bfloat16).
DTYPES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16,
}
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:[0-9]{1,3})?")
_ARROW_KINDS = ("table", "batch", "array", "chunked")
_MAX_INT_DIGITS = 4000  # what the decoder reads


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts; checked before anything is allocated."""

    max_meta: int = 16 << 20  # bytes of JSON
    max_depth: int = 32  # nesting of containers
    max_nodes: int = 200_000  # values in all (large data belongs in tensors and arrays)
    max_buffers: int = 4096
    max_ndim: int = 16
    max_bytes: int = 1 << 40  # sum of the buffers


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------------------- encode


def encode(obj: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, list[memoryview]]:
    """``(meta, buffers)`` of ``obj``; SerializationError naming the first part that cannot go."""
    buffers: list[memoryview] = []
    count = [0]
    tree = _enc(obj, buffers, 0, count, limits, "value")
    meta = json.dumps({"format": FORMAT, "value": tree}, separators=(",", ":"), allow_nan=False).encode()
    if len(meta) > limits.max_meta:
        raise SerializationError(f"the value's description is {len(meta)} bytes (at most {limits.max_meta}): "
                                 "too many small items; put them in a tensor or an array")
    if len(buffers) > limits.max_buffers:
        raise SerializationError(f"the value holds {len(buffers)} arrays or byte strings (at most {limits.max_buffers})")
    return meta, buffers


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _enc(obj: Any, buffers: list, depth: int, count: list[int], limits: Limits, where: str) -> Any:
    count[0] += 1
    if count[0] > limits.max_nodes:
        raise SerializationError(f"the value holds more than {limits.max_nodes} items")
    if depth > limits.max_depth:
        raise SerializationError(f"{where}: nested deeper than {limits.max_depth} levels")
    cls = type(obj)
    if obj is None or cls is bool or cls is str:
        return obj
    if cls is int:
        if -(1 << 63) <= obj < (1 << 64):
            return obj
        text = str(obj) if obj.bit_length() <= 14_000 else ""  # str() refuses past 4300 digits
        if not text or len(text.lstrip("-")) > _MAX_INT_DIGITS:
            raise SerializationError(f"{where}: an int of more than {_MAX_INT_DIGITS} digits")
        return {"t": "int", "v": text}
    if cls is float:
        return obj if math.isfinite(obj) else {"t": "float", "v": repr(obj)}
    if cls in (bytes, bytearray):
        buffers.append(memoryview(obj).cast("B"))
        return {"t": "bytes", "buf": len(buffers) - 1, "mutable": cls is bytearray}
    if cls is list:
        return [_enc(v, buffers, depth + 1, count, limits, f"{where}[{i}]") for i, v in enumerate(obj)]
    if cls is tuple:
        return {"t": "tuple", "items": [_enc(v, buffers, depth + 1, count, limits, f"{where}[{i}]")
                                        for i, v in enumerate(obj)]}
    if cls is dict:
        items = []
        for k, v in obj.items():
            if type(k) is not str:
                raise SerializationError(f"{where}: a dict key of type {_type_name(k)} ({k!r:.40}); only str keys can be sent")
            items.append([k, _enc(v, buffers, depth + 1, count, limits, f"{where}[{k!r}]")])
        return {"t": "dict", "items": items}
    mods = sys.modules
    torch = mods.get("torch")
    if torch is not None and cls in (torch.Tensor, torch.nn.Parameter):
        return _enc_tensor(torch, obj, buffers, where)
    np = mods.get("numpy")
    if np is not None:
        if cls is np.ndarray:
            return _enc_ndarray(np, obj, buffers, where, scalar=False)
        if isinstance(obj, np.generic) and not isinstance(obj, (np.object_, np.void, np.str_, np.bytes_)):
            return _enc_ndarray(np, np.asarray(obj), buffers, where, scalar=True)
    pa = mods.get("pyarrow")
    if pa is not None and isinstance(obj, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
        from .codecs import reduce_arrow

        _, (pb, kind) = reduce_arrow(pa, obj)
        buffers.append(memoryview(pb.raw()))
        return {"t": "arrow", "kind": kind, "buf": len(buffers) - 1}
    raise SerializationError(
        f"{where} is a {_type_name(obj)}: values that cross HTTP may only hold tensors, numpy arrays, "
        "Arrow data, None, bool, int, float, str, bytes, and lists, tuples and str-keyed dicts of those"
    )


def _enc_tensor(torch: Any, t: Any, buffers: list, where: str) -> dict:
    from .codecs import tensor_buffer

    if t.is_nested or t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise SerializationError(f"{where}: a {t.layout} / nested / quantized / meta tensor cannot be sent")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise SerializationError(f"{where}: tensors of dtype {t.dtype} cannot be sent (use one of {', '.join(DTYPES)})")
    data = t.detach().resolve_conj().resolve_neg().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    buffers.append(memoryview(tensor_buffer(data.reshape(-1).view(torch.uint8)).raw()))
    return {"t": "tensor", "dtype": dtype, "shape": list(t.shape), "buf": len(buffers) - 1,
            "device": str(t.device), "grad": bool(t.requires_grad)}


def _enc_ndarray(np: Any, a: Any, buffers: list, where: str, scalar: bool) -> dict:
    name = a.dtype.name
    if a.dtype.names is not None or a.dtype.hasobject or name not in DTYPES or name == "bfloat16":
        raise SerializationError(f"{where}: numpy arrays of dtype {a.dtype} cannot be sent (use one of "
                                 f"{', '.join(d for d in DTYPES if d != 'bfloat16')})")
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)  # (never for 0-d: it would make them 1-d)
    buffers.append(memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b""))
    return {"t": "ndarray", "dtype": name, "shape": list(a.shape), "buf": len(buffers) - 1, "scalar": scalar}


# ------------------------------------------------------------------------------------ check/decode


def _bad(msg: str) -> SerializationError:
    return SerializationError(f"invalid value description: {msg}")


def _no_constants(name: str) -> Any:
    raise _bad(f"{name} is not JSON")


def _parse(meta: bytes | memoryview, limits: Limits) -> Any:
    if len(meta) > limits.max_meta:
        raise _bad(f"{len(meta)} bytes of description (at most {limits.max_meta})")
    raw = bytes(meta)
    # Bound what json.loads would build before it builds it: every item but the first of a
    # container follows a comma, every container opens with a bracket.
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > 4 * limits.max_nodes:
        raise _bad(f"more than {limits.max_nodes} items")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except SerializationError:
        raise
    except RecursionError:
        raise _bad("nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"not UTF-8 JSON ({exc})") from None
    if type(doc) is not dict or set(doc) != {"format", "value"}:
        raise _bad("the top level must be {'format': ..., 'value': ...}")
    if type(doc["format"]) is not int or doc["format"] != FORMAT:
        raise _bad(f"format {doc['format']!r}; this side reads format {FORMAT}")
    return doc["value"]


class _Walk:
    """Validates a parsed description against the buffer sizes; optionally builds the value."""

    def __init__(self, sizes: list[int], limits: Limits, build: Callable[[dict, int], Any] | None):
        if len(sizes) > limits.max_buffers:
            raise _bad(f"{len(sizes)} buffers (at most {limits.max_buffers})")
        if sum(sizes) > limits.max_bytes:
            raise _bad(f"{sum(sizes)} bytes of buffers (at most {limits.max_bytes})")
        self.sizes = sizes
        self.used = [False] * len(sizes)
        self.limits = limits
        self.build = build
        self.nodes = 0

    def buffer(self, node: dict, where: str) -> int:
        i = node.get("buf")
        if type(i) is not int or not 0 <= i < len(self.sizes):
            raise _bad(f"{where}: buffer index {i!r} out of range ({len(self.sizes)} buffers)")
        if self.used[i]:
            raise _bad(f"{where}: buffer {i} is used twice")
        self.used[i] = True
        return i

    def finish(self) -> None:
        if not all(self.used):
            raise _bad(f"buffer {self.used.index(False)} is not used by the value")

    def walk(self, node: Any, depth: int, where: str) -> Any:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise _bad(f"more than {self.limits.max_nodes} items")
        if depth > self.limits.max_depth:
            raise _bad(f"{where}: nested deeper than {self.limits.max_depth} levels")
        cls = type(node)
        if node is None or cls in (bool, int, float, str):
            return node
        if cls is list:
            return [self.walk(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(node)]
        if cls is not dict:
            raise _bad(f"{where}: unexpected JSON {cls.__name__}")
        kind = node.get("t")
        fields = _FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None or set(node) != fields:
            raise _bad(f"{where}: unknown item {sorted(node)!r:.120}")
        if kind == "tuple":
            items = node["items"]
            if type(items) is not list:
                raise _bad(f"{where}: tuple items must be a list")
            return tuple(self.walk(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(items))
        if kind == "dict":
            items = node["items"]
            if type(items) is not list:
                raise _bad(f"{where}: dict items must be a list")
            out = {}
            for pair in items:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str:
                    raise _bad(f"{where}: a dict item must be [str key, value]")
                out[pair[0]] = self.walk(pair[1], depth + 1, f"{where}[{pair[0]!r:.60}]")
            return out
        if kind == "int":
            v = node["v"]
            if type(v) is not str or not re.fullmatch(r"-?[0-9]{1,%d}" % _MAX_INT_DIGITS, v):
                raise _bad(f"{where}: not an integer")
            return int(v)
        if kind == "float":
            if node["v"] not in ("nan", "inf", "-inf"):
                raise _bad(f"{where}: float {node['v']!r:.40} is not nan, inf or -inf")
            return float(node["v"])
        if kind == "bytes":
            if type(node["mutable"]) is not bool:
                raise _bad(f"{where}: 'mutable' must be a bool")
            i = self.buffer(node, where)
            return None if self.build is None else self.build(node, i)
        if kind in ("tensor", "ndarray"):
            return self.array(node, kind, where)
        # arrow
        if node["kind"] not in _ARROW_KINDS:
            raise _bad(f"{where}: unknown Arrow kind {node['kind']!r:.40}")
        i = self.buffer(node, where)
        return None if self.build is None else self.build(node, i)

    def array(self, node: dict, kind: str, where: str) -> Any:
        dtype, shape = node["dtype"], node["shape"]
        if not isinstance(dtype, str) or dtype not in DTYPES or (kind == "ndarray" and dtype == "bfloat16"):
            raise _bad(f"{where}: dtype {dtype!r:.40} is not one of {', '.join(DTYPES)}")
        if type(shape) is not list or len(shape) > self.limits.max_ndim \
                or any(type(d) is not int or d < 0 for d in shape):
            raise _bad(f"{where}: shape {shape!r:.80} must be at most {self.limits.max_ndim} non-negative ints")
        if kind == "tensor":
            if not isinstance(node["device"], str) or not _DEVICE.fullmatch(node["device"]):
                raise _bad(f"{where}: device {node['device']!r:.40}")
            if type(node["grad"]) is not bool or (node["grad"] and not dtype.startswith(("float", "bfloat", "complex"))):
                raise _bad(f"{where}: 'grad' must be a bool, true only for floating dtypes")
        elif type(node["scalar"]) is not bool or (node["scalar"] and shape):
            raise _bad(f"{where}: 'scalar' must be a bool, true only for shape []")
        i = self.buffer(node, where)
        n = DTYPES[dtype]
        for d in shape:
            n *= d
        if n != self.sizes[i]:
            raise _bad(f"{where}: a {dtype} {kind} of shape {shape} is {n} bytes but its buffer has {self.sizes[i]}")
        return None if self.build is None else self.build(node, i)


_FIELDS = {
    "tuple": {"t", "items"},
    "dict": {"t", "items"},
    "int": {"t", "v"},
    "float": {"t", "v"},
    "bytes": {"t", "buf", "mutable"},
    "tensor": {"t", "dtype", "shape", "buf", "device", "grad"},
    "ndarray": {"t", "dtype", "shape", "buf", "scalar"},
    "arrow": {"t", "kind", "buf"},
}


def check(meta: bytes | memoryview, sizes: list[int], limits: Limits = DEFAULT_LIMITS) -> None:
    """Validate a description against announced buffer sizes; allocates no buffer memory."""
    w = _Walk(list(sizes), limits, None)
    w.walk(_parse(meta, limits), 0, "value")
    w.finish()


def decode(meta: bytes | memoryview, buffers: list, limits: Limits = DEFAULT_LIMITS, *,
           place: bool = True) -> Any:
    """Build the value. Tensors are views over ``buffers`` (copies where a buffer is read-only:
    torch has no read-only tensors); numpy arrays are views, read-only where the buffer is.

    ``place=False`` validates everything (contents included) but leaves tensors on the CPU
    without gradients: what a server does with a value it only stores.
    """
    views = []
    for b in buffers:
        v = memoryview(b)
        views.append(v if v.format == "B" and v.ndim == 1 else v.cast("B"))

    def build(node: dict, i: int) -> Any:
        if node["t"] == "tensor":
            return _build_tensor(node, views[i], place)
        return _BUILDERS[node["t"]](node, views[i])

    w = _Walk([v.nbytes for v in views], limits, build)
    try:
        value = w.walk(_parse(meta, limits), 0, "value")
    except SerializationError:
        raise
    except (ImportError, RuntimeError, ValueError, TypeError, MemoryError, OverflowError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SerializationError(f"cannot build the value: {type(exc).__name__}: {first}") from None
    w.finish()
    return value


def _writable(view: memoryview) -> memoryview:
    return memoryview(bytearray(view)) if view.readonly else view


def _build_bytes(node: dict, view: memoryview) -> Any:
    return bytearray(view) if node["mutable"] else bytes(view)


def _build_tensor(node: dict, view: memoryview, place: bool = True) -> Any:
    import warnings

    import torch

    device = node["device"]
    if place and device != "cpu":
        kind, _, index = device.partition(":")
        backend = getattr(torch, kind, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
        if int(index or 0) >= count:
            raise _bad(f"the tensor is for device {device!r}, which this process does not have")

    dtype = getattr(torch, node["dtype"])
    if view.nbytes == 0:
        t = torch.empty(node["shape"], dtype=dtype)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            u8 = torch.frombuffer(_writable(view), dtype=torch.uint8)
        if dtype is torch.bool and bool((u8 > 1).any()):
            raise _bad("a bool tensor holds bytes other than 0 and 1")
        t = u8.view(dtype).view(node["shape"])
    if place and device != "cpu":
        t = t.to(device)
    if place and node["grad"]:
        t.requires_grad_(True)
    return t


def _build_ndarray(node: dict, view: memoryview) -> Any:
    import numpy as np

    dtype = np.dtype(node["dtype"]).newbyteorder("<")
    a = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    if dtype == np.bool_ and bool((a > 1).any()):
        raise _bad("a bool array holds bytes other than 0 and 1")
    a = a.view(dtype).reshape(node["shape"]) if view.nbytes else np.empty(node["shape"], dtype)
    if a.dtype.byteorder not in ("=", "|") and sys.byteorder == "little":
        a = a.view(a.dtype.newbyteorder("="))
    return a[()] if node["scalar"] else a


def _build_arrow(node: dict, view: memoryview) -> Any:
    import pyarrow as pa

    _check_ipc_messages(pa, pa.py_buffer(view))
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(view))
        table = reader.read_all()
        table.validate(full=True)  # offsets and lengths inside their buffers, before any access
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise _bad(f"Arrow data: {exc}") from None
    for field in table.schema:
        if _has_extension(pa, field.type):
            raise _bad(f"Arrow field {field.name!r} has an extension type ({field.type}); not accepted")
    kind = node["kind"]
    if kind == "table":
        return table
    if table.num_columns != 1 and kind != "batch":
        raise _bad(f"Arrow {kind} must have one column, not {table.num_columns}")
    if kind == "chunked":
        return table.column(0)
    batches = table.combine_chunks().to_batches()
    batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
    return batch if kind == "batch" else batch.column(0)


def _has_extension(pa: Any, typ: Any) -> bool:
    if isinstance(typ, pa.BaseExtensionType):
        return True
    if isinstance(typ, pa.DictionaryType):
        return _has_extension(pa, typ.value_type)
    return any(_has_extension(pa, typ.field(i).type) for i in range(getattr(typ, "num_fields", 0)))


def _check_ipc_messages(pa: Any, buf: Any) -> None:
    """Refuse, before pyarrow reads a batch, what this encoder never writes and a peer could
    abuse: compressed bodies (a few KB inflating to GBs), extension types (their deserializers
    would see the peer's bytes), messages other than schema, dictionary and record batches."""
    try:
        reader = pa.ipc.MessageReader.open_stream(buf)
        for message in reader:
            meta = message.metadata.to_pybytes()
            kind = message.type
            if kind == "schema":
                if b"ARROW:extension:name" in meta:
                    raise _bad("Arrow data with extension types is not accepted")
            elif kind in ("record batch", "dictionary"):
                if _fb_batch_compressed(meta, kind == "dictionary"):
                    raise _bad("compressed Arrow data is not accepted")
            else:
                raise _bad(f"Arrow message of type {kind!r} is not accepted")
    except SerializationError:
        raise
    except (pa.ArrowException, ValueError, OSError, struct.error, IndexError) as exc:
        raise _bad(f"Arrow data: {exc}") from None


def _fb_batch_compressed(meta: bytes, dictionary: bool) -> bool:
    """Whether a RecordBatch (or DictionaryBatch) message's flatbuffer names a BodyCompression.

    Message {version, header_type, header, ...}; DictionaryBatch {id, data: RecordBatch, ...};
    RecordBatch {length, nodes, buffers, compression, ...}. Reads are bounds-checked by struct.
    """
    def field(table: int, index: int) -> int:  # position of a table's field, 0 when absent
        vtable = table - struct.unpack_from("<i", meta, table)[0]
        vlen = struct.unpack_from("<H", meta, vtable)[0]
        slot = 4 + 2 * index
        if slot + 2 > vlen:
            return 0
        off = struct.unpack_from("<H", meta, vtable + slot)[0]
        return table + off if off else 0

    def deref(pos: int) -> int:
        return pos + struct.unpack_from("<I", meta, pos)[0]

    message = deref(0)
    header = field(message, 2)
    if not header:
        raise ValueError("a batch message without a header")
    batch = deref(header)
    if dictionary:
        data = field(batch, 1)
        if not data:
            raise ValueError("a dictionary batch without data")
        batch = deref(data)
    return bool(field(batch, 3))


_BUILDERS: dict[str, Callable[[dict, memoryview], Any]] = {
    "bytes": _build_bytes, "ndarray": _build_ndarray, "arrow": _build_arrow,
}
