// The process's chunk pool (docs/FORMAT.md, "Chunk pool"): pool_info, release_pool,
// set_pool_limit, and its release at exit.
#include <pybind11/pybind11.h>

#include <optional>

#include "convert.hpp"
#include "discomfort/pool.hpp"
#include "register.hpp"

namespace discomfort::bindings {

namespace py = pybind11;

void register_pool(py::module_& m) {
    m.def(
        "pool_info",
        [] { return pool_info_dict(without_gil([] { return pool_info(); })); },
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
}

}  // namespace discomfort::bindings
