// Pure functions over the format: names, hashes, and the directory inside an extent.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace discomfort {

struct Span {
    uint64_t offset;
    uint64_t length;
};

inline uint64_t align_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

// FNV-1a 64 of the key's UTF-8 bytes: picks the key's home entry in the object table.
uint64_t fnv1a64(const void* data, size_t len);

// Throw InvalidKey / InvalidRunId when the name breaks the rules of FORMAT.md.
void check_key(const std::string& key);
void check_run_id(const std::string& run_id);

// Where the meta and each buffer go inside a new extent, and the extent's length.
struct ExtentPlan {
    uint64_t meta_off = 0;
    std::vector<Span> buffers;
    uint64_t length = 0;
};
ExtentPlan plan_extent(uint64_t meta_len, const std::vector<uint64_t>& sizes);

// Write the directory and the meta of a planned extent at `dst`.
void write_extent_head(uint8_t* dst, const ExtentPlan& plan, const void* meta, uint64_t meta_len);

// The validated directory of an extent of `length` bytes. `data` must hold at least
// `available` bytes; a directory that does not fit them or the length is CorruptedStoreError,
// with `where` naming the object in the message.
struct ExtentDir {
    uint64_t meta_off = 0;
    uint64_t meta_len = 0;
    std::vector<Span> buffers;
};
ExtentDir parse_extent(const uint8_t* data, uint64_t available, uint64_t length, const std::string& where);
// The same, naming the object only when there is something to report (a read's hot path).
ExtentDir parse_extent(const uint8_t* data, uint64_t available, uint64_t length,
                       const std::function<std::string()>& where);

// Whether bytes are well-formed UTF-8 (keys come back to Python as str).
bool valid_utf8(const void* data, size_t len);

// Python-like quoting for messages: 'text'.
std::string quoted(const std::string& text);

}  // namespace discomfort
