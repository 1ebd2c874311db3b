"""Tests of discomfort.codecs: exact round trips, out-of-band buffers, zero-copy decode, pass_by."""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import socket
import subprocess
import sys
import threading
import types
import warnings
import weakref

import pytest

from discomfort import codecs
from discomfort.errors import SerializationError

PKG_DIR = pathlib.Path(__file__).resolve().parents[1] / "python" / "discomfort"
encode, decode, choose_pass_by = codecs.encode, codecs.decode, codecs.choose_pass_by

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
try:
    import pyarrow as pa
except ImportError:  # optional extra
    pa = None
needs_arrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")

MiB = 1 << 20


# ------------------------------------------------------------------------------------- helpers


def _address(buf) -> int:
    """Start address of a (non-empty) buffer."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def _copies(buffers) -> list[bytearray]:
    """What the store does: copy every buffer into separate, writable memory."""
    return [bytearray(b) for b in buffers]


def roundtrip(obj):
    meta, buffers = encode(obj)
    assert isinstance(meta, bytes)
    for b in buffers:
        assert isinstance(b, memoryview)
        assert b.format == "B" and b.ndim == 1 and b.c_contiguous
    return decode(meta, _copies(buffers))


def _tensor_bytes(t) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensor(a, b):
    assert type(a) is type(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.requires_grad == b.requires_grad
    assert a.device == b.device
    assert _tensor_bytes(a) == _tensor_bytes(b)


def assert_inside(ptr: int, nbytes: int, buf) -> None:
    start = _address(buf)
    assert start <= ptr and ptr + nbytes <= start + len(buf)


def _cpu_dtypes():
    """Every dtype this torch can allocate on CPU as a plain (non-quantized) tensor."""
    found = set()
    for name in dir(torch):
        dtype = getattr(torch, name)
        if not isinstance(dtype, torch.dtype) or dtype in found:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = torch.zeros(2, dtype=dtype)
        except Exception:
            continue
        if not t.is_quantized:
            found.add(dtype)
    return sorted(found, key=str)


CPU_DTYPES = _cpu_dtypes()


def _random_tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) if shape else 1
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).view(shape)


# --------------------------------------------------------------------------------- torch dtypes


def test_dtype_list_covers_the_usual_ones():
    expected = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int8, torch.int16,
                torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]
    expected += [getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
                 if hasattr(torch, n)]
    assert set(expected) <= set(CPU_DTYPES)


@pytest.mark.parametrize("shape", [(3, 5), (), (0,), (2, 0, 3)], ids=["2d", "0d", "empty", "empty3d"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_tensor_every_dtype_roundtrips_by_bytes(dtype, shape):
    t = _random_tensor(dtype, shape)
    out = roundtrip(t)
    assert_same_tensor(t, out)


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(4, 3),
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(5).half(),
        torch.randn(5).bfloat16(),
        torch.randint(-100, 100, (7,), dtype=torch.int8),
        torch.randint(-(2**40), 2**40, (7,), dtype=torch.int64),
        torch.randint(0, 255, (7,), dtype=torch.uint8),
        torch.tensor([True, False, True]),
        torch.randn(3, dtype=torch.complex64),
        torch.randn(3, dtype=torch.complex128),
        torch.tensor(3.25),
        torch.tensor(7, dtype=torch.int32),
    ],
    ids=lambda t: f"{t.dtype}-{tuple(t.shape)}",
)
def test_tensor_values_equal(t):
    out = roundtrip(t)
    assert torch.equal(out, t)
    assert_same_tensor(t, out)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_float8_from_real_values(name):
    if not hasattr(torch, name):
        pytest.skip(f"torch.{name} does not exist in this torch")
    t = (torch.randn(4, 6) * 3).to(getattr(torch, name))
    out = roundtrip(t)
    assert_same_tensor(t, out)
    assert torch.equal(out.float(), t.float())


def test_requires_grad_restored_and_leaf():
    leaf = torch.randn(3, 3, requires_grad=True)
    nonleaf = leaf * 2
    for t in (leaf, nonleaf):
        out = roundtrip(t)
        assert out.requires_grad and out.is_leaf and out.grad_fn is None
        assert torch.equal(out.detach(), t.detach())
    out.sum().backward()
    assert torch.equal(out.grad, torch.ones(3, 3))


def test_parameter_stays_a_parameter():
    p = torch.nn.Parameter(torch.randn(4, 2))
    out = roundtrip(p)
    assert type(out) is torch.nn.Parameter and out.requires_grad
    assert torch.equal(out.detach(), p.detach())
    meta, buffers = encode(p)
    assert len(buffers) == 1 and buffers[0].nbytes == p.nelement() * 4


# ------------------------------------------------------------------------- layout, views, modes


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.t(),
        lambda b: b[::2, 1::3],
        lambda b: b[2],
        lambda b: b[:, 4],
        lambda b: b[1:3],
        lambda b: b.unsqueeze(0).expand(3, 6, 8),
        lambda b: b.reshape(2, 3, 2, 4).permute(0, 2, 3, 1),
        lambda b: b.reshape(1, 3, 4, 4).contiguous(memory_format=torch.channels_last),
        lambda b: b.to(torch.complex64).conj(),
        lambda b: b.to(torch.complex64).conj().imag,
    ],
    ids=["transposed", "strided", "row", "column", "slice", "expanded", "permuted", "channels_last",
         "conj", "neg_view"],
)
def test_views_and_non_contiguous_stored_contiguous(make):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    t = make(base)
    meta, buffers = encode(t)
    assert len(buffers) == 1
    assert buffers[0].nbytes == t.nelement() * t.element_size()  # only the view's own bytes
    out = decode(meta, _copies(buffers))
    assert out.is_contiguous() and out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(out, t.resolve_conj().resolve_neg())


def test_inference_mode_tensors():
    with torch.inference_mode():
        t = torch.randn(2, 3)
        inside = roundtrip(t)
    outside = roundtrip(t)
    assert torch.equal(inside, t) and torch.equal(outside, t)


def test_meta_tensor():
    t = torch.empty(4, 5, dtype=torch.bfloat16, device="meta")
    meta, buffers = encode(t)
    assert buffers == []
    out = decode(meta, [])
    assert out.device.type == "meta" and out.shape == t.shape and out.dtype == t.dtype


def test_sparse_and_nested_tensors_are_refused():
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(SerializationError, match="layout"):
        encode(sparse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.eye(3).to_sparse_csr()
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(SerializationError, match="layout"):
        encode(csr)
    with pytest.raises(SerializationError, match="nested"):
        encode({"x": nested})


def test_quantized_tensor_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(SerializationError, match="quantized"):
        encode(q)


@needs_cuda
def test_cuda_tensor_roundtrip_restores_device():
    for t in (torch.randn(64, 64, device="cuda"), torch.randn(8, 8, device="cuda").t(),
              torch.randn(3, device="cuda", requires_grad=True), torch.zeros(0, device="cuda")):
        meta, buffers = encode(t)
        assert len(buffers) == 1
        out = decode(meta, _copies(buffers))
        assert out.device == t.device and out.requires_grad == t.requires_grad and out.is_leaf
        assert torch.equal(out.detach(), t.detach())


# ------------------------------------------------------------------- out of band, zero copy


def test_large_tensor_travels_out_of_band():
    t = torch.randn(MiB)  # 4 MiB of float32
    meta, buffers = encode(t)
    assert len(meta) < 4096
    assert len(buffers) == 1 and buffers[0].nbytes == 4 * MiB
    # A contiguous tensor is not copied at encode: the buffer aliases its memory.
    assert _address(buffers[0]) == t.data_ptr()


def test_tensor_decode_is_zero_copy_and_independent():
    t = torch.randn(256, 256)
    meta, buffers = encode(t)
    store = _copies(buffers)
    out = decode(meta, store)
    assert_inside(out.data_ptr(), out.nelement() * out.element_size(), store[0])
    assert torch.equal(out, t)
    t.fill_(0)  # the original changes; the decoded copy lives in the store's memory
    assert not torch.equal(out, t)
    out[0, 0] = 123.0  # and it is a view of that memory
    assert np.frombuffer(store[0], dtype=np.float32)[0] == 123.0


def test_decode_over_memoryview_of_shared_like_memory():
    t = torch.arange(1000, dtype=torch.int64)
    meta, buffers = encode(t)
    region = bytearray(8192 + buffers[0].nbytes)
    view = memoryview(region)[4096 : 4096 + buffers[0].nbytes]  # like the store's page-aligned views
    view[:] = buffers[0]
    out = decode(meta, [view])
    assert_inside(out.data_ptr(), 8000, view)
    assert torch.equal(out, t)


def test_decode_readonly_buffer_copies_without_warning():
    t = torch.randn(10)
    meta, buffers = encode(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode(meta, [bytes(b) for b in buffers])
    assert torch.equal(out, t)
    out += 1  # writable


def test_decode_empty_buffer():
    t = torch.zeros(0, 4, dtype=torch.float16)
    meta, buffers = encode(t)
    assert [b.nbytes for b in buffers] == [0]
    out = decode(meta, [bytearray()])
    assert out.shape == (0, 4) and out.dtype == torch.float16


def test_same_tensor_twice_is_stored_once():
    t = torch.randn(100)
    meta, buffers = encode([t, t, {"again": t}])
    assert len(buffers) == 1
    a, b, c = decode(meta, _copies(buffers))
    assert a is b is c["again"]


def test_tensor_buffer_without_numpy_path(monkeypatch):
    """torch without numpy: the buffer comes from a ctypes view that keeps the tensor alive."""

    def no_numpy(self):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    t = torch.randn(5, 7).t()  # non-contiguous: the contiguous temporary must stay alive
    meta, buffers = encode(t)
    import gc

    gc.collect()
    out = decode(meta, _copies(buffers))
    monkeypatch.undo()
    assert torch.equal(out, t)
    assert torch.equal(roundtrip(torch.zeros(0)), torch.zeros(0))


# ---------------------------------------------------------------------------------------- numpy


@pytest.mark.parametrize(
    "dtype",
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
     "float32", "float64", "complex64", "complex128", "datetime64[ns]", "timedelta64[s]", ">i4", "U5", "S3", "V4",
     [("a", "<i4"), ("b", "<f8")]],
    ids=str,
)
def test_numpy_dtypes_roundtrip(dtype):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, size=(4, 6)).astype(dtype)
    meta, buffers = encode(a)
    assert len(buffers) == 1
    out = decode(meta, _copies(buffers))
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)
    assert roundtrip(a[::2, ::3]).tobytes() == a[::2, ::3].tobytes()
    zero_d = a[:1, 0].reshape(())
    assert zero_d.ndim == 0 and roundtrip(zero_d).tobytes() == zero_d.tobytes()


@pytest.mark.parametrize(
    "make",
    [lambda b: b[::2, 1::3], lambda b: b.T, lambda b: b[:, 2], lambda b: b[::-1], lambda b: b[3:5]],
    ids=["strided", "transposed", "column", "reversed", "slice"],
)
def test_numpy_non_contiguous_travels_out_of_band(make):
    a = make(np.arange(120, dtype=np.float64).reshape(10, 12))
    meta, buffers = encode(a)
    assert len(buffers) == 1 and buffers[0].nbytes == a.nbytes
    assert len(meta) < 512
    out = decode(meta, _copies(buffers))
    np.testing.assert_array_equal(out, a)


def test_numpy_zero_copy_and_edge_shapes():
    a = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    meta, buffers = encode(a)
    store = _copies(buffers)
    out = decode(meta, store)
    assert_inside(out.ctypes.data, out.nbytes, store[0])
    assert out.flags.writeable
    a[:] = 0
    assert out.any()
    for edge in (np.float64(2.5), np.array(3.0), np.zeros((0, 3), np.int16)):
        result = roundtrip(edge)
        assert type(result) is type(edge) and np.array_equal(result, edge)


def test_numpy_object_array_pickles_normally():
    a = np.array([{"x": 1}, "s", None, 3.5], dtype=object)
    meta, buffers = encode(a)
    assert buffers == []
    out = decode(meta, [])
    assert out.dtype == object and list(out) == list(a)


# ------------------------------------------------------------------------------ ComfyUI shapes


def test_comfy_image_mask_latent_conditioning():
    image = torch.rand(2, 64, 48, 3)
    mask = torch.rand(2, 64, 48)
    latent = {"samples": torch.randn(2, 4, 8, 6), "noise_mask": torch.rand(2, 1, 64, 48), "batch_index": [0, 1]}
    conditioning = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 1280)}],
                    [torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 1280), "strength": 0.5}]]
    value = {"image": image, "mask": mask, "latent": latent, "conditioning": conditioning}
    meta, buffers = encode(value)
    assert len(buffers) == 8 and len(meta) < 4096
    out = decode(meta, _copies(buffers))
    assert_same_tensor(out["image"], image)
    assert_same_tensor(out["mask"], mask)
    assert out["latent"]["batch_index"] == [0, 1]
    for key in ("samples", "noise_mask"):
        assert_same_tensor(out["latent"][key], latent[key])
    assert len(out["conditioning"]) == 2
    for (t_out, d_out), (t_in, d_in) in zip(out["conditioning"], conditioning):
        assert_same_tensor(t_out, t_in)
        assert d_out.keys() == d_in.keys()
        assert_same_tensor(d_out["pooled_output"], d_in["pooled_output"])
    assert out["conditioning"][1][1]["strength"] == 0.5


# ------------------------------------------------------------------------------- plain values


@dataclasses.dataclass
class Point:
    x: int
    y: float
    tags: list = dataclasses.field(default_factory=list)


@pytest.mark.parametrize(
    "value",
    ["héllo", 0, -(2**100), 1.5, float("inf"), True, False, None, b"\x00\xff" * 10, bytes(5 * MiB),
     bytearray(b"abc"), 3 + 4j, [1, [2, [3, (4, 5)]]], (1, "a", None), {"a": {"b": [1, 2]}, 3: (4,)},
     {1, 2, 3}, frozenset({"x"}), Point(1, 2.5, ["t"]), [], {}, ()],
    ids=lambda v: type(v).__name__,
)
def test_plain_values_roundtrip(value):
    out = roundtrip(value)
    assert type(out) is type(value) and out == value


def test_closure_and_lambda():
    k = 10

    def add_k(x):
        return x + k

    out_closure, out_lambda = roundtrip([add_k, lambda x: x * 3])
    assert out_closure(5) == 15 and out_lambda(5) == 15


def test_nested_value_mixing_everything():
    value = {"t": [torch.ones(3)], "a": (np.arange(4),), "s": {"x", "y"}, "p": Point(0, 0.0)}
    out = roundtrip(value)
    assert torch.equal(out["t"][0], torch.ones(3))
    np.testing.assert_array_equal(out["a"][0], np.arange(4))
    assert out["s"] == {"x", "y"} and out["p"] == Point(0, 0.0)


# ---------------------------------------------------------------------------------------- arrow


@needs_arrow
def test_arrow_values_roundtrip_zero_copy():
    table = pa.table({"i": pa.array(range(1000), pa.int64()), "s": pa.array([str(i) for i in range(1000)]),
                      "f": pa.array([i / 3 for i in range(1000)]), "n": pa.array([None, 1] * 500)})
    batch = table.to_batches()[0]
    array = pa.array(np.arange(10_000, dtype=np.float32))
    chunked = pa.chunked_array([pa.array([1, 2]), pa.array([3])])
    dictionary = pa.array(["a", "b", "a"]).dictionary_encode()
    for value in (table, batch, array, chunked, dictionary, table.slice(10, 20), pa.table({"x": pa.array([], pa.int8())})):
        meta, buffers = encode(value)
        assert len(buffers) == 1 and len(meta) < 512
        store = _copies(buffers)
        out = decode(meta, store)
        assert type(out) is type(value)
        assert out.equals(value)
    meta, buffers = encode(array)
    store = _copies(buffers)
    out = decode(meta, store)
    data = out.buffers()[1]
    assert_inside(data.address, data.size, store[0])


@needs_arrow
def test_arrow_inside_containers():
    value = {"table": pa.table({"x": [1, 2, 3]}), "other": [pa.array(["a"])]}
    out = roundtrip(value)
    assert out["table"].equals(value["table"]) and out["other"][0].equals(value["other"][0])


# ------------------------------------------------------------------------------------- errors


class HoldsGenerator:
    def __init__(self):
        self.gen = (i for i in range(3))


@pytest.mark.parametrize("value", [HoldsGenerator(), [threading.Lock()], {"w": weakref.ref(Point)}],
                         ids=["generator", "lock", "weakref"])
def test_unpicklable_raises_serialization_error(value):
    with pytest.raises(SerializationError) as info:
        encode(value)
    assert type(value).__qualname__ in str(info.value)
    assert info.value.__cause__ is not None
    assert isinstance(info.value, TypeError)  # SerializationError is also a TypeError


# ------------------------------------------------------------------------------------- pass_by


FakeModelPatcher = type("ModelPatcher", (), {"__module__": "comfy.model_patcher"})
FakeCLIP = type("CLIP", (), {"__module__": "comfy.sd"})
CustomPatcher = type("GGUFModelPatcher", (FakeModelPatcher,), {"__module__": "custom_nodes.gguf"})
NotComfy = type("ModelPatcher", (), {"__module__": "mypackage.models"})


class MyModel(torch.nn.Module):
    pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s", "val"), (1, "val"), (1.5, "val"), (True, "val"), (None, "val"), (b"x", "val"),
        (torch.ones(2), "val"), (torch.nn.Parameter(torch.ones(2)), "val"), (np.ones(3), "val"),
        (np.float32(1), "val"), (np.array([object()], dtype=object), "try"),
        ([1, "a", (2.0, None)], "val"), ({"a": torch.ones(1), "b": [np.ones(1)]}, "val"),
        ({1, 2}, "val"), (frozenset({"a"}), "val"), ((), "val"),
        (torch.nn.Linear(2, 2), "ref"), (MyModel(), "ref"), (threading.Lock(), "ref"),
        (threading.RLock(), "ref"), (threading.Condition(), "ref"), (threading.Event(), "ref"),
        (threading.Semaphore(), "ref"), (threading.current_thread(), "ref"), ((i for i in ()), "ref"),
        (os, "ref"), (FakeModelPatcher(), "ref"), (FakeCLIP(), "ref"), (CustomPatcher(), "ref"),
        (NotComfy(), "try"), (Point(1, 2.0), "try"), (lambda: 1, "try"), (object(), "try"),
        ([1, torch.nn.Linear(1, 1)], "ref"), ({"model": FakeModelPatcher()}, "ref"),
        ({FakeModelPatcher(): 1}, "ref"), ([1, Point(1, 2.0)], "try"), ([Point(1, 2.0), threading.Lock()], "ref"),
        (types.SimpleNamespace(a=1), "try"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) or v not in ("val", "ref", "try") else v,
)
def test_choose_pass_by(value, expected):
    assert choose_pass_by(value) == expected


def test_choose_pass_by_file_and_socket(tmp_path):
    with open(tmp_path / "f.txt", "w") as f, open(tmp_path / "f.txt", "rb") as fb:
        assert choose_pass_by(f) == "ref"
        assert choose_pass_by(fb) == "ref"
        assert choose_pass_by({"log": f}) == "ref"
    assert choose_pass_by(io.BytesIO()) == "ref"
    with socket.socket() as s:
        assert choose_pass_by(s) == "ref"


@needs_arrow
def test_choose_pass_by_arrow():
    assert choose_pass_by(pa.table({"x": [1]})) == "val"
    assert choose_pass_by([pa.array([1]), pa.chunked_array([[1]])]) == "val"


def test_choose_pass_by_container_subclasses_and_limits():
    from collections import OrderedDict, namedtuple

    Pair = namedtuple("Pair", "a b")
    assert choose_pass_by(Pair(1, 2)) == "try"
    assert choose_pass_by(OrderedDict(a=1)) == "try"
    assert choose_pass_by(Pair(1, threading.Lock())) == "ref"

    deep = [1]
    for _ in range(7):
        deep = [deep]
    assert choose_pass_by(deep) == "val"  # depth 8 is scanned
    assert choose_pass_by([deep]) == "try"  # one level more is not
    assert choose_pass_by(list(range(10_000))) == "val"
    assert choose_pass_by(list(range(10_001))) == "try"
    assert choose_pass_by([threading.Lock()] + list(range(10_001))) == "try"  # too big: not scanned
    assert choose_pass_by([[threading.Lock()], list(range(10_001))]) == "ref"  # found before the cap
    assert choose_pass_by({i: i for i in range(5_000)}) == "val"
    assert choose_pass_by({i: i for i in range(5_001)}) == "try"  # keys and values both count


def test_choose_pass_by_never_pickles():
    class Exploding:
        def __reduce_ex__(self, protocol):
            raise AssertionError("choose_pass_by must not pickle")

        __reduce__ = __reduce_ex__
        __getstate__ = __reduce_ex__

    assert choose_pass_by(Exploding()) == "try"
    assert choose_pass_by([Exploding(), threading.Lock()]) == "ref"


# --------------------------------------------------------------------------------- import hygiene


def test_no_optional_import_when_encoding_plain_values():
    code = f"""
import sys, types, importlib
pkg = types.ModuleType("discomfort"); pkg.__path__ = [{str(PKG_DIR)!r}]
sys.modules["discomfort"] = pkg
c = importlib.import_module("discomfort.codecs")
meta, bufs = c.encode({{"a": [1, 2.0, "x", b"y", {{1}}], "f": lambda: 1}})
assert c.decode(meta, bufs)["a"][4] == {{1}}
assert c.choose_pass_by([1, "a", object()]) == "try"
bad = [m for m in ("torch", "numpy", "pyarrow") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
