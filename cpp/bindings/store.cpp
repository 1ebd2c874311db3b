// Store and Reservation, and the buffers their views slice: every call takes its arguments out
// of Python objects first (convert.hpp), then drops the GIL around the store call (locks,
// copies, file I/O), which never touches Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "convert.hpp"
#include "discomfort/store.hpp"
#include "register.hpp"

namespace discomfort::bindings {

namespace py = pybind11;

namespace {

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

// put / put_guarded: the buffers are held (their buffer protocol) while the GIL is released.
uint64_t put_with(Store& s, py::handle key, py::handle meta, py::iterable buffers, bool guarded) {
    std::string k = key_arg(key);
    HeldBuffer m(meta, false);
    std::vector<std::unique_ptr<HeldBuffer>> held;  // released with the GIL held
    std::vector<Store::Source> sources;
    for (py::handle b : buffers) {
        held.push_back(std::make_unique<HeldBuffer>(b, true));
        sources.push_back({held.back()->data(), held.back()->size()});
    }
    py::gil_scoped_release nogil;
    return guarded ? s.put_guarded(k, m.data(), m.size(), sources) : s.put(k, m.data(), m.size(), sources);
}

}  // namespace

void register_store(py::module_& m) {
    auto contains = [](Store& s, py::handle key) {
        std::string k = key_arg(key);
        py::gil_scoped_release nogil;
        return s.contains(k);
    };

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

    py::class_<Store, std::shared_ptr<Store>> store(m, "Store", "A run's object store: RAM chunks in shared memory, "
                                                                "overflow files on disk.");
    store.attr("backend") = kBackend;
    store
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
            "put", [](Store& s, py::handle key, py::handle meta, py::iterable buffers) {
                return put_with(s, key, meta, buffers, false);
            },
            py::arg("key"), py::arg("meta"), py::arg("buffers"))
        .def(
            "put_guarded", [](Store& s, py::handle key, py::handle meta, py::iterable buffers) {
                return put_with(s, key, meta, buffers, true);
            },
            py::arg("key"), py::arg("meta"), py::arg("buffers"))
        .def(
            "get",
            [](Store& s, py::handle key) {
                std::string k = key_arg(key);
                Object obj = without_gil([&] { return s.get(k); });
                return py::make_tuple(py::bytes(obj.meta), views_of(obj.region, obj.buffers), load_info_dict(obj));
            },
            py::arg("key"))
        .def(
            "get_guarded",
            [](Store& s, py::handle key) {
                std::string k = key_arg(key);
                Object obj = without_gil([&] { return s.get_guarded(k); });
                return py::make_tuple(py::bytes(obj.meta), views_of(obj.region, obj.buffers), load_info_dict(obj));
            },
            py::arg("key"))
        .def("contains", contains, py::arg("key"))
        .def("__contains__", contains)
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
                return info_dict(without_gil([&] { return s.info(k); }));
            },
            py::arg("key"))
        .def("stats",
             [](Store& s) { return stats_dict(without_gil([&] { return s.stats(); })); })
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

}  // namespace discomfort::bindings
