// discomfort._core: registers the C++ store with Python and forwards to it. Arguments are
// taken out of Python objects first; the GIL is dropped around every store call (locks,
// copies, file I/O), which never touch Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "discomfort/errors.hpp"
#include "discomfort/pool.hpp"
#include "discomfort/store.hpp"

#ifndef DISCOMFORT_VERSION
#define DISCOMFORT_VERSION "0.0.0"
#endif

namespace py = pybind11;
using namespace discomfort;

namespace {

// ---- errors ------------------------------------------------------------------------------------

const char* error_class(ErrorCode code) {
    switch (code) {
        case ErrorCode::UnknownKey: return "UnknownKeyError";
        case ErrorCode::UnknownRun: return "UnknownRunError";
        case ErrorCode::RunFinished: return "RunFinishedError";
        case ErrorCode::InvalidKey: return "InvalidKeyError";
        case ErrorCode::InvalidRunId: return "InvalidRunIdError";
        case ErrorCode::StoreFull: return "StoreFullError";
        case ErrorCode::DiskFull: return "DiskFullError";
        case ErrorCode::Corrupted: return "CorruptedStoreError";
        case ErrorCode::Access: return "StoreAccessError";
        case ErrorCode::UnsafeDirectory: return "UnsafeDirectoryError";
        case ErrorCode::Closed: return "StoreClosedError";
        default: return nullptr;
    }
}

void raise_store_error(const StoreError& e) {
    // Messages may quote bytes of a damaged segment: never let them fail to decode.
    const std::string what = e.what();
    py::str message = py::reinterpret_steal<py::str>(
        PyUnicode_DecodeUTF8(what.data(), py::ssize_t(what.size()), "backslashreplace"));
    if (!message) throw py::error_already_set();
    py::object instance;
    if (e.code() == ErrorCode::InvalidArgument) {
        instance = py::reinterpret_borrow<py::object>(PyExc_ValueError)(message);
    } else if (e.code() == ErrorCode::System) {
        instance = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.error_number(), message);
    } else {
        instance = py::module_::import("discomfort.errors").attr(error_class(e.code()))(message);
    }
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(instance.ptr())), instance.ptr());
}

// ---- arguments ---------------------------------------------------------------------------------

std::string key_arg(py::handle key) {
    if (!PyUnicode_Check(key.ptr()))
        throw StoreError(ErrorCode::InvalidKey, std::string("key must be a str, not ") + Py_TYPE(key.ptr())->tp_name);
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(key.ptr(), &n);
    if (!s) {
        PyErr_Clear();
        throw StoreError(ErrorCode::InvalidKey, "key is not valid UTF-8");
    }
    return std::string(s, size_t(n));
}

std::string run_id_arg(py::handle run_id) {
    if (!PyUnicode_Check(run_id.ptr()))
        throw StoreError(ErrorCode::InvalidRunId, "run id " + py::repr(run_id).cast<std::string>() +
                                                      " is not 1-64 characters of [A-Za-z0-9_-]");
    return run_id.cast<std::string>();
}

// Paths travel as bytes in the filesystem encoding (os.fsencode / os.fsdecode), like _pystore.
std::string path_arg(py::handle path) {
    return py::module_::import("os").attr("fsencode")(path).cast<std::string>();
}

py::str path_str(const std::string& path) {
    PyObject* s = PyUnicode_DecodeFSDefaultAndSize(path.data(), py::ssize_t(path.size()));
    if (!s) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(s);
}

uint64_t non_negative(py::handle value, const char* what) {
    if (!PyLong_Check(value.ptr()))
        throw py::value_error(std::string(what) + " must be a non-negative int, not " + py::repr(value).cast<std::string>());
    py::int_ v = py::reinterpret_borrow<py::int_>(value);
    if (v < py::int_(0))
        throw py::value_error(std::string(what) + " must be a non-negative int, not " + py::repr(value).cast<std::string>());
    unsigned long long n = PyLong_AsUnsignedLongLong(v.ptr());
    if (PyErr_Occurred()) throw py::error_already_set();
    return n;
}

// A borrowed buffer of a Python object, given back when it goes (with the GIL held).
class HeldBuffer {
public:
    HeldBuffer(py::handle obj, bool contiguous_check) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, contiguous_check ? PyBUF_STRIDES : PyBUF_SIMPLE) != 0)
            throw py::error_already_set();
        if (contiguous_check && !PyBuffer_IsContiguous(&view_, 'C')) {
            PyBuffer_Release(&view_);
            throw py::value_error("put() needs C-contiguous buffers");
        }
        held_ = true;
    }
    ~HeldBuffer() {
        if (held_) PyBuffer_Release(&view_);
    }
    HeldBuffer(const HeldBuffer&) = delete;
    HeldBuffer& operator=(const HeldBuffer&) = delete;
    const void* data() const { return view_.buf; }
    uint64_t size() const { return uint64_t(view_.len); }

private:
    Py_buffer view_{};
    bool held_ = false;
};

// ---- views -------------------------------------------------------------------------------------

// The object behind a get() view or a reservation buffer: exports its region through the
// buffer protocol (writable), and keeps it (its mapping, its pin) alive while any memoryview
// slicing it is.
struct RegionBuffer {
    std::shared_ptr<Region> region;
};

py::list views_of(const std::shared_ptr<Region>& region, const std::vector<Span>& spans) {
    py::object owner = py::cast(RegionBuffer{region});
    py::object whole = py::reinterpret_steal<py::object>(PyMemoryView_FromObject(owner.ptr()));
    if (!whole) throw py::error_already_set();
    py::list out;
    for (const Span& s : spans)
        out.append(whole[py::slice(py::int_(s.offset), py::int_(s.offset + s.length), py::none())]);
    return out;
}

// ---- reservations ------------------------------------------------------------------------------

struct PyReservation {
    std::unique_ptr<Reservation> res;
    py::list buffers;

    uint64_t seal() {
        Reservation* r = res.get();
        buffers = py::list();
        py::gil_scoped_release nogil;
        return r->seal();
    }
    void abort() {
        Reservation* r = res.get();
        buffers = py::list();
        py::gil_scoped_release nogil;
        r->abort();
    }
};

py::dict stats_dict(const Stats& st) {
    py::dict d;
    d["run_id"] = st.run_id;
    d["objects_ram"] = st.objects_ram;
    d["objects_disk"] = st.objects_disk;
    d["bytes_ram"] = st.bytes_ram;
    d["bytes_disk"] = st.bytes_disk;
    d["reserved"] = st.reserved;
    d["ram_capacity"] = st.ram_capacity;
    d["ram_budget"] = st.ram_budget;
    d["chunks"] = st.chunks;
    d["pins"] = st.pins;
    d["pinned_bytes"] = st.pinned_bytes;
    d["slots_used"] = st.slots_used;
    d["epoch"] = st.epoch;
    d["next_version"] = st.next_version;
    return d;
}

py::dict info_dict(const ObjectInfo& info) {
    py::dict d;
    d["key"] = info.key;
    d["tier"] = tier_name(info.tier);
    d["version"] = info.version;
    d["size"] = info.size;
    d["nbuf"] = info.nbuf;
    d["nbytes"] = info.nbytes;
    d["meta_len"] = info.meta_len;
    d["chunk"] = info.chunk ? py::object(py::int_(*info.chunk)) : py::object(py::none());
    d["offset"] = info.offset;
    return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "The compiled store core of discomfort (docs/FORMAT.md); discomfort._pystore has the same API.";
    m.attr("__version__") = DISCOMFORT_VERSION;
    m.attr("FORMAT_VERSION") = kFormatVersion;
    m.attr("SMALL_OBJECT_BYTES") = kSmallObjectBytes;

    m.def(
        "pool_info",
        [] {
            PoolInfo info;
            {
                py::gil_scoped_release nogil;
                info = pool_info();
            }
            py::list files;
            for (const PoolFile& f : info.files) {
                py::dict d;
                d["path"] = path_str(f.path);
                d["size"] = f.size;
                d["inode"] = f.inode;
                files.append(d);
            }
            py::dict d;
            d["prefix"] = info.prefix;
            d["bytes"] = info.bytes;
            d["limit"] = info.limit;
            d["files"] = files;
            return d;
        },
        "This process's pool of chunks given back by finished runs: prefix, bytes, limit, files.");
    m.def("release_pool", &release_pool, py::call_guard<py::gil_scoped_release>(),
          "Unlink every pooled chunk; returns the bytes given back.");
    m.def(
        "set_pool_limit",
        [](py::handle bytes) {
            set_pool_limit(bytes.is_none() ? std::nullopt : std::optional<uint64_t>(non_negative(bytes, "limit")));
        },
        py::arg("nbytes"), "The most bytes the pool keeps; None: the largest RAM budget of a pooling store.");
    // The pool's files go with the process (a static destructor could run while stores still
    // use the pool). Runs destroyed after it give nothing back: their chunks are removed.
    py::module_::import("atexit").attr("register")(py::cpp_function([] {
        py::gil_scoped_release nogil;
        close_pool();
    }));

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const StoreError& e) {
            raise_store_error(e);
        }
    });

    py::class_<RegionBuffer>(m, "_Buffer", py::buffer_protocol())
        .def_buffer([](RegionBuffer& b) {
            return py::buffer_info(b.region->data, 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {py::ssize_t(b.region->size)}, {py::ssize_t(1)}, false);
        });

    py::class_<PyReservation>(m, "Reservation",
                              "A reserved, not yet visible object: fill `buffers`, then `seal()` (or `abort()`).\n"
                              "The buffers must not be used after seal/abort.")
        .def_property_readonly("key", [](const PyReservation& r) { return r.res->key(); })
        .def_property_readonly("buffers", [](const PyReservation& r) { return r.buffers; })
        .def_property_readonly("tier", [](const PyReservation& r) { return tier_name(r.res->tier()); })
        .def("seal", &PyReservation::seal)
        .def("abort", &PyReservation::abort)
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__", [](PyReservation& r, py::handle exc_type, py::handle, py::handle) {
            if (!exc_type.is_none()) {
                r.abort();
            } else if (!r.res->done()) {
                r.seal();
            }
        })
        .def("__repr__", [](const PyReservation& r) {
            return "<discomfort._core.Reservation key=" + py::repr(py::str(r.res->key())).cast<std::string>() +
                   " tier=" + tier_name(r.res->tier()) + (r.res->done() ? " done>" : ">");
        });

    py::class_<Store, std::shared_ptr<Store>>(m, "Store", "A run's object store: RAM chunks in shared memory, "
                                                          "overflow files on disk.")
        .def_static(
            "create",
            [](py::handle run_id, py::handle ram_budget, py::handle disk_root, py::handle shm_dir,
               py::handle mem_probe, bool pool) {
                std::string id = run_id_arg(run_id);
                uint64_t budget = non_negative(ram_budget, "ram_budget");
                std::optional<std::string> root;
                if (!disk_root.is_none()) root = path_arg(disk_root);
                std::string shm = path_arg(shm_dir), probe = path_arg(mem_probe);
                py::gil_scoped_release nogil;
                return Store::create(id, budget, root, shm, probe, pool);
            },
            py::arg("run_id"), py::kw_only(), py::arg("ram_budget"), py::arg("disk_root") = py::none(),
            py::arg("shm_dir") = "/dev/shm", py::arg("mem_probe") = "/proc/meminfo", py::arg("pool") = false)
        .def_static(
            "attach",
            [](py::handle run_id, py::handle shm_dir) {
                std::string id = run_id_arg(run_id), shm = path_arg(shm_dir);
                py::gil_scoped_release nogil;
                return Store::attach(id, shm);
            },
            py::arg("run_id"), py::kw_only(), py::arg("shm_dir") = "/dev/shm")
        .def_property_readonly("run_id", &Store::run_id)
        .def_property_readonly("owner", &Store::owner)
        .def_property_readonly("closed", &Store::closed)
        .def_property_readonly("finished", &Store::finished)
        .def_property_readonly("slot", &Store::slot)
        .def_property_readonly("disk_dir",
                               [](const Store& s) -> py::object {
                                   if (!s.disk_dir()) return py::none();
                                   return path_str(*s.disk_dir());
                               })
        .def_property_readonly("shm_dir", [](const Store& s) { return path_str(s.shm_dir()); })
        .def(
            "chunk_path", [](const Store& s, uint64_t index) { return path_str(s.chunk_path(index)); },
            py::arg("index"))
        .def(
            "reserve",
            [](Store& s, py::handle key, py::handle meta, py::iterable sizes) {
                std::string k = key_arg(key);
                HeldBuffer m(meta, false);
                std::vector<uint64_t> n;
                for (py::handle size : sizes) n.push_back(non_negative(size, "buffer sizes"));
                std::unique_ptr<Reservation> res;
                {
                    py::gil_scoped_release nogil;
                    res = s.reserve(k, m.data(), m.size(), n);
                }
                auto out = std::make_unique<PyReservation>();
                out->buffers = views_of(res->region(), res->buffers());
                out->res = std::move(res);
                return out;
            },
            py::arg("key"), py::arg("meta"), py::arg("sizes"))
        .def(
            "put",
            [](Store& s, py::handle key, py::handle meta, py::iterable buffers) {
                std::string k = key_arg(key);
                HeldBuffer m(meta, false);
                std::vector<std::unique_ptr<HeldBuffer>> held;  // released with the GIL held
                std::vector<Store::Source> sources;
                for (py::handle b : buffers) {
                    held.push_back(std::make_unique<HeldBuffer>(b, true));
                    sources.push_back({held.back()->data(), held.back()->size()});
                }
                py::gil_scoped_release nogil;
                return s.put(k, m.data(), m.size(), sources);
            },
            py::arg("key"), py::arg("meta"), py::arg("buffers"))
        .def(
            "get",
            [](Store& s, py::handle key) {
                std::string k = key_arg(key);
                Object obj;
                {
                    py::gil_scoped_release nogil;
                    obj = s.get(k);
                }
                py::dict info;
                info["version"] = obj.version;
                info["tier"] = tier_name(obj.tier);
                info["zero_copy"] = obj.zero_copy;
                return py::make_tuple(py::bytes(obj.meta), views_of(obj.region, obj.buffers), info);
            },
            py::arg("key"))
        .def(
            "contains",
            [](Store& s, py::handle key) {
                std::string k = key_arg(key);
                py::gil_scoped_release nogil;
                return s.contains(k);
            },
            py::arg("key"))
        .def("__contains__",
             [](Store& s, py::handle key) {
                 std::string k = key_arg(key);
                 py::gil_scoped_release nogil;
                 return s.contains(k);
             })
        .def(
            "delete",
            [](Store& s, py::handle key) {
                std::string k = key_arg(key);
                py::gil_scoped_release nogil;
                return s.remove(k);
            },
            py::arg("key"))
        .def("keys", &Store::keys, py::call_guard<py::gil_scoped_release>())
        .def(
            "info",
            [](Store& s, py::handle key) {
                std::string k = key_arg(key);
                ObjectInfo info;
                {
                    py::gil_scoped_release nogil;
                    info = s.info(k);
                }
                return info_dict(info);
            },
            py::arg("key"))
        .def("stats",
             [](Store& s) {
                 Stats st;
                 {
                     py::gil_scoped_release nogil;
                     st = s.stats();
                 }
                 return stats_dict(st);
             })
        .def("reclaim", &Store::reclaim, py::call_guard<py::gil_scoped_release>())
        .def("mark_finished", &Store::mark_finished, py::call_guard<py::gil_scoped_release>())
        .def("close", &Store::close, py::call_guard<py::gil_scoped_release>())
        .def("destroy", &Store::destroy, py::call_guard<py::gil_scoped_release>())
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__",
             [](Store& s, py::args) {
                 py::gil_scoped_release nogil;
                 if (s.owner()) {
                     s.destroy();
                 } else {
                     s.close();
                 }
             })
        .def("__repr__", [](const Store& s) {
            std::string state = s.closed() ? "closed" : (s.owner() ? "owner" : "attached");
            return "<discomfort._core.Store run_id=" + py::repr(py::str(s.run_id())).cast<std::string>() + " " +
                   state + ">";
        });
}
