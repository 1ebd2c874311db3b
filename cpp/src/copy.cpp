// The bulk copy of put(). Measured on the 2-vCPU development VM (ratios to one memcpy):
//  - below a few MiB the copy stays in the last-level cache and glibc's memcpy is as fast or
//    faster (the crossover moved between 2 and 8 MiB with the load of the shared cache);
//  - from 4 MiB, AVX2 non-temporal stores skip the read-for-ownership of the destination:
//    0.6-0.8x a memcpy (glibc switches to such stores only at its own threshold, 192 MiB here);
//  - splitting a copy over two threads with glibc's memcpy made each half fall under that
//    threshold (temporal stores again): 1.7x slower at 192 MiB. A second thread can only pay
//    with non-temporal stores and a memory bus with room to spare, so the split below shares
//    blocks with a persistent helper thread: a helper that gets no CPU costs nothing.
#include "discomfort/copy.hpp"

#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>

namespace discomfort {

namespace {

constexpr size_t kStreamBytes = 4u << 20;     // non-temporal stores from here
constexpr size_t kParallelBytes = 32u << 20;  // a helper thread shares copies from here
constexpr size_t kBlockBytes = 2u << 20;      // the unit the two threads take turns on

bool have_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
}

// memcpy with non-temporal 32-byte stores; the caller checked for AVX2.
__attribute__((target("avx2"))) void stream_copy(uint8_t* d, const uint8_t* s, size_t n) {
    size_t head = std::min(n, size_t(-reinterpret_cast<uintptr_t>(d) & 31));
    std::memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 128; d += 128, s += 128, n -= 128) {
        __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
        __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32));
        __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 64));
        __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 96));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d), a);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32), b);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 64), c);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 96), e);
    }
    _mm_sfence();  // streamed stores are weakly ordered: publish them before the seal does
    std::memcpy(d, s, n);
}

// One copy, cut into blocks that whoever is free takes next.
struct Job {
    uint8_t* dst;
    const uint8_t* src;
    size_t n;
    std::atomic<size_t> next{0};

    void work() {
        for (;;) {
            size_t off = next.fetch_add(kBlockBytes);
            if (off >= n) return;
            stream_copy(dst + off, src + off, std::min(kBlockBytes, n - off));
        }
    }
};

// A thread that waits for jobs. Never destroyed (it may be needed until the process ends);
// after fork() the child gets a new one, since the parent's thread does not exist there.
class Helper {
public:
    Helper() : pid_(::getpid()) { std::thread([this] { loop(); }).detach(); }
    pid_t pid() const { return pid_; }

    // Copies `job` with the helper's help, or alone while another copy holds the helper.
    void run(Job& job) {
        std::unique_lock<std::mutex> use(use_, std::try_to_lock);
        if (!use.owns_lock()) return job.work();
        {
            std::lock_guard<std::mutex> lk(mu_);
            job_ = &job;
        }
        cv_.notify_one();
        job.work();
        // All blocks are taken: withdraw the job if the helper never started it, else wait
        // for the block it is copying.
        std::unique_lock<std::mutex> lk(mu_);
        job_ = nullptr;
        done_.wait(lk, [this] { return !busy_; });
    }

private:
    void loop() {
        std::unique_lock<std::mutex> lk(mu_);
        for (;;) {
            cv_.wait(lk, [this] { return job_ != nullptr; });
            Job* job = job_;
            job_ = nullptr;
            busy_ = true;
            lk.unlock();
            job->work();
            lk.lock();
            busy_ = false;
            done_.notify_one();
        }
    }

    const pid_t pid_;
    std::mutex use_;  // one copy at a time uses the helper
    std::mutex mu_;
    std::condition_variable cv_, done_;
    Job* job_ = nullptr;
    bool busy_ = false;
};

std::atomic<Helper*> g_helper{nullptr};

// The helper of this process, started on first use; nullptr when no thread can be made.
Helper* helper() {
    Helper* h = g_helper.load(std::memory_order_acquire);
    if (h && h->pid() == ::getpid()) return h;
    Helper* fresh;
    try {
        fresh = new Helper();
    } catch (...) {
        return nullptr;
    }
    // A racing thread may have installed one first: use it and leak ours (it only waits).
    if (g_helper.compare_exchange_strong(h, fresh, std::memory_order_acq_rel)) return fresh;
    return h;
}

}  // namespace

void copy_bytes(void* dst, const void* src, size_t n) {
    if (n < kStreamBytes || !have_avx2()) {
        std::memcpy(dst, src, n);  // glibc picks its own non-temporal path for huge copies
        return;
    }
    Job job;
    job.dst = static_cast<uint8_t*>(dst);
    job.src = static_cast<const uint8_t*>(src);
    job.n = n;
    static const bool two_cpus = std::thread::hardware_concurrency() >= 2;
    Helper* h = n >= kParallelBytes && two_cpus ? helper() : nullptr;
    if (h) {
        h->run(job);
    } else {
        job.work();
    }
}

}  // namespace discomfort
