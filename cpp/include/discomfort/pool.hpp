// The process's pool of RAM chunks that finished runs gave back (docs/FORMAT.md, "Chunk pool").
// Their pages exist and are mapped here already, so a later run of this process that leases one
// writes into it without a page fault. The pool is this process's alone: its files are named for
// the pool (dcf-pool-{random}.{n}), held with flock(LOCK_SH) while pooled, and unlinked at exit.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "discomfort/sys.hpp"

namespace discomfort {

struct PoolFile {
    std::string path;
    uint64_t size = 0;
    uint64_t inode = 0;
};

struct PoolInfo {
    std::string prefix;  // file names are prefix + "." + n, in the shm_dir of the run that gave them
    uint64_t bytes = 0;
    uint64_t limit = 0;
    std::vector<PoolFile> files;
};

PoolInfo pool_info();

// Unlink every pooled file and drop its mapping; returns the bytes given back.
uint64_t release_pool();

// The most bytes the pool keeps; none (the default) means the largest RAM budget of a pooling
// store created so far.
void set_pool_limit(std::optional<uint64_t> bytes);

// At process exit: release the pool and keep nothing from then on.
void close_pool();

// ---- for the store ----------------------------------------------------------------------------

// A chunk file, its descriptor and its shared mapping of the whole file.
struct PooledChunk {
    std::shared_ptr<Fd> fd;
    std::shared_ptr<Mapping> map;
    uint64_t size = 0;
};

// A pooling store was created with this budget (it bounds the pool by default).
void pool_note_budget(uint64_t ram_budget);

// Rename a pooled file of `shm_dir` of between `min` and `max` bytes (`want` if there is one,
// else the nearest) to `path`, never replacing a file there; nothing when none fits.
std::optional<PooledChunk> pool_lease(const std::string& shm_dir, uint64_t min, uint64_t max, uint64_t want,
                                      const std::string& path);

// Take the chunk file at `path` into the pool (renamed, flock'ed); false when the pool is full,
// closed, or the rename fails: the caller then removes the file as usual.
bool pool_give(const std::string& shm_dir, const std::string& path, const PooledChunk& chunk);

}  // namespace discomfort
