// A run's object store: RAM chunks in shared memory, overflow files on disk, shared by every
// process of the user through the control segment described in docs/FORMAT.md.
//
// Plain C++ without Python. Threads may share a Store; every operation takes the in-process
// mutex and then the OFD metadata lock. Nothing here ever calls back into Python, so the
// binding may drop the GIL around any call.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "discomfort/errors.hpp"
#include "discomfort/format.hpp"
#include "discomfort/layout.hpp"
#include "discomfort/sys.hpp"

namespace discomfort {

class Store;

enum class Tier { Ram, Disk };
const char* tier_name(Tier tier);

// A RAM extent; the identity of a pin.
struct Extent {
    uint64_t chunk = 0;
    uint64_t offset = 0;
    uint64_t length = 0;
    bool operator<(const Extent& o) const {
        return std::tie(chunk, offset, length) < std::tie(o.chunk, o.offset, o.length);
    }
    bool operator==(const Extent& o) const {
        return chunk == o.chunk && offset == o.offset && length == o.length;
    }
};

// Keeps one reference on a pinned extent of a store; dropping it never blocks.
class PinRef {
public:
    PinRef() = default;
    PinRef(std::shared_ptr<Store> store, const Extent& extent) : store_(std::move(store)), extent_(extent) {}
    PinRef(PinRef&&) noexcept = default;
    PinRef& operator=(PinRef&& other) noexcept;
    PinRef(const PinRef&) = delete;
    PinRef& operator=(const PinRef&) = delete;
    ~PinRef() { reset(); }
    void reset() noexcept;

private:
    std::shared_ptr<Store> store_;
    Extent extent_;
};

// Bytes that views point into, and what keeps them valid. Members are destroyed in reverse
// order: the mapping goes first, the pin after it (an unpinned extent may be reused at once).
struct Region {
    PinRef pin;
    std::shared_ptr<void> owner;  // a Mapping or a heap block
    uint8_t* data = nullptr;
    size_t size = 0;
};

// What get() returns: the meta and buffer spans inside `region`.
struct Object {
    std::string meta;
    std::shared_ptr<Region> region;
    std::vector<Span> buffers;
    uint64_t version = 0;
    Tier tier = Tier::Ram;
    bool zero_copy = false;
};

struct ObjectInfo {
    std::string key;
    Tier tier = Tier::Ram;
    uint64_t version = 0;
    uint64_t size = 0;  // extent length
    uint64_t nbuf = 0;
    uint64_t nbytes = 0;  // sum of buffer lengths
    uint64_t meta_len = 0;
    std::optional<uint64_t> chunk;  // none for the disk tier
    uint64_t offset = 0;
};

struct Stats {
    std::string run_id;
    uint64_t objects_ram = 0, objects_disk = 0, bytes_ram = 0, bytes_disk = 0, reserved = 0;
    uint64_t ram_capacity = 0, ram_budget = 0, chunks = 0, pins = 0, pinned_bytes = 0;
    uint64_t slots_used = 0, epoch = 0, next_version = 0;
};

// A reserved object that readers cannot see until seal(). Its buffers point into a shared
// mapping that stays mapped while `region()` is referenced; after seal/abort, writes through
// them are a caller bug (they may land in space that was given to another object).
class Reservation {
public:
    ~Reservation();  // an unsealed reservation is aborted (deferred if the lock is busy)
    Reservation(const Reservation&) = delete;
    Reservation& operator=(const Reservation&) = delete;

    const std::string& key() const { return key_; }
    Tier tier() const { return tier_; }
    const std::shared_ptr<Region>& region() const { return region_; }
    const std::vector<Span>& buffers() const { return buffers_; }
    bool done() const { return done_.load(); }

    uint64_t seal();  // the object's version; StoreClosedError when already sealed or aborted
    void abort();     // no-op when already sealed or aborted

private:
    friend class Store;
    Reservation(std::shared_ptr<Store> store, std::string key, uint32_t index, uint64_t file_id, Tier tier,
                std::shared_ptr<Region> region, std::vector<Span> buffers);

    std::shared_ptr<Store> store_;
    std::string key_;
    uint32_t index_;
    uint64_t file_id_;
    Tier tier_;
    std::shared_ptr<Region> region_;
    std::vector<Span> buffers_;
    std::atomic<bool> done_{false};
};

class Store : public std::enable_shared_from_this<Store> {
public:
    struct Source {
        const void* data;
        uint64_t size;
    };

    // `pool`: lease new chunks from the process's pool (discomfort/pool.hpp) and give them back
    // at destroy() when no one else can see them.
    static std::shared_ptr<Store> create(const std::string& run_id, uint64_t ram_budget,
                                         const std::optional<std::string>& disk_root, const std::string& shm_dir,
                                         const std::string& mem_probe, bool pool = false);
    static std::shared_ptr<Store> attach(const std::string& run_id, const std::string& shm_dir);

    ~Store();
    Store(const Store&) = delete;
    Store& operator=(const Store&) = delete;

    const std::string& run_id() const { return run_id_; }
    bool owner() const { return owner_; }
    bool closed() const { return closed_.load(); }
    bool finished() const;
    int64_t slot() const { return slot_ == kNoSlot ? -1 : int64_t(slot_); }
    const std::optional<std::string>& disk_dir() const { return disk_dir_; }
    const std::string& shm_dir() const { return shm_dir_; }
    std::string chunk_path(uint64_t index) const;

    std::unique_ptr<Reservation> reserve(const std::string& key, const void* meta, uint64_t meta_len,
                                         const std::vector<uint64_t>& sizes);
    uint64_t put(const std::string& key, const void* meta, uint64_t meta_len, const std::vector<Source>& buffers);
    // put() for long-lived holders: a RAM object is written with pwrite to its chunk's file,
    // never through a mapping, after an fstat check (TruncatedStoreError when another process
    // cut the chunk), so a truncation is never a SIGBUS here.
    uint64_t put_guarded(const std::string& key, const void* meta, uint64_t meta_len,
                         const std::vector<Source>& buffers);
    Object get(const std::string& key);
    // get() for long-lived holders (the ComfyUI server's nodes): the extent is read with pread
    // into fresh memory, never through a mapping of a chunk or object file, so a file another
    // process truncated is TruncatedStoreError (RunFinishedError once the run ended), not a
    // SIGBUS. The control segment's size is checked by fstat before its pages are touched.
    Object get_guarded(const std::string& key);
    bool contains(const std::string& key);
    bool remove(const std::string& key);
    std::vector<std::string> keys();
    ObjectInfo info(const std::string& key);
    Stats stats();
    uint64_t reclaim();
    void mark_finished();
    // Detach. Views stay valid; the slot, pins and locks go when the last view does.
    void close();
    // Set FINISHED and remove the run's files; views stay valid. Then close().
    void destroy();

private:
    friend class Reservation;
    friend class PinRef;
    friend void forget_stores_after_fork() noexcept;
    class Guard;
    class Update;

    static constexpr uint32_t kNoSlot = 0xffffffffu;

    struct Chunk {
        std::shared_ptr<Fd> fd;
        std::shared_ptr<Mapping> map;  // whole chunk, shared, for writers and small reads
        uint64_t size = 0;
    };
    struct PinRec {
        uint32_t index;  // in the pin table
        uint32_t count;  // live regions in this process; 0 = waiting to be freed
    };

    Store(std::string run_id, std::string shm_dir, std::string mem_probe, std::optional<std::string> disk_dir,
          bool owner, bool pool, Fd fd, Mapping control, Fd disk_fd);

    // lifecycle (store.cpp)
    void claim_slot();
    void forget_after_fork() noexcept;
    void check_usable() const;
    // After the metadata lock is taken: RunFinishedError once the owner has ended the run.
    void check_running() const;
    bool run_ended() const;
    // fstat of the control segment: TruncatedStoreError when it is shorter than its tables.
    void check_control_size() const;
    // pread of all `length` bytes: TruncatedStoreError naming the object when the file ends first.
    void read_object(int fd, void* dst, uint64_t length, uint64_t offset, const std::string& key) const;
    StoreError finished_error() const;
    bool forked() const;
    void release_locked() noexcept;
    void give_chunks_to_pool();
    void finish_close();

    // the control segment (control.cpp)
    Header* header() const { return reinterpret_cast<Header*>(base_); }
    ObjEntry* entry_at(uint32_t i) const;
    PinEntry* pin_at(uint32_t p) const;
    ChunkEntry* chunk_at(uint32_t k) const;
    SlotEntry* slot_at(uint32_t i) const;
    uint32_t entry_state(uint32_t i) const;
    void set_entry_state(uint32_t i, uint32_t state) noexcept;
    ObjEntry read_entry(uint32_t i) const;
    uint64_t chunk_size(uint64_t k) const;
    std::string entry_problem(const ObjEntry& e) const;
    ObjEntry valid_entry(uint32_t i) const;
    std::string object_where(const std::string& key) const;
    std::string disk_path(uint64_t file_id) const;

    // the object table (table.cpp)
    std::vector<uint32_t> probe_path(const std::string& key, uint64_t hash) const;
    std::optional<uint32_t> find_sealed(const std::string& key) const;
    // `replacing`: the key has a SEALED entry, which the seal turns into a TOMBSTONE, so the
    // write may go past the bound of 3/4 of the table that new keys keep (FORMAT.md).
    uint32_t insert(const std::string& key, uint64_t hash, uint32_t tier, uint64_t file_id, uint64_t chunk,
                    uint64_t offset, uint64_t length, bool replacing);
    std::optional<uint32_t> first_free(uint64_t hash) const;
    uint32_t purge_tombstones();
    void tombstone(uint32_t i);
    bool slot_alive(uint32_t i) const;
    uint64_t reclaim_slot(uint32_t i);
    uint64_t reclaim_dead();
    void repair();

    // What this handle knows of the tables, valid while the header's epoch equals `epoch`:
    // every update, by any process, bumps it, and our own updates keep the cache in step. It
    // spares each reservation a scan of the 4096-entry object and pin tables.
    struct TableCache {
        bool valid = false;
        uint64_t epoch = 0;
        uint32_t nonempty = 0;            // object entries whose state is not EMPTY
        uint32_t live = 0;                // object entries RESERVED or SEALED
        std::map<Extent, uint32_t> used;  // RAM extents of RESERVED/SEALED entries and pins, counted
    };
    bool cache_fresh() const { return cache_.valid && cache_.epoch == header()->epoch; }
    const TableCache& tables();  // rescans when stale; CorruptedStoreError as a scan would
    void note_extent(const Extent& extent, bool add) noexcept;
    void set_pin_state(uint32_t p, uint32_t state) noexcept;

    // RAM allocation and chunks (alloc.cpp)
    std::optional<std::pair<uint32_t, uint64_t>> first_fit(uint64_t length);
    std::optional<uint32_t> grow(uint64_t length);
    void install_chunk(uint32_t k, std::shared_ptr<Fd> fd, std::shared_ptr<Mapping> map, uint64_t size);
    Chunk& open_chunk(uint32_t k);
    std::shared_ptr<Mapping> chunk_map(uint32_t k);
    // A new object file, space reserved (DiskFullError otherwise), mapped shared for a
    // reservation's writer. Put writes with pwrite instead, into `open_disk_file`: a new file
    // (removed again when it fails its check) or, `reused`, a retired file taken for `file_id`,
    // opened and checked the same way and cut to `length`. Writing a new file through a mapping
    // faults every page (~11x a memcpy at 12 MiB), pwrite does not (~2x).
    Mapping create_disk_object(uint64_t file_id, uint64_t length);
    Fd open_disk_file(uint64_t file_id, uint64_t length, bool reused);
    // posix_fallocate of an object file: DiskFullError on ENOSPC/EDQUOT, OSError otherwise.
    void allocate_disk_file(int fd, uint64_t length, const std::string& path) const;
    // Retired files (alloc.cpp). Under the lock, inside an update: keep a sealed object's file
    // for reuse (the oldest retired one goes when the slots are full); take the best retired
    // file no pin maps and rename it to `file_id`'s name (false: none); forget them all (repair).
    void retire_disk_file(uint64_t file_id, uint64_t length);
    bool take_retired(uint64_t length, uint64_t file_id);
    void forget_retired() noexcept;
    bool disk_file_pinned(uint64_t file_id) const;
    // The object's file opened O_NOFOLLOW in the run directory and checked by fstat (ours, a
    // regular file, 0600): StoreAccessError naming the key and the file otherwise.
    Fd open_disk_object(uint64_t file_id, const std::string& key) const;
    std::string disk_name(uint64_t file_id) const;

    // pins and deferred work (pins.cpp)
    PinRef pin_locked(const Extent& extent, const std::string& key);
    void unpin(const Extent& extent) noexcept;
    void abort_later(uint32_t index, uint64_t file_id) noexcept;
    bool live_pins() const;
    bool has_pending() const { return pending_.load(); }
    void drain_locked() noexcept;

    // reservations (objects.cpp)
    ObjEntry own_reserved(uint32_t index, uint64_t file_id) const;
    uint64_t seal_reserved(uint32_t index, uint64_t file_id, const std::string& key);
    // reserve(); with `disk`, an object that goes to the disk tier gets an empty region and its
    // file's descriptor there instead of a mapping (put writes it with pwrite), in a retired
    // file when one is free (`reused`: its padding must be zeroed, it may hold old bytes).
    struct DiskWrite {
        Fd fd;
        std::shared_ptr<Fd> chunk;  // `guarded` RAM objects: the chunk's file, written at `base`
        uint64_t base = 0;
        int target() const { return chunk ? chunk->get() : fd.get(); }
        bool reused = false;
        uint64_t head_end = 0;  // where the header and meta (written by reserve_as) end
        uint64_t length = 0;    // the extent's
    };
    // `guarded` (with `disk`): a RAM object gets its chunk's descriptor there too, not a mapping.
    std::unique_ptr<Reservation> reserve_as(const std::string& key, const void* meta, uint64_t meta_len,
                                            const std::vector<uint64_t>& sizes, DiskWrite* disk,
                                            bool guarded = false);
    uint64_t put_as(const std::string& key, const void* meta, uint64_t meta_len, const std::vector<Source>& buffers,
                    bool guarded);
    uint64_t seal_locked(uint32_t index, const std::string& key, uint64_t hash);
    std::optional<uint64_t> put_small(const std::string& key, const void* meta, uint64_t meta_len,
                                      const std::vector<Source>& buffers, const ExtentPlan& plan);
    void abort_reserved(uint32_t index, uint64_t file_id);

    const std::string run_id_;
    const std::string shm_dir_;
    const std::string mem_probe_;
    const std::optional<std::string> disk_dir_;
    const bool owner_;
    const bool pool_;
    const pid_t pid_;

    Fd ctl_fd_;        // holds flock(LOCK_SH), the slot lock, and the metadata lock while taken
    Fd disk_fd_;       // the run's disk directory (O_DIRECTORY|O_NOFOLLOW), for *at() calls
    Mapping control_;  // mapped until the Store is destroyed
    uint8_t* base_;
    uint32_t slot_ = kNoSlot;
    std::vector<Chunk> chunks_;  // under mu_
    mutable TableCache cache_;   // under mu_

    // The in-process half of the metadata lock (OFD locks do not exclude threads).
    std::mutex mu_;
    std::atomic<std::thread::id> mu_owner_{};
    int update_depth_ = 0;  // under mu_

    // Pins and deferred work; taken after mu_ or alone, never held while waiting for mu_.
    mutable std::mutex pins_mu_;
    std::map<Extent, PinRec> pins_;
    std::vector<std::pair<uint32_t, uint64_t>> pending_aborts_;  // (entry, file_id)
    std::atomic<bool> pending_{false};

    std::atomic<bool> closed_{false};
    bool closing_ = false;  // under mu_: release once the last pin is gone
    std::atomic<bool> released_{false};
};

}  // namespace discomfort
