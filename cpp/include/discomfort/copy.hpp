// The bulk copy of put(): memcpy, or non-temporal stores shared with a helper thread for large
// buffers (see copy.cpp). Safe to call from several threads at once.
#pragma once

#include <cstddef>

namespace discomfort {

void copy_bytes(void* dst, const void* src, size_t n);

}  // namespace discomfort
