// RAM allocation (first fit over ranges derived from entries and pins), chunk growth and
// access, and the files of the disk tier.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "discomfort/errors.hpp"
#include "discomfort/memprobe.hpp"
#include "discomfort/pool.hpp"
#include "guard.hpp"

namespace discomfort {

std::optional<std::pair<uint32_t, uint64_t>> Store::first_fit(uint64_t length) {
    const auto& used = tables().used;  // ordered by chunk, then offset
    for (uint32_t k = 0; k < kMaxChunks; ++k) {
        uint64_t size = chunk_size(k);
        if (size == 0) continue;
        uint64_t pos = 0;
        for (auto it = used.lower_bound({k, 0, 0}); it != used.end() && it->first.chunk == k; ++it) {
            const Extent& r = it->first;
            if (r.offset >= pos && r.offset - pos >= length) return std::make_pair(k, pos);
            uint64_t end = r.offset + r.length < r.offset ? UINT64_MAX : r.offset + r.length;
            pos = std::max(pos, end);
        }
        if (size >= pos && size - pos >= length) return std::make_pair(k, pos);
    }
    return std::nullopt;
}

std::optional<uint32_t> Store::grow(uint64_t length) {
    uint64_t have = 0;
    std::vector<uint32_t> free_slots;  // chunk-table entries still absent, in index order
    for (uint32_t i = 0; i < kMaxChunks; ++i) {
        uint64_t size = chunk_size(i);
        if (size == 0) free_slots.push_back(i);
        have += size;
    }
    if (free_slots.empty()) return std::nullopt;
    uint64_t budget = header()->ram_budget;
    uint64_t room = budget > have ? budget - have : 0;
    uint64_t size = std::min(room, std::max({length, kMinChunk, have})) / kPage * kPage;
    if (size < length) return std::nullopt;
    bool memory_checked = false;
    // A chunk's name is known to every local user (the run id shows in /dev/shm): a name that
    // someone else took is skipped, never removed or opened, and the next free index is tried.
    for (uint32_t k : free_slots) {
        const std::string path = chunk_path(k);
        if (pool_) {
            // Already allocated and mapped here: no memory to ask for, no page to fault in.
            if (auto leased = pool_lease(shm_dir_, length, room, size, path)) {
                install_chunk(k, std::move(leased->fd), std::move(leased->map), leased->size);
                return k;
            }
        }
        if (!memory_checked) {
            if (!memory_allows(mem_probe_, size)) {
                // Memory is short: what the pool keeps is the first thing to give back.
                if (release_pool() == 0 || !memory_allows(mem_probe_, size)) return std::nullopt;
            }
            memory_checked = true;
        }
        Fd fd(open_retry(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0600));
        if (!fd.valid() && errno == EEXIST && unlink_own_leftover(path))  // a creator that died before recording it
            fd = Fd(open_retry(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0600));
        if (!fd.valid() && errno == EEXIST) continue;  // someone else's: another name
        if (!fd.valid() && (errno == ENOSPC || errno == EDQUOT)) return std::nullopt;  // no inode left
        if (!fd.valid()) throw_system("create " + path, errno);
        if (fallocate_file(fd.get(), size) != 0 && (release_pool() == 0 || fallocate_file(fd.get(), size) != 0)) {
            fd.reset();
            unlink_quiet(path);
            return std::nullopt;  // /dev/shm is full: the disk tier takes it, never a SIGBUS later
        }
        install_chunk(k, std::make_shared<Fd>(std::move(fd)), nullptr, size);
        return k;
    }
    return std::nullopt;  // every free name is taken: the disk tier takes it
}

// Record chunk k (its file exists and holds `size` bytes); the state last.
void Store::install_chunk(uint32_t k, std::shared_ptr<Fd> fd, std::shared_ptr<Mapping> map, uint64_t size) {
    Chunk& c = chunks_[k];
    c.fd = std::move(fd);
    c.map = std::move(map);
    c.size = size;
    ChunkEntry* entry = chunk_at(k);
    entry->zero0 = 0;
    entry->size = size;
    entry->zero1[0] = entry->zero1[1] = 0;
    __atomic_store_n(&entry->state, 1u, __ATOMIC_RELEASE);
}

Store::Chunk& Store::open_chunk(uint32_t k) {
    uint64_t size = chunk_size(k);
    if (size == 0)
        throw StoreError(ErrorCode::Corrupted, "run " + quoted(run_id_) + ": chunk " + std::to_string(k) + " is absent");
    Chunk& c = chunks_[k];
    if (c.fd) {
        if (c.size != size)
            throw StoreError(ErrorCode::Corrupted,
                             "run " + quoted(run_id_) + ": chunk " + std::to_string(k) + " changed size");
        return c;
    }
    std::string path = chunk_path(k);
    Fd fd(open_retry(path, O_RDWR | O_NOFOLLOW));
    if (!fd.valid()) {
        if (run_ended()) throw finished_error();  // the owner removed it
        if (errno == ENOENT)
            throw StoreError(ErrorCode::Corrupted,
                             "run " + quoted(run_id_) + ": chunk " + std::to_string(k) + " is missing");
        throw_system("open " + path, errno);
    }
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) throw_system("fstat " + path, errno);
    if (st.st_uid != ::geteuid())
        throw StoreError(ErrorCode::Corrupted, "run " + quoted(run_id_) + ": chunk " + std::to_string(k) + " not ours");
    if (uint64_t(st.st_size) < size)
        throw StoreError(ErrorCode::Truncated, "run " + quoted(run_id_) + ": chunk " + std::to_string(k) +
                                                   " truncated (another process cut it)");
    c.fd = std::make_shared<Fd>(std::move(fd));
    c.map.reset();
    c.size = size;
    return c;
}

std::shared_ptr<Mapping> Store::chunk_map(uint32_t k) {
    Chunk& c = open_chunk(k);
    if (!c.map) c.map = std::make_shared<Mapping>(c.fd->get(), c.size, MAP_SHARED, 0);
    return c.map;
}

std::string Store::disk_name(uint64_t file_id) const {
    char name[32];
    std::snprintf(name, sizeof name, "%016llx.obj", static_cast<unsigned long long>(file_id));
    return name;
}

void Store::allocate_disk_file(int fd, uint64_t length, const std::string& path) const {
    int rc = fallocate_file(fd, length);
    if (rc == ENOSPC || rc == EDQUOT)
        throw StoreError(ErrorCode::DiskFull,
                         "run " + quoted(run_id_) + ": disk tier " + *disk_dir_ + " is full (" +
                             std::to_string(length) + " bytes needed): " + std::strerror(rc),
                         rc);
    if (rc != 0) throw_system("allocate " + path, rc);
}

Fd Store::open_disk_file(uint64_t file_id, uint64_t length, bool reused) {
    const std::string path = disk_path(file_id), name = disk_name(file_id);
    Fd fd(reused ? openat_retry(disk_fd_.get(), name, O_RDWR | O_NOFOLLOW | O_NONBLOCK)
                 : openat_retry(disk_fd_.get(), name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0600));
    if (!fd.valid()) {
        if (run_ended()) throw finished_error();
        throw_system((reused ? "open " : "create ") + path, errno);
    }
    try {
        std::string problem = private_file_problem(fd.get());
        if (!problem.empty())
            throw StoreError(ErrorCode::Access, "run " + quoted(run_id_) + (reused ? ": retired" : ": new") +
                                                    " disk file " + path + " is " + problem);
        if (reused) {
            struct stat st;
            if (::fstat(fd.get(), &st) != 0) throw_system("fstat " + path, errno);
            if (uint64_t(st.st_size) > length && ::ftruncate(fd.get(), off_t(length)) != 0)
                throw_system("truncate " + path, errno);
        }
        allocate_disk_file(fd.get(), length, path);
        return fd;
    } catch (...) {
        if (!reused) ::unlinkat(disk_fd_.get(), name.c_str(), 0);  // a retired file keeps its new name
        throw;
    }
}

Mapping Store::create_disk_object(uint64_t file_id, uint64_t length) {
    Fd fd = open_disk_file(file_id, length, false);
    try {
        return Mapping(fd.get(), length, MAP_SHARED, 0);
    } catch (...) {
        ::unlinkat(disk_fd_.get(), disk_name(file_id).c_str(), 0);
        throw;
    }
}

void Store::retire_disk_file(uint64_t file_id, uint64_t length) {
    RetiredFile* slots = header()->retired;
    uint32_t k = 0;
    while (k < kRetiredSlots && slots[k].file_id != 0) ++k;
    if (k == kRetiredSlots) {  // full: the oldest goes
        ::unlinkat(disk_fd_.get(), disk_name(slots[0].file_id).c_str(), 0);
        std::memmove(&slots[0], &slots[1], sizeof(RetiredFile) * (kRetiredSlots - 1));
        k = kRetiredSlots - 1;
    }
    slots[k] = RetiredFile{file_id, length};
}

bool Store::disk_file_pinned(uint64_t file_id) const {
    for (uint32_t p = 0; p < kPinCapacity; ++p) {
        const PinEntry* pin = pin_at(p);
        if (__atomic_load_n(&pin->state, __ATOMIC_ACQUIRE) == 1 && pin->chunk == kDiskPinChunk &&
            pin->offset == file_id)
            return true;
    }
    return false;
}

bool Store::take_retired(uint64_t length, uint64_t file_id) {
    RetiredFile* slots = header()->retired;
    // The smallest that holds `length`, else the largest (it grows): fewest blocks to change.
    int best = -1;
    for (uint32_t k = 0; k < kRetiredSlots; ++k) {
        const RetiredFile r = slots[k];
        if (r.file_id == 0 || r.file_id >= header()->next_version || disk_file_pinned(r.file_id)) continue;
        if (best < 0) {
            best = int(k);
            continue;
        }
        const RetiredFile b = slots[best];
        const bool fits = r.length >= length, best_fits = b.length >= length;
        if (fits != best_fits ? fits : (fits ? r.length < b.length : r.length > b.length)) best = int(k);
    }
    if (best < 0) return false;
    const uint64_t old_id = slots[best].file_id;
    std::memmove(&slots[best], &slots[best + 1], sizeof(RetiredFile) * (kRetiredSlots - 1 - best));
    slots[kRetiredSlots - 1] = RetiredFile{0, 0};
    return ::renameat(disk_fd_.get(), disk_name(old_id).c_str(), disk_fd_.get(), disk_name(file_id).c_str()) == 0;
}

void Store::forget_retired() noexcept {
    RetiredFile* slots = header()->retired;
    for (uint32_t k = 0; k < kRetiredSlots; ++k) {
        if (slots[k].file_id != 0 && disk_fd_.valid())
            ::unlinkat(disk_fd_.get(), disk_name(slots[k].file_id).c_str(), 0);
        slots[k] = RetiredFile{0, 0};
    }
}

Fd Store::open_disk_object(uint64_t file_id, const std::string& key) const {
    const std::string path = disk_path(file_id), where = object_where(key);
    // O_NONBLOCK: a FIFO in its place must not hang us; it is refused below.
    Fd fd(openat_retry(disk_fd_.get(), disk_name(file_id), O_RDONLY | O_NOFOLLOW | O_NONBLOCK));
    if (!fd.valid()) {
        const int err = errno;
        if (run_ended()) throw finished_error();
        if (err == ENOENT) throw StoreError(ErrorCode::Corrupted, where + ": its disk file " + path + " is missing");
        if (err == ELOOP)
            throw StoreError(ErrorCode::Access, where + ": disk file " + path + " is a symbolic link; refusing to read it");
        throw_system("open " + path, err);
    }
    std::string problem = private_file_problem(fd.get());
    if (!problem.empty())
        throw StoreError(ErrorCode::Access, where + ": disk file " + path + " is not a private file of this user (" +
                                                problem + "); refusing to read it");
    return fd;
}

}  // namespace discomfort
