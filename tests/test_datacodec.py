"""Tests of discomfort.datacodec, the data-only codec for values that cross HTTP.

Round trips of every supported type; refusals on encode that name the path and the type; and
decoding of hostile descriptions and buffers, which must end in a SerializationError (never
another exception, a crash, an unbounded allocation or memory the caller did not expect to share).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from discomfort import datacodec
from discomfort.datacodec import DTYPES, Limits, check, decode, encode
from discomfort.errors import SerializationError
from discomfort.remote import framing

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
try:
    import pyarrow as pa
except ImportError:  # optional extra
    pa = None
needs_arrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")

NP_DTYPES = [d for d in DTYPES if d != "bfloat16"]


# ------------------------------------------------------------------------------------- helpers


def roundtrip(value, writable: bool = True, limits: Limits = datacodec.DEFAULT_LIMITS):
    """encode -> check against the buffer sizes -> decode from copies (bytearray or bytes)."""
    meta, buffers = encode(value, limits)
    assert isinstance(meta, bytes)
    for b in buffers:
        assert isinstance(b, memoryview) and b.format == "B" and b.ndim == 1
    check(meta, [b.nbytes for b in buffers], limits)
    copies = [bytearray(b) if writable else bytes(b) for b in buffers]
    return decode(meta, copies, limits)


def doc(value) -> bytes:
    """A description (meta) whose value tree is ``value``."""
    return json.dumps({"format": 1, "value": value}).encode()


def tensor_node(dtype="float32", shape=(2,), buf=0, device="cpu", grad=False, **extra):
    return {"t": "tensor", "dtype": dtype, "shape": list(shape), "buf": buf, "device": device, "grad": grad, **extra}


def array_node(dtype="float32", shape=(2,), buf=0, scalar=False, **extra):
    return {"t": "ndarray", "dtype": dtype, "shape": list(shape), "buf": buf, "scalar": scalar, **extra}


def refused(meta: bytes, buffers: list, match: str, limits: Limits = datacodec.DEFAULT_LIMITS,
            by_check: bool = True) -> str:
    """Assert decode (and, for description errors, check) refuse with a message matching ``match``."""
    if by_check:
        with pytest.raises(SerializationError, match=match):
            check(meta, [len(b) for b in buffers], limits)
    with pytest.raises(SerializationError, match=match) as info:
        decode(meta, buffers, limits)
    assert type(info.value) is SerializationError
    return str(info.value)


def tensor_bytes(t) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample_tensor(name: str, shape=(2, 3)):
    """A tensor of dtype ``name`` with varied, valid contents (bool only 0/1)."""
    dtype = getattr(torch, name)
    n = math.prod(shape)
    if name == "bool":
        return (torch.arange(n) % 3 == 0).reshape(shape)
    if name.startswith("complex"):
        return torch.randn(shape, dtype=dtype)
    if name.startswith(("float", "bfloat")):
        return (torch.randn(shape) * 100).to(dtype)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, n * DTYPES[name], dtype=np.uint8))
    return raw.view(dtype).reshape(shape)


def sample_array(name: str, shape=(2, 3)):
    rng = np.random.default_rng(1)
    n = math.prod(shape)
    if name == "bool":
        return (np.arange(n) % 3 == 0).reshape(shape)
    return rng.integers(0, 256, n * DTYPES[name], dtype=np.uint8).view(name).reshape(shape)


def run_isolated(code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter so that a segfault fails the test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"child died with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def same(a, b) -> bool:
    """Deep equality that also compares types, dtypes, devices, grad flags and nan/-0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
                and a.requires_grad == b.requires_grad and tensor_bytes(a) == tensor_bytes(b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if pa is not None and isinstance(a, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
        return a.equals(b)
    return a == b


# ------------------------------------------------------------------------------ plain round trips


@pytest.mark.parametrize("value", [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**100, -(10**3999),
    0.0, -0.0, 1.5, 1e308, 5e-324, math.nan, math.inf, -math.inf,
    "", "héllo ☃ \U0001f600", "\0nul", "x" * 10_000,
    b"", b"\0\xff" * 100, bytearray(b"abc"), bytearray(),
], ids=lambda v: repr(v)[:40])
def test_scalar_values_roundtrip_exactly(value):
    """Each plain value comes back equal and of the same type (bool stays bool, -0.0 keeps its sign)."""
    assert same(roundtrip(value), value)
    assert same(roundtrip(value, writable=False), value)


def test_big_ints_travel_as_strings_and_small_ones_as_json():
    """Ints outside [-2**63, 2**64) are encoded as strings so no JSON reader loses precision."""
    assert json.loads(encode(2**64 - 1)[0])["value"] == 2**64 - 1
    assert json.loads(encode(2**64)[0])["value"] == {"t": "int", "v": str(2**64)}
    assert json.loads(encode(math.nan)[0])["value"] == {"t": "float", "v": "nan"}


@pytest.mark.parametrize("digits", [4001, 4101, 5000])
def test_int_too_long_for_the_decoder_is_refused_at_encode(digits):
    """An int the decoder would refuse (more than 4000 digits) must be refused by encode, with a
    SerializationError (not Python's own ValueError from int->str conversion)."""
    n = 10 ** (digits - 1)
    try:
        meta, buffers = encode(n)
    except SerializationError as exc:
        assert "value" in str(exc)
        return
    assert decode(meta, buffers) == n  # if it is sent, it must come back


def test_bytes_and_bytearray_keep_their_type_and_are_independent_copies():
    """bytes come back as bytes, bytearray as a new bytearray that does not alias the frame."""
    meta, buffers = encode([b"ab", bytearray(b"cd")])
    frame = [bytearray(b) for b in buffers]
    out = decode(meta, frame)
    assert type(out[0]) is bytes and type(out[1]) is bytearray and out == [b"ab", bytearray(b"cd")]
    frame[1][0] = ord("Z")
    assert out[1] == bytearray(b"cd")


def test_tuples_lists_and_dicts_keep_their_shape():
    """Tuples are not turned into lists, dict order and str keys are kept, nesting is preserved."""
    value = {"t": "tensor", "z": (1, [2, (3,)], ()), "a": [], "": {"buf": 0, "nested": {"x": [None, (b"q",)]}},
             "format": 1, "value": [[[[]]]]}
    out = roundtrip(value)
    assert same(out, value)
    assert list(out) == list(value)
    assert type(out["z"]) is tuple and type(out["z"][1]) is list and type(out["z"][1][1]) is tuple


def test_dict_that_looks_like_a_node_is_still_a_dict():
    """A user dict holding 't': 'tensor' and other node fields must not be read as a node."""
    value = {"t": "bytes", "buf": 0, "mutable": True}
    assert roundtrip(value) == value


def test_nesting_up_to_the_limit_is_accepted():
    """max_depth levels of containers go through; one more is refused on encode (test below)."""
    value: list = []
    for _ in range(datacodec.DEFAULT_LIMITS.max_depth):
        value = [value]
    assert roundtrip(value) == value


# ------------------------------------------------------------------------------- tensors and arrays


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 3), (), (0,), (3, 0, 2), (1, 1, 1, 5)], ids=str)
def test_torch_every_dtype_roundtrips_bit_exact(name, shape):
    """Every dtype in DTYPES comes back with the same dtype, shape and bytes."""
    t = sample_tensor(name, shape)
    out = roundtrip(t)
    assert same(out, t), (out, t)
    out = roundtrip(t, writable=False)
    assert same(out, t)


@pytest.mark.parametrize("name", NP_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3), (), (0,), (3, 0, 2)], ids=str)
def test_numpy_every_dtype_roundtrips_bit_exact(name, shape):
    """Every numpy dtype in DTYPES (not bfloat16, which numpy lacks) comes back bit-exact."""
    a = sample_array(name, shape)
    out = roundtrip(a)
    assert type(out) is np.ndarray and out.dtype == np.dtype(name) and out.shape == a.shape
    assert out.tobytes() == a.tobytes()


@pytest.mark.parametrize("name", NP_DTYPES)
def test_numpy_0d_scalars_come_back_as_scalars(name):
    """np.float32(1.5) and friends stay numpy scalars of the same type, 0-d arrays stay 0-d arrays."""
    s = sample_array(name, (1,))[0]
    assert isinstance(s, np.generic)
    out = roundtrip(s)
    assert type(out) is type(s) and out.tobytes() == s.tobytes()
    zero_d = np.asarray(s)
    out = roundtrip(zero_d)
    assert type(out) is np.ndarray and out.shape == () and out.tobytes() == zero_d.tobytes()


def test_numpy_float_specials_and_big_endian():
    """nan/inf/-0.0 survive bit-exact; a big-endian array comes back native with the same values."""
    a = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    assert roundtrip(a).tobytes() == a.tobytes()
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    out = roundtrip(be)
    assert out.dtype == np.dtype("int32") and out.dtype.isnative and (out == be).all()


def test_non_contiguous_tensors_and_arrays():
    """Transposes, strided slices, expanded (stride 0), conj and neg views travel as their values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    c = torch.randn(3, 2, dtype=torch.complex64)
    for t in [base.t(), base[::2, 1::3], base[:, 0], torch.tensor([1.0, 2.0]).expand(3, 2), c.conj(),
              torch._neg_view(base) if hasattr(torch, "_neg_view") else -base, base.unsqueeze(0).transpose(0, 2)]:
        out = roundtrip(t)
        assert out.is_contiguous() and out.shape == t.shape and torch.equal(out, t.resolve_conj().resolve_neg())
    a = np.arange(24, dtype=np.int16).reshape(4, 6)
    for v in [a.T, a[::-1, ::2], np.asfortranarray(a), np.broadcast_to(np.arange(3), (4, 3))]:
        out = roundtrip(v)
        assert out.flags.c_contiguous and np.array_equal(out, v)


def test_tensor_grad_flag_parameter_and_float_specials():
    """requires_grad survives for floating tensors; a Parameter arrives as a tensor that needs grad."""
    t = torch.tensor([math.nan, math.inf, -0.0], requires_grad=True)
    out = roundtrip(t)
    assert out.requires_grad and out.is_leaf and tensor_bytes(out) == tensor_bytes(t)
    p = torch.nn.Parameter(torch.ones(2, 2))
    out = roundtrip(p)
    assert type(out) is torch.Tensor and out.requires_grad and torch.equal(out, p.detach())


def test_comfy_value_shapes_roundtrip():
    """IMAGE, MASK, LATENT and CONDITIONING as ComfyUI builds them come back exactly."""
    image = torch.rand(2, 64, 48, 3, dtype=torch.float32)
    mask = torch.rand(2, 64, 48)
    latent = {"samples": torch.randn(2, 4, 8, 6), "batch_index": [0, 1]}
    cond = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 1280)}],
            [torch.randn(1, 77, 768, dtype=torch.float16), {"pooled_output": torch.randn(1, 1280), "strength": 0.5}]]
    value = {"image": image, "mask": mask, "latent": latent, "cond": cond}
    out = roundtrip(value)
    assert same(out, value)
    assert out["image"].shape == (2, 64, 48, 3) and out["image"].dtype == torch.float32
    assert type(out["cond"][0]) is list and type(out["cond"][0][1]) is dict


def test_decode_from_readonly_buffers_gives_writable_tensor_copies():
    """bytes are read-only: the tensor built over them must be a writable copy, not a view of them."""
    t = torch.arange(8, dtype=torch.int32)
    meta, buffers = encode(t)
    frozen = bytes(buffers[0])
    out = decode(meta, [frozen])
    out += 1  # would fault if the tensor viewed the read-only bytes
    assert frozen == tensor_bytes(t) and torch.equal(out, t + 1)


def test_decode_from_writable_buffers_is_zero_copy():
    """A writable buffer (what the client and the store give) is viewed, not copied."""
    t = torch.arange(8, dtype=torch.int32)
    meta, buffers = encode(t)
    frame = bytearray(buffers[0])
    out = decode(meta, [frame])
    frame[0] = 99
    assert out[0].item() == 99


def test_numpy_from_readonly_buffers_is_never_writable_over_them():
    """A numpy array over read-only memory must be read-only (or a writable copy), never writable aliasing."""
    a = np.arange(8, dtype=np.float64)
    meta, buffers = encode(a)
    frozen = bytes(buffers[0])
    out = decode(meta, [frozen])
    assert np.array_equal(out, a)
    if out.flags.writeable:
        out[0] = 42.0
        assert frozen == a.tobytes()
    else:
        with pytest.raises(ValueError):
            out[0] = 42.0


def test_decode_from_misaligned_views():
    """Buffers that start at odd addresses (slices of one frame body) still decode to correct values."""
    value = [torch.arange(5, dtype=torch.float64), np.arange(5, dtype=np.int64)]
    meta, buffers = encode(value)
    body = bytearray(1) + bytearray(buffers[0]) + bytearray(1) + bytearray(buffers[1])
    view = memoryview(body)
    n0 = buffers[0].nbytes
    out = decode(meta, [view[1:1 + n0], view[2 + n0:]])
    assert torch.equal(out[0], value[0]) and np.array_equal(out[1], value[1])


# ------------------------------------------------------------------------------------------ arrow


@needs_arrow
def test_arrow_kinds_roundtrip():
    """Table, RecordBatch, Array and ChunkedArray come back as the same kind with equal contents."""
    table = pa.table({"s": ["a", None, "ccc"], "l": [[1, 2], [], None], "f": [1.5, -0.0, None]})
    chunked = pa.chunked_array([pa.array([1, 2]), pa.array([3])])
    for value in [table, table.to_batches()[0], pa.array(["x", "yy", None]), chunked,
                  pa.table({"a": pa.array([], pa.int64())}), pa.array([], pa.string())]:
        out = roundtrip(value)
        assert type(out) is type(value) and out.equals(value), (value, out)
    out = roundtrip({"t": table, "c": [chunked]}, writable=False)
    assert out["t"].equals(table) and out["c"][0].equals(chunked)


@needs_arrow
def test_arrow_offsets_past_the_data_are_refused_in_a_child():
    """A string array's IPC stream with offsets patched past its data must be refused, not read (or crash)."""
    out = run_isolated("""
        import json
        import numpy as np, pyarrow as pa
        from discomfort import datacodec
        from discomfort.errors import SerializationError
        for typ, off_dtype in [(pa.string(), "<i4"), (pa.binary(), "<i4"), (pa.large_string(), "<i8")]:
            arr = pa.array(["hello", "world", "abc"], typ)
            meta, bufs = datacodec.encode(arr)
            raw = bytes(bufs[0])
            assert datacodec.decode(meta, [raw]).equals(arr)
            offsets = np.array([0, 5, 10, 13], off_dtype).tobytes()
            at = raw.find(offsets)
            assert at > 0, "offsets not found in the IPC stream"
            size = np.dtype(off_dtype).itemsize
            for slot, value in [(3, 1 << 30), (1, 2**31 - 1), (2, -7), (0, 9), (3, 14)]:
                bad = bytearray(raw)
                bad[at + slot * size: at + (slot + 1) * size] = np.array([value], off_dtype).tobytes()
                try:
                    got = datacodec.decode(meta, [bytes(bad)])
                except SerializationError as exc:
                    assert "Arrow data" in str(exc), exc
                    print("refused", typ, slot)
                else:
                    print("ACCEPTED", typ, slot, value, got)
    """)
    assert "ACCEPTED" not in out and out.count("refused") == 15, out


@needs_arrow
def test_arrow_list_offsets_past_the_children_are_refused_in_a_child():
    """The same for a list array: offsets beyond the child array's length."""
    out = run_isolated("""
        import numpy as np, pyarrow as pa
        from discomfort import datacodec
        from discomfort.errors import SerializationError
        arr = pa.array([[1, 2, 3], [4], [5, 6]], pa.list_(pa.int64()))
        meta, bufs = datacodec.encode(arr)
        raw = bytes(bufs[0])
        at = raw.find(np.array([0, 3, 4, 6], "<i4").tobytes())
        assert at > 0
        bad = bytearray(raw)
        bad[at + 12: at + 16] = (1 << 28).to_bytes(4, "little")
        try:
            datacodec.decode(meta, [bytes(bad)])
        except SerializationError as exc:
            print("refused", exc)
    """)
    assert out.startswith("refused") and "Arrow data" in out, out


@needs_arrow
def test_arrow_indices_views_and_run_ends_out_of_range_are_refused_in_a_child():
    """Dictionary indices, string-view buffer references, list-view sizes and run ends patched out of
    range: each must be refused by the full validation, never dereferenced."""
    out = run_isolated("""
        import numpy as np, pyarrow as pa
        from discomfort import datacodec
        from discomfort.errors import SerializationError
        long = "a much longer string value here"
        cases = [
            ("dictionary", pa.array(["a", "b", "a", "b"]).dictionary_encode(), [0, 1, 0, 1], 2, 1000),
            ("run end", pa.RunEndEncodedArray.from_arrays(pa.array([2, 5], pa.int32()), pa.array(["x", "y"])),
             [2, 5], 1, 3),
            ("list view", pa.ListViewArray.from_arrays(pa.array([0, 2], pa.int32()), pa.array([2, 1], pa.int32()),
                                                       pa.array([1, 2, 3])), [2, 1], 1, 100),
            # a long view is [length, 4-byte prefix, buffer index, offset]
            ("string view buffer", pa.array(["short", long], pa.string_view()), [len(long), 0x756d2061], 2, 1000),
            ("string view offset", pa.array(["short", long], pa.string_view()), [len(long), 0x756d2061], 3, 1 << 30),
        ]
        for name, arr, pattern, slot, value in cases:
            meta, bufs = datacodec.encode(arr)
            raw = bytes(bufs[0])
            assert datacodec.decode(meta, [raw]).equals(arr)
            at = raw.find(np.array(pattern, "<i4").tobytes())
            assert at > 0, name
            bad = bytearray(raw)
            bad[at + 4 * slot: at + 4 * slot + 4] = np.array([value], "<i4").tobytes()
            try:
                datacodec.decode(meta, [bytes(bad)])
            except SerializationError as exc:
                assert "Arrow data" in str(exc), exc
                print("refused", name)
            else:
                print("ACCEPTED", name)
    """)
    assert "ACCEPTED" not in out and out.count("refused") == 5, out


@needs_arrow
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "schema only"])
def test_arrow_broken_streams_are_refused(damage):
    """Streams that are cut, random or hold no batch are refused (or, schema only, give an empty value)."""
    arr = pa.array(list(range(100)))
    meta, bufs = encode(arr)
    raw = bytes(bufs[0])
    if damage == "schema only":
        sink = pa.BufferOutputStream()
        pa.ipc.new_stream(sink, pa.schema([("values", pa.int64())])).close()
        out = decode(meta, [sink.getvalue().to_pybytes()])
        assert isinstance(out, pa.Array) and len(out) == 0
        return
    data = {"truncated": raw[: len(raw) // 2], "garbage": bytes(range(256)) * 3, "empty": b""}[damage]
    refused(meta, [data], "Arrow data", by_check=False)


@needs_arrow
def test_arrow_kind_must_fit_the_columns():
    """A two-column stream described as an 'array' or 'chunked' is refused; an unknown kind too."""
    table = pa.table({"a": [1], "b": [2]})
    meta, bufs = encode(table)
    for kind in ("array", "chunked"):
        m = doc({"t": "arrow", "kind": kind, "buf": 0})
        refused(m, [bytes(bufs[0])], f"Arrow {kind} must have one column", by_check=False)
    refused(doc({"t": "arrow", "kind": "frame", "buf": 0}), [bytes(bufs[0])], "unknown Arrow kind 'frame'")


@needs_arrow
def test_arrow_python_extension_types_are_refused():
    """A registered Python extension type, at the top or nested in list/struct/map, is refused."""
    class Ext(pa.ExtensionType):
        def __init__(self):
            super().__init__(pa.int64(), "discomfort.test.ext")

        def __arrow_ext_serialize__(self):
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    pa.register_extension_type(Ext())
    try:
        e = pa.ExtensionArray.from_storage(Ext(), pa.array([1, 2]))
        for value in [e, pa.ListArray.from_arrays(pa.array([0, 2], pa.int32()), e),
                      pa.StructArray.from_arrays([e], names=["x"]), pa.table({"e": e}),
                      pa.MapArray.from_arrays(pa.array([0, 2], pa.int32()), pa.array(["a", "b"]), e)]:
            meta, bufs = encode(value)
            refused(meta, [bytes(b) for b in bufs], "extension type", by_check=False)
    finally:
        pa.unregister_extension_type("discomfort.test.ext")


def _canonical_extension_arrays():
    out = {}
    if hasattr(pa, "uuid"):
        out["uuid"] = pa.ExtensionArray.from_storage(pa.uuid(), pa.array([b"u" * 16], pa.binary(16)))
    if hasattr(pa, "fixed_shape_tensor"):
        typ = pa.fixed_shape_tensor(pa.float32(), [2])
        out["fixed_shape_tensor"] = pa.ExtensionArray.from_storage(typ, pa.array([[1.0, 2.0]], typ.storage_type))
    if hasattr(pa, "bool8"):
        out["bool8"] = pa.ExtensionArray.from_storage(pa.bool8(), pa.array([0, 1, 7], pa.int8()))
    if hasattr(pa, "json_"):
        out["json"] = pa.ExtensionArray.from_storage(pa.json_(), pa.array(['{"a": 1}']))
    if hasattr(pa, "opaque"):
        out["opaque"] = pa.ExtensionArray.from_storage(pa.opaque(pa.int64(), "t", "v"), pa.array([1]))
    return out


@needs_arrow
@pytest.mark.parametrize("nested", [False, True], ids=["top", "in-list"])
@pytest.mark.parametrize("name", ["uuid", "fixed_shape_tensor", "bool8", "json", "opaque"])
def test_arrow_canonical_extension_types_are_refused(name, nested):
    """Arrow's own (C++) extension types must be refused like the Python ones: they subclass
    pa.BaseExtensionType, not pa.ExtensionType."""
    arrays = _canonical_extension_arrays()
    if name not in arrays:
        pytest.skip(f"this pyarrow has no {name}")
    value = arrays[name]
    if nested:
        value = pa.ListArray.from_arrays(pa.array([0, len(value)], pa.int32()), value)
    meta, bufs = encode(value)
    refused(meta, [bytes(b) for b in bufs], "extension type", by_check=False)


@needs_arrow
@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_arrow_compressed_stream_cannot_amplify_memory(compression):
    """A compressed IPC stream of zeros is a few KB that inflates to 32 MiB: the decoder must refuse it
    (this codec never compresses) or at least not build more than 64 times the bytes it received."""
    if not pa.Codec.is_available(compression):
        pytest.skip(f"pyarrow without {compression}")
    zeros = pa.array(np.zeros(4 << 20, np.int64))
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, pa.schema([("values", zeros.type)]), options=opts) as writer:
        writer.write(pa.RecordBatch.from_arrays([zeros], names=["values"]))
    raw = sink.getvalue().to_pybytes()
    assert len(raw) * 64 < zeros.nbytes  # the premise: a bomb
    try:
        out = decode(doc({"t": "arrow", "kind": "array", "buf": 0}), [raw])
    except SerializationError:
        return
    assert out.nbytes <= 64 * len(raw), f"{len(raw)} bytes received, {out.nbytes} bytes built"


# ----------------------------------------------------------------------------- refused on encode


class Custom:
    pass


def _fn():
    pass


@pytest.mark.parametrize("value, path, words", [
    ({1, 2}, "value", "is a set"),
    ({"a": [1, {2}]}, "value['a'][1]", "is a set"),
    ({1: "x"}, "value", "a dict key of type int"),
    ({"k": {(1, 2): 0}}, "value['k']", "a dict key of type tuple"),
    ([Custom()], "value[0]", "Custom"),
    ((0, _fn), "value[1]", "is a function"),
    ([lambda: 1], "value[0]", "is a function"),
    ({"m": print}, "value['m']", "builtin_function_or_method"),
    ([1, 2j], "value[1]", "is a complex"),
    (frozenset(), "value", "frozenset"),
    ([range(3)], "value[0]", "range"),
    ([memoryview(b"x")], "value[0]", "memoryview"),
    ([np.array([1, "a"], dtype=object)], "value[0]", "dtype object cannot be sent"),
    (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]), "value", "cannot be sent"),
    (np.array(["ab"]), "value", "dtype <U2 cannot be sent"),
    (np.array([1], dtype="datetime64[ns]"), "value", "datetime64[ns] cannot be sent"),
    (np.str_("s"), "value", "numpy.str_"),
    (np.ma.masked_array([1, 2]), "value", "MaskedArray"),
    (np.void(b"ab"), "value", "numpy.void"),
])
def test_encode_refuses_with_path_and_type(value, path, words):
    """Every refusal names where in the value the problem sits and what type it is."""
    with pytest.raises(SerializationError) as info:
        encode(value)
    msg = str(info.value)
    assert msg.startswith(path) and words in msg, msg


@pytest.mark.parametrize("make, words", [
    (lambda: torch.ones(3).to_sparse(), "sparse_coo"),
    (lambda: torch.sparse_coo_tensor([[0, 1]], [1.0, 2.0], (3,)), "sparse_coo"),
    (lambda: torch.empty(3, device="meta"), "meta tensor cannot be sent"),
    (lambda: torch.ones(2, dtype=torch.float8_e4m3fn), "dtype torch.float8_e4m3fn cannot be sent"),
    (lambda: torch.ones(2, dtype=torch.complex32), "dtype torch.complex32 cannot be sent"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), "cannot be sent"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_encode_refuses_unsupported_tensors(make, words):
    """Sparse, meta, nested, quantized and exotic-dtype tensors are refused by name, at their path."""
    with pytest.raises(SerializationError) as info:
        encode({"x": [make()]})
    msg = str(info.value)
    assert msg.startswith("value['x'][0]") and words in msg, msg


def test_encode_refuses_tensor_subclasses_and_longdouble():
    """Only exact torch.Tensor/Parameter and numpy's listed dtypes: a subclass is a different type."""
    class MyTensor(torch.Tensor):
        pass

    with pytest.raises(SerializationError, match=r"^value is a .*MyTensor"):
        encode(torch.ones(2).as_subclass(MyTensor))
    if np.dtype(np.longdouble).itemsize > 8:
        with pytest.raises(SerializationError, match="cannot be sent"):
            encode(np.ones(2, dtype=np.longdouble))


def test_encode_refuses_too_deep_and_cycles():
    """Nesting past max_depth is refused with the path; a list that holds itself too, not a RecursionError."""
    value: list = [1]
    for _ in range(40):
        value = [value]
    with pytest.raises(SerializationError, match=r"value\[0\]\[0\].*nested deeper than 32 levels"):
        encode(value)
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(SerializationError, match="nested deeper than"):
        encode(cyc)
    d: dict = {}
    d["self"] = d
    with pytest.raises(SerializationError, match=r"value\['self'\]\['self'\]"):
        encode(d)


def test_encode_limits_on_items_buffers_and_meta():
    """Too many items, too many buffers and a too-large description are refused with the numbers."""
    with pytest.raises(SerializationError, match="more than 10 items"):
        encode(list(range(20)), Limits(max_nodes=10))
    with pytest.raises(SerializationError, match=r"holds 3 arrays or byte strings \(at most 2\)"):
        encode([b"a", np.ones(2), torch.ones(1)], Limits(max_buffers=2))
    with pytest.raises(SerializationError, match=r"description is \d+ bytes \(at most 64\)"):
        encode("x" * 100, Limits(max_meta=64))


# ---------------------------------------------------------------------- hostile descriptions


def test_buffer_index_out_of_range_wrong_type_used_twice_or_unused():
    """Every buffer is used exactly once, by an in-range int index."""
    node = {"t": "bytes", "buf": 1, "mutable": False}
    refused(doc(node), [b"x"], r"buffer index 1 out of range \(1 buffers\)")
    for bad in (-1, "0", 0.0, True, None, [0], 2**64):
        refused(doc({**node, "buf": bad}), [b"x"], "out of range")
    refused(doc([{**node, "buf": 0}, {**node, "buf": 0}]), [b"x"], r"value\[1\]: buffer 0 is used twice")
    refused(doc([tensor_node(shape=[1], buf=0), array_node(shape=[1], buf=0)]), [b"\0" * 4], "used twice")
    refused(doc(None), [b"x"], "buffer 0 is not used by the value")
    refused(doc({**node, "buf": 0}), [b"x", b""], "buffer 1 is not used by the value")


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
def test_byte_count_must_match_shape_times_itemsize(kind):
    """A shape that does not fill its buffer exactly (short or long) is refused, with both numbers."""
    make = tensor_node if kind == "tensor" else array_node
    refused(doc(make("float32", [3])), [b"\0" * 8], r"is 12 bytes but its buffer has 8")
    refused(doc(make("float32", [3])), [b"\0" * 16], r"is 12 bytes but its buffer has 16")
    refused(doc(make("complex128", [2, 2])), [b"\0" * 63], r"is 64 bytes but its buffer has 63")
    refused(doc(make("uint8", [])), [b""], r"is 1 bytes but its buffer has 0")


def test_huge_announced_tensor_is_refused_by_check_without_allocating():
    """A description announcing a 2**60-byte tensor with small buffers is refused before any buffer exists."""
    meta = doc(tensor_node("float64", [2**20, 2**20, 2**17]))
    with pytest.raises(SerializationError, match="bytes but its buffer has 16"):
        check(meta, [16])
    with pytest.raises(SerializationError, match=r"bytes of buffers \(at most"):
        check(meta, [2**60])  # announcing the size itself is over max_bytes
    with pytest.raises(SerializationError, match=r"5 buffers \(at most 4\)"):
        check(doc(None), [0] * 5, Limits(max_buffers=4))


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
@pytest.mark.parametrize("dtype", ["float128", "object", "O", "", "Float32", "float32 ", "torch.float32", "<f4",
                                   "void", "str", "complex32", "float8_e4m3fn", 5, None, ["float32"], True])
def test_dtype_must_be_in_the_list(kind, dtype):
    """Only the names in DTYPES, exactly: no numpy dtype strings, no object, no structured types."""
    make = tensor_node if kind == "tensor" else array_node
    refused(doc(make(dtype, [1])), [b"\0" * 8], "is not one of")


def test_bfloat16_is_only_for_tensors():
    """numpy has no bfloat16: an ndarray node with it is refused, a tensor node is fine."""
    refused(doc(array_node("bfloat16", [2])), [b"\0" * 4], "dtype 'bfloat16' is not one of")
    assert decode(doc(tensor_node("bfloat16", [2])), [b"\0" * 4]).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
@pytest.mark.parametrize("shape", [[-1], [2, -3], [1.0], ["2"], [True], [None], [[2]], "2", 2, None, {"0": 2},
                                   [1] * 17])
def test_shape_must_be_few_non_negative_ints(kind, shape):
    """Negative, non-int (bool and float included), nested and over-16-dimension shapes are refused."""
    make = tensor_node if kind == "tensor" else array_node
    node = make("uint8", [1])
    node["shape"] = shape
    refused(doc(node), [b"\0"], "must be at most 16 non-negative ints")


def test_zero_size_shapes_with_absurd_dims_are_refused_not_crashing():
    """[0, 2**70] holds 0 bytes, so it passes check; building it must give a SerializationError."""
    for make in (tensor_node, array_node):
        for shape in ([0, 2**70], [2**62, 4, 0], [2**40, 2**40, 0]):
            meta = doc(make("float32", shape))
            check(meta, [0])
            with pytest.raises(SerializationError, match="cannot build the value"):
                decode(meta, [b""])
    assert decode(doc(array_node("float32", [0, 3, 0])), [b""]).shape == (0, 3, 0)


@pytest.mark.parametrize("kind", ["tensor", "ndarray"])
@pytest.mark.parametrize("data", [b"\x02", b"\x00\x01\xff", b"\x01\x00\x80\x00"])
def test_bool_bytes_other_than_0_and_1_are_refused(kind, data):
    """A bool tensor/array over bytes like 2 or 255 is undefined behaviour in torch/numpy: refused."""
    make = tensor_node if kind == "tensor" else array_node
    meta = doc(make("bool", [len(data)]))
    check(meta, [len(data)])  # sizes fit: only decode sees the contents
    refused(meta, [data], "bool .* holds bytes other than 0 and 1", by_check=False)
    refused(meta, [bytearray(data)], "bool .* holds bytes other than 0 and 1", by_check=False)
    assert decode(meta, [bytes(len(data))]).sum() == 0


@pytest.mark.parametrize("device", ["gpu", "CPU", "cpu ", " cpu", "cuda:1234", "cuda:", "cuda:-1", "meta", "disk",
                                    "", "cpu:0:0", "cuda:0\0", 0, None, ["cpu"], "cpu\n"])
def test_device_must_match_the_whitelist(device):
    """Only cpu/cuda/mps/xpu with an optional index of at most 3 digits, matched in full."""
    refused(doc(tensor_node(device=device)), [b"\0" * 8], "device")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:999", "xpu", "xpu:1", "mps", "mps:0"])
def test_device_that_is_absent_here_is_a_serialization_error(device):
    """A whitelisted device this machine lacks (or torch was built without) must be a SerializationError,
    not the AssertionError torch raises for 'Torch not compiled with CUDA enabled'."""
    meta = doc(tensor_node(device=device))
    check(meta, [8])
    try:
        out = decode(meta, [b"\0" * 8])
    except SerializationError as exc:
        assert str(exc)
    else:
        assert out.device.type == device.split(":")[0]


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int32", "int64", "uint64"])
def test_grad_only_on_floating_dtypes(dtype):
    """'grad': true on an integer tensor (torch would raise) and non-bool grad values are refused."""
    n = DTYPES[dtype]
    refused(doc(tensor_node(dtype, [1], grad=True)), [b"\0" * n], "'grad' must be a bool, true only for floating")
    for bad in (1, 0, "true", None):
        refused(doc(tensor_node("float32", [1], grad=bad)), [b"\0" * 4], "'grad' must be a bool")
    for ok in ("float16", "bfloat16", "float64", "complex64"):
        assert decode(doc(tensor_node(ok, [1], grad=True)), [b"\0" * DTYPES[ok]]).requires_grad


def test_scalar_flag_only_for_0d_arrays():
    """'scalar' is a bool, true only with shape []."""
    refused(doc(array_node("int8", [1], scalar=True)), [b"\0"], "'scalar' must be a bool")
    refused(doc(array_node("int8", [], scalar=1)), [b"\0"], "'scalar' must be a bool")
    out = decode(doc(array_node("int8", [], scalar=True)), [b"\x07"])
    assert type(out) is np.int8 and out == 7


@pytest.mark.parametrize("node", [
    {"t": "pickle", "data": "gASV"}, {"t": "tensor"}, {"t": 5}, {}, {"x": 1}, {"t": None},
    {**tensor_node(), "extra": 1}, {**array_node(), "device": "cpu"}, {"t": "bytes", "buf": 0},
    {"t": "bytes", "buf": 0, "mutable": False, "owner": "os.system"}, {"t": "tuple", "items": [], "x": 0},
    {"t": "dict", "items": [], "cls": "builtins.set"}, {"t": "arrow", "kind": "table"},
    {"t": "__proto__", "items": []}, {"t": "tensor ", "dtype": "uint8"},
])
def test_unknown_node_kinds_and_extra_or_missing_fields(node):
    """A node is recognised only with exactly its own fields; anything else is refused by name."""
    refused(doc([node]), [b"\0" * 8], r"value\[0\]: unknown item")


@pytest.mark.parametrize("node, words", [
    ({"t": "tuple", "items": {"a": 1}}, "tuple items must be a list"),
    ({"t": "dict", "items": {"a": 1}}, "dict items must be a list"),
    ({"t": "dict", "items": [["a"]]}, "a dict item must be"),
    ({"t": "dict", "items": [[1, 2]]}, "a dict item must be"),
    ({"t": "dict", "items": [["a", 1, 2]]}, "a dict item must be"),
    ({"t": "dict", "items": ["ab"]}, "a dict item must be"),
    ({"t": "int", "v": 5}, "not an integer"),
    ({"t": "int", "v": "1_000"}, "not an integer"),
    ({"t": "int", "v": " 12"}, "not an integer"),
    ({"t": "int", "v": "0x10"}, "not an integer"),
    ({"t": "int", "v": "\u0661\u0662"}, "not an integer"),
    ({"t": "int", "v": "9" * 4001}, "not an integer"),
    ({"t": "int", "v": ""}, "not an integer"),
    ({"t": "float", "v": "1.5"}, "is not nan, inf or -inf"),
    ({"t": "float", "v": "NaN"}, "is not nan, inf or -inf"),
    ({"t": "float", "v": float("1e308")}, "is not nan, inf or -inf"),
    ({"t": "bytes", "buf": 0, "mutable": 1}, "'mutable' must be a bool"),
])
def test_malformed_containers_and_scalars(node, words):
    """Typed nodes with the right fields but wrong contents are refused by what is wrong."""
    buffers = [b"x"] if node.get("t") == "bytes" else []
    refused(doc(node), buffers, words)


def test_int_and_float_nodes_that_are_valid():
    """The accepted forms of the int and float nodes, at their limits."""
    assert decode(doc({"t": "int", "v": "-" + "9" * 4000}), []) == -int("9" * 4000)
    assert math.isnan(decode(doc({"t": "float", "v": "nan"}), []))
    assert decode(doc({"t": "float", "v": "-inf"}), []) == -math.inf


@pytest.mark.parametrize("meta, words", [
    (b'{"format":1,"value":NaN}', "NaN is not JSON"),
    (b'{"format":1,"value":[Infinity]}', "Infinity is not JSON"),
    (b'{"format":1,"value":{"t":"float","v":-Infinity}}', "-Infinity is not JSON"),
    (b'{"format":1,"value":"\xff"}', "not UTF-8 JSON"),
    (b'{"format":1,"value":"\xed\xa0\x80"}', "not UTF-8 JSON"),
    (b'\xef\xbb\xbf{"format":1,"value":1}', "not UTF-8 JSON"),
    (b'{"format":1,"value":1', "not UTF-8 JSON"),
    (b'{"format":1,"value":1} x', "not UTF-8 JSON"),
    (b"", "not UTF-8 JSON"),
    (b'{"format":1,"value":' + b"9" * 100_000 + b"}", "not UTF-8 JSON"),
    (b"[1]", "the top level must be"),
    (b'{"format":1}', "the top level must be"),
    (b'{"format":1,"value":1,"extra":0}', "the top level must be"),
    (b'{"format":2,"value":1}', "format 2; this side reads format 1"),
    (b'{"format":"1","value":1}', "format '1'"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"format":1,"value":' + b'{"a":' * 100_000, "nested too deeply"),
])
def test_meta_that_is_not_a_description(meta, words):
    """Non-JSON constants, non-UTF-8 bytes, huge int literals and 100000-deep nesting are all
    SerializationErrors (never a RecursionError, a ValueError or a crash)."""
    refused(meta, [], words)


def test_deep_json_in_a_child_cannot_crash():
    """100000 '[' and deep node nesting in a fresh interpreter: a C stack overflow would kill it."""
    out = run_isolated("""
        from discomfort import datacodec
        from discomfort.errors import SerializationError
        metas = [b"[" * 100_000, b"{\\"a\\":" * 200_000, b'{"format":1,"value":' + b"[" * 1_000_000,
                 b'{"format":1,"value":' + b'{"t":"tuple","items":[' * 50_000]
        for meta in metas:
            for fn in (lambda: datacodec.check(meta, []), lambda: datacodec.decode(meta, [])):
                try:
                    fn()
                except SerializationError as exc:
                    print("refused", str(exc)[:40])
    """)
    assert out.count("refused") == 8, out


def test_node_nesting_past_the_limit_is_refused_with_the_path():
    """A valid-JSON description nested past max_depth by nodes (not JSON depth) is refused."""
    value: object = None
    for _ in range(40):
        value = {"t": "tuple", "items": [value]}
    refused(doc(value), [], r"value\[0\]\[0\].*nested deeper than 32 levels")


def test_decode_limits_on_meta_nodes_buffers_and_bytes():
    """Every limit applies on decode too, checked before building."""
    refused(doc(list(range(10))), [], r"more than 5 items", Limits(max_nodes=5))
    refused(doc("x" * 100), [], r"\d+ bytes of description \(at most 50\)", Limits(max_meta=50))
    refused(doc([{"t": "bytes", "buf": i, "mutable": False} for i in range(3)]), [b"a", b"b", b"c"],
            r"3 buffers \(at most 2\)", Limits(max_buffers=2))
    refused(doc({"t": "bytes", "buf": 0, "mutable": False}), [b"x" * 10], r"10 bytes of buffers \(at most 9\)",
            Limits(max_bytes=9))


def test_check_and_decode_accept_memoryview_meta_and_odd_buffer_types():
    """meta may be a memoryview slice of a frame; buffers may be bytes, bytearray or memoryviews."""
    value = [torch.arange(3), np.arange(3.0), b"abc"]
    meta, buffers = encode(value)
    frame = memoryview(b"junk" + meta + b"junk")[4:-4]
    check(frame, [b.nbytes for b in buffers])
    out = decode(frame, [bytes(buffers[0]), bytearray(buffers[1]), memoryview(bytes(buffers[2]))])
    assert same(out, value)


# -------------------------------------------------------------------------------------- framing


def test_frame_roundtrip_through_parse_header():
    """A FrameBody's bytes parse back to the same metadata and buffers, which decode to the value."""
    value = {"img": torch.rand(1, 4, 4, 3), "n": 3}
    meta, buffers = encode(value)
    body = framing.FrameBody(meta, buffers, chunk=7)
    data = b"".join(bytes(c) for c in body)
    assert len(data) == len(body) == framing.frame_length(len(meta), [b.nbytes for b in buffers])
    meta_len, sizes, head = framing.parse_header(data)
    assert meta_len == len(meta) and sizes == [b.nbytes for b in buffers]
    got_meta = data[head: head + meta_len]
    check(got_meta, sizes)
    pos, bufs = head + meta_len, []
    for n in sizes:
        bufs.append(bytearray(data[pos: pos + n]))
        pos += n
    assert same(decode(got_meta, bufs), value)


@pytest.mark.parametrize("patch, words", [
    (lambda h: b"XCFD" + h[4:], "not a discomfort value frame"),
    (lambda h: h[:4] + (1).to_bytes(2, "little") + h[6:], "frame format version 1"),
    (lambda h: h[:6] + (4).to_bytes(2, "little") + h[8:], "unknown frame flags 0x4"),
    (lambda h: h[:8] + (5000).to_bytes(4, "little") + h[12:], "announces 5000 buffers"),
    (lambda h: h[:12] + (1 << 40).to_bytes(8, "little"), "bytes of metadata"),
    (lambda h: h[:10], "truncated frame header"),
])
def test_parse_header_refuses_bad_fixed_headers(patch, words):
    """Magic, version, flags, buffer count and metadata length are all checked, with ValueError."""
    head = framing.frame_header(10, [1, 2])
    fixed = patch(head[: framing.HEAD.size])
    rest = head[framing.HEAD.size:] if len(fixed) == framing.HEAD.size else b""
    with pytest.raises(ValueError, match=words):
        framing.parse_header(fixed + rest)


def test_parse_header_refuses_short_size_table_and_huge_totals():
    """A buffer table cut short, or sizes that add up past max_bytes, are refused before allocating."""
    head = framing.frame_header(10, [1, 2, 3])
    with pytest.raises(ValueError, match="truncated buffer table"):
        framing.parse_header(head[:-3])
    huge = framing.frame_header(10, [2**63, 2**63])
    with pytest.raises(ValueError, match="bytes of buffers"):
        framing.parse_header(huge)
    with pytest.raises(ValueError, match=r"bytes of buffers \(at most 100\)"):
        framing.parse_header(framing.frame_header(10, [60, 41]), Limits(max_bytes=100))
