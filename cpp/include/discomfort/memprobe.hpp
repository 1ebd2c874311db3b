// Whether the machine has room for `nbytes` more of shared memory (FORMAT.md, "Memory probe").
#pragma once

#include <cstdint>
#include <string>

namespace discomfort {

// `probe` is a file in /proc/meminfo format. With the default probe a cgroup v2 memory limit
// must also leave room. A probe without MemTotal/MemAvailable does not refuse.
bool memory_allows(const std::string& probe, uint64_t nbytes);

}  // namespace discomfort
