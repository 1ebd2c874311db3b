// Error translation: a StoreError becomes the class of the same name in discomfort.errors
// (InvalidArgument a ValueError, System an OSError with errno). The classes are looked up once,
// when the module loads: a renamed class fails the import, not the first raise.
#include <pybind11/pybind11.h>

#include <array>
#include <cstddef>
#include <exception>
#include <string>

#include "discomfort/errors.hpp"
#include "register.hpp"

namespace discomfort::bindings {

namespace py = pybind11;

namespace {

// Every ErrorCode raised as a class of discomfort.errors, by its name there.
constexpr std::array<std::pair<ErrorCode, const char*>, 12> kErrorClasses{{
    {ErrorCode::UnknownKey, "UnknownKeyError"},
    {ErrorCode::UnknownRun, "UnknownRunError"},
    {ErrorCode::RunFinished, "RunFinishedError"},
    {ErrorCode::InvalidKey, "InvalidKeyError"},
    {ErrorCode::InvalidRunId, "InvalidRunIdError"},
    {ErrorCode::StoreFull, "StoreFullError"},
    {ErrorCode::DiskFull, "DiskFullError"},
    {ErrorCode::Corrupted, "CorruptedStoreError"},
    {ErrorCode::Access, "StoreAccessError"},
    {ErrorCode::UnsafeDirectory, "UnsafeDirectoryError"},
    {ErrorCode::Closed, "StoreClosedError"},
    {ErrorCode::Truncated, "TruncatedStoreError"},
}};

constexpr size_t kCodes = size_t(ErrorCode::System) + 1;

// Strong references, never released: the translator may run until the interpreter ends.
std::array<PyObject*, kCodes> g_classes{};

void raise_store_error(const StoreError& e) {
    // Messages may quote bytes of a damaged segment: never let them fail to decode.
    const std::string what = e.what();
    py::str message = py::reinterpret_steal<py::str>(
        PyUnicode_DecodeUTF8(what.data(), py::ssize_t(what.size()), "backslashreplace"));
    if (!message) throw py::error_already_set();
    py::object instance;
    if (e.code() == ErrorCode::System) {
        instance = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.error_number(), message);
    } else {
        PyObject* cls = g_classes[size_t(e.code())];
        instance = py::reinterpret_borrow<py::object>(cls ? cls : PyExc_RuntimeError)(message);
    }
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(instance.ptr())), instance.ptr());
}

}  // namespace

void register_errors(py::module_&) {
    py::module_ errors = py::module_::import("discomfort.errors");
    for (const auto& [code, name] : kErrorClasses) {
        py::object cls = errors.attr(name);  // AttributeError at import when a class is renamed
        if (!PyType_Check(cls.ptr()) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(cls.ptr()),
                                                          reinterpret_cast<PyTypeObject*>(PyExc_Exception)))
            throw py::type_error(std::string("discomfort.errors.") + name + " is not an exception class");
        g_classes[size_t(code)] = cls.release().ptr();
    }
    Py_INCREF(PyExc_ValueError);
    g_classes[size_t(ErrorCode::InvalidArgument)] = PyExc_ValueError;

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const StoreError& e) {
            raise_store_error(e);
        }
    });
}

}  // namespace discomfort::bindings
