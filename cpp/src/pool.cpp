#include "discomfort/pool.hpp"

#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <mutex>
#include <random>

namespace discomfort {

namespace {

struct Entry {
    std::string shm_dir;
    std::string path;
    PooledChunk chunk;
};

struct Pool {
    std::mutex mu;
    std::string prefix;  // made on first use, again in a forked child
    uint64_t counter = 0;
    std::vector<Entry> entries;
    uint64_t bytes = 0;
    std::optional<uint64_t> limit;  // none: largest_budget
    uint64_t largest_budget = 0;
    bool closed = false;
};

// Held across fork(); the child forgets the parent's files (closing its copies of the
// descriptors leaves the parent's flock alone: the parent still holds the description).
void before_fork();
void after_fork_in_parent();
void after_fork_in_child();

Pool& pool() {
    static Pool* p = [] {
        pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
        return new Pool();  // never destroyed: stores may still use it while statics go
    }();
    return *p;
}

void before_fork() { pool().mu.lock(); }
void after_fork_in_parent() { pool().mu.unlock(); }
void after_fork_in_child() {
    Pool& p = pool();
    p.entries.clear();  // closes and unmaps this process's copies only
    p.bytes = 0;
    p.prefix.clear();
    p.mu.unlock();
}

std::string random_prefix() {
    std::random_device rd;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%08x%08x", rd(), rd());
    return std::string("dcf-pool-") + buf;
}

std::string join(const std::string& dir, const std::string& name) {
    return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Which of two sizes is nearer `want`: an exact fit, else the smallest above, else the largest below.
bool nearer(uint64_t a, uint64_t b, uint64_t want) {
    auto rank = [want](uint64_t x) { return x == want ? 0 : x > want ? 1 : 2; };
    if (rank(a) != rank(b)) return rank(a) < rank(b);
    return rank(a) == 1 ? a < b : a > b;
}

uint64_t release_locked(Pool& p) {
    uint64_t bytes = p.bytes;
    for (const Entry& e : p.entries) unlink_quiet(e.path);
    p.entries.clear();
    p.bytes = 0;
    return bytes;
}

}  // namespace

PoolInfo pool_info() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    PoolInfo info;
    info.prefix = p.prefix;
    info.bytes = p.bytes;
    info.limit = p.limit.value_or(p.largest_budget);
    for (const Entry& e : p.entries) {
        struct stat st;
        uint64_t inode = ::fstat(e.chunk.fd->get(), &st) == 0 ? uint64_t(st.st_ino) : 0;
        info.files.push_back({e.path, e.chunk.size, inode});
    }
    return info;
}

uint64_t release_pool() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    return release_locked(p);
}

void set_pool_limit(std::optional<uint64_t> bytes) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    p.limit = bytes;
}

void close_pool() {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    p.closed = true;
    release_locked(p);
}

void pool_note_budget(uint64_t ram_budget) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    p.largest_budget = std::max(p.largest_budget, ram_budget);
}

std::optional<PooledChunk> pool_lease(const std::string& shm_dir, uint64_t min, uint64_t max, uint64_t want,
                                      const std::string& path) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    size_t best = p.entries.size();
    for (size_t i = 0; i < p.entries.size(); ++i) {
        const Entry& e = p.entries[i];
        if (e.shm_dir != shm_dir || e.chunk.size < min || e.chunk.size > max) continue;
        if (best == p.entries.size() || nearer(e.chunk.size, p.entries[best].chunk.size, want)) best = i;
    }
    if (best == p.entries.size()) return std::nullopt;
    Entry e = std::move(p.entries[best]);
    p.entries.erase(p.entries.begin() + long(best));
    p.bytes -= e.chunk.size;
    bool moved = rename_noreplace(e.path, path);
    if (!moved && errno == EEXIST) {
        // Left by a creator that died before recording it (as in grow); a name someone else
        // took keeps the pooled file for another name.
        if (!unlink_own_leftover(path)) {
            p.bytes += e.chunk.size;
            p.entries.push_back(std::move(e));
            return std::nullopt;
        }
        moved = rename_noreplace(e.path, path);
    }
    if (!moved) {
        unlink_quiet(e.path);  // drop it: its descriptor and mapping go with `e`
        return std::nullopt;
    }
    return std::move(e.chunk);
}

bool pool_give(const std::string& shm_dir, const std::string& path, const PooledChunk& chunk) {
    Pool& p = pool();
    std::lock_guard<std::mutex> lk(p.mu);
    const uint64_t limit = p.limit.value_or(p.largest_budget);
    if (p.closed || !chunk.fd || !chunk.map || chunk.size > limit || p.bytes > limit - chunk.size) return false;
    // Locked before it takes the pool's name: a sweeper never sees a pool file nobody holds.
    if (::flock(chunk.fd->get(), LOCK_SH) != 0) return false;
    if (p.prefix.empty()) p.prefix = random_prefix();
    std::string to = join(shm_dir, p.prefix + "." + std::to_string(p.counter++));
    if (!rename_noreplace(path, to)) return false;
    p.entries.push_back({shm_dir, to, chunk});
    p.bytes += chunk.size;
    return true;
}

}  // namespace discomfort
