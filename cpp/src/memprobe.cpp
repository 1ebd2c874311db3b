#include "discomfort/memprobe.hpp"

#include <fstream>
#include <sstream>

namespace discomfort {

namespace {

constexpr const char* kDefaultProbe = "/proc/meminfo";

struct MemInfo {
    bool ok = false;
    long double total = 0;
    long double available = 0;
};

MemInfo read_meminfo(const std::string& path) {
    MemInfo out;
    std::ifstream in(path);
    bool have_total = false, have_avail = false;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string name, unit;
        long double value;
        if (!(fields >> name >> value) || name.empty() || name.back() != ':') continue;
        fields >> unit;
        long double bytes = value * (unit == "kB" ? 1024 : 1);
        if (name == "MemTotal:") out.total = bytes, have_total = true;
        if (name == "MemAvailable:") out.available = bytes, have_avail = true;
    }
    out.ok = have_total && have_avail;
    return out;
}

// Room left under a cgroup v2 limit, or false when there is no limit to honour.
bool cgroup_room(long double* room) {
    std::ifstream max_in("/sys/fs/cgroup/memory.max");
    std::string limit;
    if (!(max_in >> limit) || limit == "max") return false;
    std::ifstream cur_in("/sys/fs/cgroup/memory.current");
    long double current;
    if (!(cur_in >> current)) return false;
    try {
        *room = std::stold(limit) - current;
    } catch (...) {
        return false;
    }
    return true;
}

}  // namespace

bool memory_allows(const std::string& probe, uint64_t nbytes) {
    // long double: the sums may go negative and must not wrap.
    MemInfo info = read_meminfo(probe);
    if (!info.ok) return true;
    long double reserve = info.total / 10;
    if (reserve > (1ull << 30)) reserve = 1ull << 30;
    long double n = static_cast<long double>(nbytes);
    if (info.available - n < reserve) return false;
    long double room;
    if (probe == kDefaultProbe && cgroup_room(&room) && room - n < reserve) return false;
    return true;
}

}  // namespace discomfort
