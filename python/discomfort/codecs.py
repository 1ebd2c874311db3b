"""Turns Python values into (meta, buffers) for the store, and back.

Values are pickled with cloudpickle at protocol 5. Large payloads (tensors, numpy arrays, Arrow
data) travel out of band as raw byte buffers: the store copies each one once into shared memory,
and decoding rebuilds the value as a zero-copy view over the buffer the store hands back.

torch, numpy and pyarrow are optional: they are never imported here to classify or encode a value,
only looked up in ``sys.modules`` (a tensor can only exist once torch is imported). Decoding imports
them on demand, when the payload holds such a value.
"""

from __future__ import annotations

import io
import itertools
import pickle
import socket
import sys
import threading
import types
import warnings
from typing import Any, Literal

import cloudpickle

from .errors import SerializationError

__all__ = ["encode", "encode_fast", "decode", "choose_pass_by"]

PROTOCOL = 5


# --------------------------------------------------------------------------------------- encode


def encode(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle `obj` into metadata bytes plus out-of-band buffers for its large payloads.

    Each buffer is a 1-D, C-contiguous memoryview of format 'B'. It may alias `obj`'s memory (or a
    temporary contiguous copy it keeps alive), so the caller copies it into the store before
    mutating `obj`.
    """
    buffers: list[memoryview] = []
    out = io.BytesIO()
    try:
        _Pickler(out, protocol=PROTOCOL, buffer_callback=lambda pb: buffers.append(_raw(pb))).dump(obj)
    except SerializationError:
        raise
    except Exception as exc:  # pickling fails with many types: TypeError, PicklingError, ...
        raise SerializationError(f"cannot serialize a value of type {_type_name(obj)}: {exc}") from exc
    return out.getvalue(), buffers


# ----------------------------------------------------------------------------- fast paths
#
# The values a workflow passes most (a bare CPU tensor, an int, a string) skip cloudpickle: its
# Pickler costs ~20 us to build and run, more than the store's whole put of a small value. What
# they produce is what `encode` would (a pickle calling `_rebuild_tensor` with the tensor's bytes
# out of band; a plain pickle of the atom), so every decoder reads them alike.

# Exact types whose plain pickle equals cloudpickle's (bytearray is not here: with a buffer
# callback it travels out of band).
_PICKLE_ATOMS = frozenset({int, float, str, bool, type(None), bytes, complex})
_CACHE_MAX = 1024  # distinct (dtype, shape, requires_grad) metas kept per process


class _TensorStub:
    """Pickles as the call `_rebuild_tensor(buffer, dtype, shape, requires_grad, "cpu")`."""

    __slots__ = ("args",)

    def __init__(self, args: tuple):
        self.args = args

    def __reduce__(self) -> tuple:
        return _rebuild_tensor, self.args


_tensor_metas: dict[tuple, bytes] = {}  # (dtype, shape, requires_grad) -> meta
_tensor_specs: dict[bytes, tuple] = {}  # meta -> (numpy dtype or None, dtype, shape, requires_grad)
_numpy_dtypes: dict[Any, Any] = {}  # torch dtype -> numpy dtype, for those numpy has


def encode_fast(obj: Any) -> tuple[bytes, list[memoryview]] | None:
    """`encode(obj)` for a bare CPU tensor or a plain atom, in a few microseconds; None for any
    other value (use `encode`)."""
    cls = type(obj)
    if cls in _PICKLE_ATOMS:
        return pickle.dumps(obj, PROTOCOL), []
    torch = sys.modules.get("torch")
    if torch is not None and cls is torch.Tensor:
        return _encode_plain_tensor(torch, obj)
    return None


def _encode_plain_tensor(torch: Any, t: Any) -> tuple[bytes, list[memoryview]] | None:
    if not t.is_contiguous():
        return None
    requires_grad = t.requires_grad
    data = t.detach() if requires_grad else t
    dtype = t.dtype
    try:
        if dtype in _numpy_dtypes:
            # numpy() refuses what has no plain CPU bytes: other devices, sparse, nested,
            # quantized, conjugate or negative bits. Those take the general path.
            array = data.numpy()
        else:
            if t.is_neg() or t.is_conj() or t.is_quantized or not _note_numpy_dtype(torch, dtype):
                return None
            array = data.reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError, ValueError):
        return None
    key = (dtype, t.shape, requires_grad)
    meta = _tensor_metas.get(key)
    if meta is None:
        meta = _tensor_meta(dtype, tuple(t.shape), requires_grad)
        if len(_tensor_metas) >= _CACHE_MAX:
            _tensor_metas.clear()
        _tensor_metas[key] = meta
    return meta, [pickle.PickleBuffer(array).raw()]


def _note_numpy_dtype(torch: Any, dtype: Any) -> bool:
    """Learn whether numpy holds `dtype` (True: it does not, or it does now); False: not a
    dense dtype at all."""
    if dtype.is_complex or dtype.is_floating_point or dtype in (torch.bool, torch.uint8, torch.int8,
                                                                torch.int16, torch.int32, torch.int64):
        try:
            _numpy_dtypes[dtype] = torch.empty(0, dtype=dtype).numpy().dtype
        except (RuntimeError, TypeError):
            pass  # bfloat16, float8, ...: sent as bytes
        return True
    try:
        torch.empty(0, dtype=dtype).view(torch.uint8)
    except (RuntimeError, TypeError):
        return False
    return True


def _tensor_meta(dtype: Any, shape: tuple, requires_grad: bool) -> bytes:
    args = (pickle.PickleBuffer(bytearray()), dtype, shape, requires_grad, "cpu")
    return pickle.dumps(_TensorStub(args), protocol=PROTOCOL, buffer_callback=lambda _b: False)


def _raw(pb: pickle.PickleBuffer) -> memoryview:
    try:
        return pb.raw()  # 1-D, 'B', C-contiguous, keeps the exporter alive
    except BufferError as exc:
        raise SerializationError(f"an out-of-band buffer is not contiguous: {exc}") from exc


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _Pickler(cloudpickle.Pickler):
    """cloudpickle plus fast paths that send array payloads out of band as raw bytes."""

    def reducer_override(self, obj: Any) -> Any:
        mods = sys.modules
        torch = mods.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            cls = type(obj)
            if cls is torch.Tensor:
                return _reduce_tensor(torch, obj)
            if cls is torch.nn.Parameter:  # the inner tensor takes the fast path
                return torch.nn.Parameter, (obj.detach(), obj.requires_grad)
            # Other subclasses keep torch's own (slower, in-band) pickling.
        np = mods.get("numpy")
        if np is not None and type(obj) is np.ndarray:
            return _reduce_ndarray(np, obj)
        pa = mods.get("pyarrow")
        if pa is not None and isinstance(obj, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
            return reduce_arrow(pa, obj)
        return super().reducer_override(obj)


def _reduce_ndarray(np: Any, a: Any) -> Any:
    """Help numpy's own protocol-5 reduce (a PickleBuffer) where it would pickle in band."""
    if a.dtype.hasobject:
        return NotImplemented  # pickled item by item, as numpy does
    flags = a.flags
    contiguous = a if flags.c_contiguous or flags.f_contiguous else np.ascontiguousarray(a)
    if a.dtype.kind in "Mm":  # numpy keeps datetime/timedelta in band: send same-size raw items
        return _view_as, (contiguous.view(np.dtype((np.void, a.dtype.itemsize))), a.dtype)
    return NotImplemented if contiguous is a else contiguous.__reduce_ex__(PROTOCOL)


def _view_as(array: Any, dtype: Any) -> Any:
    return array.view(dtype)


# ---------------------------------------------------------------------------------------- torch


def _reduce_tensor(torch: Any, t: Any) -> tuple:
    """Reduce a dense tensor to its bytes (one PickleBuffer) plus dtype, shape, grad and device.

    torch's own reduce goes through torch.save into a BytesIO, an order of magnitude slower than a
    memcpy. Non-contiguous tensors and views are stored contiguous; CUDA tensors cost one
    device-to-host copy here and one host-to-device copy at decode.
    """
    if t.is_nested:
        raise SerializationError("nested tensors are not supported; unbind() them into a list")
    if t.layout != torch.strided:
        raise SerializationError(f"tensors of layout {t.layout} are not supported; use .to_dense()")
    if t.is_quantized:
        raise SerializationError("quantized tensors are not supported; use .dequantize()")
    shape = tuple(t.shape)
    device = str(t.device)
    if t.device.type == "meta":  # no data to carry
        return _rebuild_meta_tensor, (t.dtype, shape, t.requires_grad)
    data = t.detach().resolve_conj().resolve_neg().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.reshape(-1).view(torch.uint8)  # 1-D, contiguous: valid for every dtype and size
    return _rebuild_tensor, (tensor_buffer(data), t.dtype, shape, t.requires_grad, device)


def tensor_buffer(u8: Any) -> pickle.PickleBuffer:
    """A PickleBuffer over a contiguous uint8 CPU tensor that keeps the tensor alive."""
    try:
        return pickle.PickleBuffer(u8.numpy())  # the array holds a reference to the tensor
    except RuntimeError:  # numpy missing, or torch built without it
        pass
    if u8.numel() == 0:
        return pickle.PickleBuffer(bytearray())
    import ctypes

    block = (ctypes.c_ubyte * u8.numel()).from_address(u8.data_ptr())
    block._discomfort_owner = u8  # ctypes does not own the memory: keep the tensor alive
    return pickle.PickleBuffer(block)


def _rebuild_tensor(buf: Any, dtype: Any, shape: tuple, requires_grad: bool, device: str) -> Any:
    """Rebuild a tensor as a zero-copy view over `buf` (a copy only if `buf` is read-only)."""
    import torch

    view = memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if view.nbytes == 0:
        t = torch.empty(shape, dtype=dtype)
    else:
        if view.readonly:  # torch has no read-only tensors: writing would fault, so copy
            view = memoryview(bytearray(view))
        t = torch.frombuffer(view, dtype=torch.uint8)  # writable: torch does not warn
        t = t.view(dtype).view(shape)
    if device != "cpu":
        t = t.to(device)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _rebuild_meta_tensor(dtype: Any, shape: tuple, requires_grad: bool) -> Any:
    import torch

    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------- arrow

def reduce_arrow(pa: Any, obj: Any) -> tuple:
    """Write Arrow data as one IPC stream, sent out of band; decode reads it back zero-copy."""
    if isinstance(obj, pa.Table):
        kind, table = "table", obj
    elif isinstance(obj, pa.RecordBatch):
        kind, table = "batch", obj
    elif isinstance(obj, pa.Array):
        kind, table = "array", pa.RecordBatch.from_arrays([obj], names=["values"])
    else:
        kind, table = "chunked", pa.Table.from_arrays([obj], names=["values"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return _rebuild_arrow, (pickle.PickleBuffer(sink.getvalue()), kind)


def _rebuild_arrow(buf: Any, kind: str) -> Any:
    import pyarrow as pa

    reader = pa.ipc.open_stream(pa.py_buffer(buf))
    if kind == "batch":
        return reader.read_next_batch()
    if kind == "array":
        return reader.read_next_batch().column(0)
    table = reader.read_all()
    return table if kind == "table" else table.column(0)


# --------------------------------------------------------------------------------------- decode


def decode(meta: bytes, buffers: list) -> Any:
    """Rebuild a value from `encode`'s output; arrays and tensors become views over `buffers`."""
    spec = _tensor_specs.get(meta) if len(buffers) == 1 and type(meta) is bytes else None
    if spec is None:
        if (len(buffers) != 1 or type(meta) is not bytes or len(meta) > 512
                or meta[11:11 + len(_TENSOR_CALL)] != _TENSOR_CALL):
            return pickle.loads(meta, buffers=buffers)
        spec = _learn_tensor_meta(meta)
        if spec is None:
            return pickle.loads(meta, buffers=buffers)
    np_dtype, dtype, shape, requires_grad = spec
    buf = buffers[0]
    if np_dtype is None or type(buf) is not memoryview or buf.readonly:
        return _rebuild_tensor(buf, dtype, shape, requires_grad, "cpu")
    np = sys.modules["numpy"]
    t = sys.modules["torch"].from_numpy(np.frombuffer(buf, np_dtype).reshape(shape))
    if requires_grad:
        t.requires_grad_(True)
    return t


# What a tensor's pickle starts with after PROTO and FRAME: the global `_rebuild_tensor`.
_TENSOR_CALL = pickle.dumps(_TensorStub((None,)), protocol=PROTOCOL)[11:][:48].split(b"\x93", 1)[0] + b"\x93"


class _SpecUnpickler(pickle.Unpickler):
    """Reads a tensor's pickle for its arguments, without a buffer and without building it."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_rebuild_tensor":
            return _tensor_args
        return super().find_class(module, name)


def _tensor_args(*args: Any) -> tuple:
    return args


def _learn_tensor_meta(meta: bytes) -> tuple | None:
    """The decode spec of a CPU tensor's meta (kept for the next decode), or None."""
    torch = sys.modules.get("torch")
    if torch is None or "numpy" not in sys.modules:
        return None
    try:
        args = _SpecUnpickler(io.BytesIO(meta), buffers=[None]).load()
    except Exception:  # noqa: BLE001 - not of the shape: the general path decides
        return None
    if not isinstance(args, tuple) or len(args) != 5 or args[4] != "cpu" or not isinstance(args[1], torch.dtype):
        return None
    dtype = args[1]
    if dtype not in _numpy_dtypes:
        _note_numpy_dtype(torch, dtype)
    spec = (_numpy_dtypes.get(dtype), dtype, tuple(args[2]), bool(args[3]))
    if len(_tensor_specs) >= _CACHE_MAX:
        _tensor_specs.clear()
    _tensor_specs[bytes(meta)] = spec
    return spec


# -------------------------------------------------------------------------------------- pass_by

Verdict = Literal["val", "ref", "try"]  # what choose_pass_by decides

_MAX_DEPTH = 8
_MAX_ITEMS = 10_000

_VAL_ATOMS = frozenset({str, int, float, bool, type(None), bytes, bytearray, complex})
_CONTAINERS = (list, tuple, dict, set, frozenset)

# Process-bound objects: pickling them is impossible or meaningless.
_REF_TYPES: tuple[type, ...] = (
    type(threading.Lock()),
    type(threading.RLock()),
    getattr(threading, "_RLock", threading.Condition),  # the pure-Python RLock
    threading.Condition,
    threading.Semaphore,
    threading.Event,
    threading.Barrier,
    threading.Thread,
    threading.local,
    io.IOBase,
    socket.socket,
    types.GeneratorType,
    types.AsyncGeneratorType,
    types.CoroutineType,
    types.ModuleType,
)

# ComfyUI model classes, matched by name so that ComfyUI is never imported. Any class in the MRO
# whose module is under `comfy.` and whose name is one of these makes the value a reference.
_COMFY_NAMES = frozenset({
    "ModelPatcher",  # comfy.model_patcher
    "CLIP", "VAE", "StyleModel",  # comfy.sd
    "ControlNet", "ControlBase", "ControlLora", "T2IAdapter",  # comfy.controlnet
    "ClipVisionModel",  # comfy.clip_vision
    "BaseModel",  # comfy.model_base
})


def encode_or_ref(obj: Any, pass_by: str, what: str) -> tuple[bytes, list[memoryview]] | None:
    """Encode ``obj`` for a save with ``pass_by`` "auto" | "val" | "ref"; None means: keep it by
    reference. ``what`` names the value in errors (key and run)."""
    if pass_by not in ("auto", "val", "ref"):
        raise ValueError(f"pass_by must be 'auto', 'val' or 'ref', not {pass_by!r}")
    mode = choose_pass_by(obj) if pass_by == "auto" else pass_by
    if mode == "ref":
        return None
    try:
        return encode(obj)
    except SerializationError as exc:
        if mode != "try":
            raise SerializationError(f"cannot save {what} by value: {exc}") from exc
        return None  # "try": not picklable, so it stays in this process by reference


def choose_pass_by(obj: Any) -> Verdict:
    """Decide by type alone how `obj` should be stored: "val", "ref" or "try".

    Never pickles anything: models are often picklable and gigabytes would be copied. "val":
    arrays, tensors, primitives and containers of those. "ref": models, locks, files, sockets,
    generators, modules, and containers holding any of them. "try": anything else (pickle it, and
    fall back to a reference if that fails), including containers too deep or too big to scan.
    """
    return _classify(obj, 0, [_MAX_ITEMS])


def _classify(obj: Any, depth: int, budget: list[int]) -> Verdict:
    cls = type(obj)
    if cls in _VAL_ATOMS:
        return "val"
    if isinstance(obj, _CONTAINERS):
        if depth >= _MAX_DEPTH:
            return "try"
        items = itertools.chain.from_iterable(obj.items()) if isinstance(obj, dict) else obj
        budget[0] -= 2 * len(obj) if isinstance(obj, dict) else len(obj)
        if budget[0] < 0:
            return "try"
        # A subclass (namedtuple, OrderedDict, ...) may carry more state than its items.
        verdict: Verdict = "val" if cls in _CONTAINERS else "try"
        for item in items:  # keys and values alike
            sub = _classify(item, depth + 1, budget)
            if sub == "ref":
                return "ref"
            if sub == "try":
                verdict = "try"
        return verdict
    return _classify_type(obj, cls)


def _classify_type(obj: Any, cls: type) -> Verdict:
    if _is_ref_type(cls):
        return "ref"
    mods = sys.modules
    torch = mods.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return "val"
    np = mods.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return "try" if obj.dtype.hasobject else "val"
        if isinstance(obj, np.generic):
            return "val"
    pa = mods.get("pyarrow")
    if pa is not None and isinstance(obj, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
        return "val"
    return "try"


def _is_ref_type(cls: type) -> bool:
    try:
        if issubclass(cls, _REF_TYPES):
            return True
    except TypeError:  # a broken __subclasscheck__ somewhere: judge by the MRO alone
        pass
    torch = sys.modules.get("torch")
    module_cls = getattr(getattr(torch, "nn", None), "Module", None) if torch is not None else None
    for klass in getattr(cls, "__mro__", ()):
        if klass is module_cls:
            return True
        module = getattr(klass, "__module__", None) or ""
        if module.startswith("comfy.") and getattr(klass, "__name__", None) in _COMFY_NAMES:
            return True
    return False
