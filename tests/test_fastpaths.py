"""The fast paths of issue 17: the codec's bare-tensor and atom encoders and its cached tensor
decode, and the store's one-lock put of small values. Behaviour only: their speed is measured by
`discomfort bench` and benchmarks/, never asserted here."""

from __future__ import annotations

import os
import pickle

import pytest

from discomfort import codecs

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

MiB = 1 << 20


def tensors():
    yield "float32", torch.rand(2, 3, 4)
    yield "bfloat16", torch.rand(5, 7).to(torch.bfloat16)
    yield "float16", torch.rand(3).half()
    yield "int64", torch.arange(10)
    yield "bool", torch.rand(6) > 0.5
    yield "complex64", torch.rand(4, dtype=torch.complex64)
    yield "scalar", torch.tensor(3.5)
    yield "empty", torch.empty(0, 3)
    yield "latent", torch.rand(1, 4, 64, 64)
    yield "grad", torch.rand(3, 3, requires_grad=True)


TENSORS = list(tensors())


@pytest.mark.parametrize("name, t", TENSORS, ids=[n for n, _ in TENSORS])
def test_fast_tensor_encoding_equals_the_general_one(name, t):
    fast = codecs.encode_fast(t)
    assert fast is not None
    meta, bufs = codecs.encode(t)
    assert fast[0] == meta
    assert [bytes(b) for b in fast[1]] == [bytes(b) for b in bufs]
    assert all(b.ndim == 1 and b.format == "B" and b.c_contiguous for b in fast[1])


@pytest.mark.parametrize("name, t", TENSORS, ids=[n for n, _ in TENSORS])
@pytest.mark.parametrize("cold", [False, True], ids=["cached", "cold"])
def test_fast_tensor_round_trip_is_a_view(name, t, cold):
    meta, bufs = codecs.encode_fast(t)
    if cold:  # another process: the spec is learned from the meta
        codecs._tensor_specs.clear()
    store = memoryview(bytearray(bytes(bufs[0])))  # what a store hands back: writable bytes
    out = codecs.decode(meta, [store])
    assert out.dtype == t.dtype and out.shape == t.shape and out.requires_grad == t.requires_grad
    assert torch.equal(out.detach(), t.detach())
    if t.numel():  # a view over the store's buffer, not a copy
        addr = np.frombuffer(store, np.uint8).ctypes.data
        assert out.data_ptr() == addr
    # The general decoder (pickle, as Ray's unpickler reads it) gives the same value.
    again = pickle.loads(meta, buffers=[memoryview(bytearray(bytes(bufs[0])))])
    assert torch.equal(again.detach(), t.detach()) and again.dtype == t.dtype


def test_decode_copies_a_read_only_buffer():
    t = torch.rand(16)
    meta, bufs = codecs.encode_fast(t)
    out = codecs.decode(meta, [memoryview(bytes(bufs[0]))])
    assert torch.equal(out, t)
    out += 1  # writable: its own memory


def test_the_same_meta_from_another_shape_or_dtype_never_mixes():
    a, b = torch.rand(2, 8), torch.rand(4, 4)
    ma, mb = codecs.encode_fast(a)[0], codecs.encode_fast(b)[0]
    assert ma != mb
    assert codecs.decode(mb, [memoryview(bytearray(b.numpy().tobytes()))]).shape == (4, 4)
    c = a.double()
    assert codecs.decode(codecs.encode_fast(c)[0], [memoryview(bytearray(c.numpy().tobytes()))]).dtype == torch.float64


@pytest.mark.parametrize("value", [
    torch.rand(4, 4).t(),  # not contiguous
    torch.nn.Parameter(torch.rand(3)),  # a subclass
    torch.rand(3, dtype=torch.complex64).conj(),  # conjugate bit
    torch.empty(3, device="meta"),
    bytearray(b"abc"),  # out of band in the general path
    [torch.rand(2)],
    {"samples": torch.rand(2)},
    object(),
], ids=["transposed", "parameter", "conj", "meta", "bytearray", "list", "dict", "object"])
def test_fast_encoder_leaves_other_values_to_the_general_path(value):
    assert codecs.encode_fast(value) is None


@pytest.mark.parametrize("value", [0, -7, 2**80, 1.5, "text", "", b"raw", True, None, 1 + 2j])
def test_fast_atoms_round_trip(value):
    meta, bufs = codecs.encode_fast(value)
    assert bufs == []
    assert codecs.decode(meta, bufs) == value
    assert codecs.decode(*codecs.encode(value)) == value


def test_context_round_trips_through_the_fast_paths(backend, tmp_path):
    from discomfort.context import WorkflowContext

    with WorkflowContext(backend=backend, ram_budget=64 * MiB, disk_dir=str(tmp_path)) as ctx:
        t = torch.rand(1, 4, 64, 64)
        ctx.save("latent", t)
        view = ctx.load("latent")
        assert torch.equal(view, t)
        ctx.save("latent", t * 2)  # a loop: the previous view is held
        assert torch.equal(view, t) and torch.equal(ctx.load("latent"), t * 2)
        ctx.save("n", 42)
        assert ctx.load("n") == 42
        with pytest.raises(ValueError):
            ctx.save("bad", t, pass_by="sometimes")


# ---- the store's one-lock put ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 4096, 65536, MiB - 4096, MiB, 2 * MiB])
def test_put_around_the_one_lock_threshold(make_store, size):
    s = make_store(64 * MiB)
    data = os.urandom(size)
    v1 = s.put("k", b"meta", [data, b"tail"])
    meta, views, info = s.get("k")
    assert meta == b"meta" and bytes(views[0]) == data and bytes(views[1]) == b"tail"
    assert info["version"] == v1
    v2 = s.put("k", b"meta2", [data[::-1]])  # replaces, while the views of v1 are held
    assert v2 > v1 and bytes(views[0]) == data
    assert bytes(s.get("k")[1][0]) == data[::-1]
    st = s.stats()
    assert st["objects_ram"] == 1 and st["reserved"] == 0


def test_small_put_without_room_in_ram_goes_to_disk(make_store):
    s = make_store(0)
    s.put("k", b"m", [b"x" * 1000])
    assert s.info("k")["tier"] == "disk" and bytes(s.get("k")[1][0]) == b"x" * 1000


def test_small_put_without_room_and_without_disk_is_refused(make_store):
    from discomfort.errors import StoreFullError

    s = make_store(0, disk=False)
    with pytest.raises(StoreFullError):
        s.put("k", b"m", [b"x" * 1000])
    assert s.stats()["reserved"] == 0


def test_small_put_checks_its_arguments_first(make_store):
    from discomfort.errors import InvalidKeyError

    s = make_store(64 * MiB)
    with pytest.raises(InvalidKeyError):
        s.put("", b"m", [b"x"])
    with pytest.raises(ValueError):
        s.put("k", b"m", [np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2]])
    assert s.keys() == [] and s.stats()["reserved"] == 0


def test_forked_child_cannot_use_the_parents_handle(make_store):
    from discomfort.errors import StoreClosedError

    s = make_store(64 * MiB)
    s.put("k", b"", [b"x"])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by exit status
        try:
            s.put("k", b"", [b"y"])
        except StoreClosedError:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(s.get("k")[1][0]) == b"x"
