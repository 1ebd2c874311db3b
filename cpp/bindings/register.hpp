// The parts of discomfort._core, each registered by its own file (module.cpp calls them in order).
#pragma once

#include <pybind11/pybind11.h>

namespace discomfort::bindings {

// Which backend this module is (_core.BACKEND, Store.backend); discomfort._pystore says "python".
inline constexpr const char* kBackend = "native";

void register_errors(pybind11::module_& m);  // errors.cpp: StoreError -> discomfort.errors
void register_pool(pybind11::module_& m);    // pool.cpp: pool_info, release_pool, set_pool_limit
void register_store(pybind11::module_& m);   // store.cpp: Store, Reservation and their views

}  // namespace discomfort::bindings
