// The bulk copy of put(): memcpy, split over two threads for large buffers.
#pragma once

#include <cstddef>

namespace discomfort {

void copy_bytes(void* dst, const void* src, size_t n);

}  // namespace discomfort
