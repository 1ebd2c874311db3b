// Conversions between Python objects and the store's C++ types: arguments taken out of Python
// objects (with the GIL held, before a store call), and the result dicts built from the
// store's structs. The dicts' keys are those of the TypedDicts in discomfort/_types.py
// (tests/test_backend.py compares them).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "discomfort/errors.hpp"
#include "discomfort/pool.hpp"
#include "discomfort/store.hpp"

namespace discomfort::bindings {

namespace py = pybind11;

// ---- arguments ---------------------------------------------------------------------------------

inline std::string key_arg(py::handle key) {
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

inline std::string run_id_arg(py::handle run_id) {
    if (!PyUnicode_Check(run_id.ptr()))
        throw StoreError(ErrorCode::InvalidRunId, "run id " + py::repr(run_id).cast<std::string>() +
                                                      " is not 1-64 characters of [A-Za-z0-9_-]");
    return run_id.cast<std::string>();
}

// Paths travel as bytes in the filesystem encoding (os.fsencode / os.fsdecode), like _pystore.
inline std::string path_arg(py::handle path) {
    return py::module_::import("os").attr("fsencode")(path).cast<std::string>();
}

inline py::str path_str(const std::string& path) {
    PyObject* s = PyUnicode_DecodeFSDefaultAndSize(path.data(), py::ssize_t(path.size()));
    if (!s) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(s);
}

inline uint64_t non_negative(py::handle value, const char* what) {
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

// ---- calls -------------------------------------------------------------------------------------

// fn() with the GIL released (store calls never touch Python); its result is converted after.
template <class Fn>
auto without_gil(Fn&& fn) {
    py::gil_scoped_release nogil;
    return fn();
}

// ---- results (discomfort._types) ---------------------------------------------------------------

// LoadInfo: the third item of get().
inline py::dict load_info_dict(const Object& obj) {
    py::dict d;
    d["version"] = obj.version;
    d["tier"] = tier_name(obj.tier);
    d["zero_copy"] = obj.zero_copy;
    return d;
}

// ObjectInfo: info(key).
inline py::dict info_dict(const ObjectInfo& info) {
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

// StoreStats: stats().
inline py::dict stats_dict(const Stats& st) {
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

// PoolInfo (with PoolFile entries): pool_info().
inline py::dict pool_info_dict(const PoolInfo& info) {
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
}

}  // namespace discomfort::bindings
