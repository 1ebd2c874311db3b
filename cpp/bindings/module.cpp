// discomfort._core: the C++ store core (docs/FORMAT.md) for Python. This file only creates the
// module; each part is registered by its own file (register.hpp), like boost-histogram's.
#include <pybind11/pybind11.h>

#include "discomfort/format.hpp"
#include "register.hpp"

#ifndef DISCOMFORT_VERSION
#error "DISCOMFORT_VERSION is not set: CMakeLists.txt defines it from the project version"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    using namespace discomfort;
    m.doc() = "The compiled store core of discomfort (docs/FORMAT.md); discomfort._pystore has the same API.";
    m.attr("__version__") = DISCOMFORT_VERSION;
    m.attr("BACKEND") = bindings::kBackend;  // which backend this module is; _pystore's says "python"
    m.attr("FORMAT_VERSION") = kFormatVersion;
    m.attr("SMALL_OBJECT_BYTES") = kSmallObjectBytes;
    m.attr("COPY_LOAD_BYTES") = kCopyLoadBytes;

    bindings::register_errors(m);  // first: discomfort.errors is looked up once, here
    bindings::register_pool(m);
    bindings::register_store(m);
}
