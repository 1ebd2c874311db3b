#include "discomfort/copy.hpp"

#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>

namespace discomfort {

namespace {
// Below this a second thread costs more than it saves.
constexpr size_t kParallelBytes = 32u << 20;
}  // namespace

void copy_bytes(void* dst, const void* src, size_t n) {
    if (n < kParallelBytes || std::thread::hardware_concurrency() < 2) {
        std::memcpy(dst, src, n);
        return;
    }
    size_t half = (n / 2) & ~size_t(4095);  // keep both halves page-aligned relative to the start
    auto* d = static_cast<uint8_t*>(dst);
    auto* s = static_cast<const uint8_t*>(src);
    std::thread helper;
    try {
        helper = std::thread([=] { std::memcpy(d + half, s + half, n - half); });
    } catch (const std::system_error&) {
        std::memcpy(dst, src, n);  // no thread to spare: copy it all here
        return;
    }
    std::memcpy(d, s, half);
    helper.join();
}

}  // namespace discomfort
