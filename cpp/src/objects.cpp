// The operations on objects: reserve/seal/abort, put, get and the read-only queries.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "discomfort/copy.hpp"
#include "discomfort/errors.hpp"
#include "guard.hpp"

namespace discomfort {

const char* tier_name(Tier tier) { return tier == Tier::Ram ? "ram" : "disk"; }

namespace {

// RAM puts up to this size reserve, copy and seal under one hold of the lock (put_small).
constexpr uint64_t kFusedPutBytes = 1ull << 20;

StoreError unknown_key(const std::string& key, const std::string& run_id) {
    return StoreError(ErrorCode::UnknownKey, "no object " + quoted(key) + " in run " + quoted(run_id));
}

// A private, page-aligned copy of `length` bytes (length is a multiple of the page size).
std::shared_ptr<Region> heap_region(uint64_t length) {
    void* p = std::aligned_alloc(kPage, length);
    if (!p) throw std::bad_alloc();
    auto region = std::make_shared<Region>();
    region->owner = std::shared_ptr<void>(p, std::free);
    region->data = static_cast<uint8_t*>(p);
    region->size = length;
    return region;
}

// Memory a guarded load reads into. Large: anonymous pages with huge pages asked for, since a
// pread into fresh 4 KiB pages takes a fault per page (12 MiB: ~4.7 ms here, 1.8 ms in 2 MiB pages).
std::shared_ptr<Region> fresh_region(uint64_t length) {
    constexpr uint64_t kHugePage = 2u << 20;
    if (length < kHugePage) return heap_region(length);
    auto owner = std::make_shared<Mapping>(-1, length, MAP_PRIVATE | MAP_ANONYMOUS, 0);
    ::madvise(owner->data(), length, MADV_HUGEPAGE);  // a hint: ignored where THP is off
    auto region = std::make_shared<Region>();
    region->data = owner->data();
    region->size = owner->size();
    region->owner = std::move(owner);
    return region;
}

std::shared_ptr<Region> mapped_region(Mapping mapping, PinRef pin) {
    auto region = std::make_shared<Region>();
    region->pin = std::move(pin);
    auto owner = std::make_shared<Mapping>(std::move(mapping));
    region->data = owner->data();
    region->size = owner->size();
    region->owner = std::move(owner);
    return region;
}

}  // namespace

// ---- reservations ----------------------------------------------------------------------------

Reservation::Reservation(std::shared_ptr<Store> store, std::string key, uint32_t index, uint64_t file_id, Tier tier,
                         std::shared_ptr<Region> region, std::vector<Span> buffers)
    : store_(std::move(store)),
      key_(std::move(key)),
      index_(index),
      file_id_(file_id),
      tier_(tier),
      region_(std::move(region)),
      buffers_(std::move(buffers)) {}

Reservation::~Reservation() {
    if (!done_.exchange(true)) store_->abort_later(index_, file_id_);
}

uint64_t Reservation::seal() {
    if (done_.exchange(true))
        throw StoreError(ErrorCode::Closed, "reservation of " + quoted(key_) + " was already sealed or aborted");
    region_.reset();
    return store_->seal_reserved(index_, file_id_, key_);
}

void Reservation::abort() {
    if (done_.exchange(true)) return;
    region_.reset();
    store_->abort_reserved(index_, file_id_);
}

std::unique_ptr<Reservation> Store::reserve(const std::string& key, const void* meta, uint64_t meta_len,
                                            const std::vector<uint64_t>& sizes) {
    return reserve_as(key, meta, meta_len, sizes, nullptr);
}

std::unique_ptr<Reservation> Store::reserve_as(const std::string& key, const void* meta, uint64_t meta_len,
                                               const std::vector<uint64_t>& sizes, DiskWrite* disk, bool guarded) {
    check_usable();
    check_key(key);
    ExtentPlan plan = plan_extent(meta_len, sizes);
    const uint64_t length = plan.length;
    const uint64_t hash = fnv1a64(key.data(), key.size());
    uint32_t index;
    uint64_t file_id;
    std::optional<std::pair<uint32_t, uint64_t>> place;
    std::shared_ptr<Mapping> chunk_mapping;
    {
        Guard guard(*this);
        check_running();
        place = first_fit(length);
        if (!place && reclaim_dead()) place = first_fit(length);
        const bool replacing = find_sealed(key).has_value();
        Update update(*this);
        killpoint("after_lock");
        if (!place) {
            if (auto k = grow(length)) place = std::make_pair(*k, uint64_t(0));
        }
        if (!place && !disk_dir_)
            throw StoreError(ErrorCode::StoreFull, "run " + quoted(run_id_) + ": object " + quoted(key) + " of " +
                                                       std::to_string(length) +
                                                       " bytes does not fit the RAM budget and the run has no disk tier");
        if (place && guarded) {
            disk->chunk = open_chunk(place->first).fd;
        } else if (place) {
            chunk_mapping = chunk_map(place->first);
        }
        file_id = header()->next_version++;
        index = place ? insert(key, hash, kTierRam, file_id, place->first, place->second, length, replacing)
                      : insert(key, hash, kTierDisk, file_id, 0, 0, length, replacing);
        if (!place && disk) disk->reused = take_retired(length, file_id);
    }
    auto region = std::make_shared<Region>();
    try {
        if (place && guarded) {
            struct stat st;
            if (::fstat(disk->chunk->get(), &st) != 0) throw_system("fstat of " + chunk_path(place->first), errno);
            if (uint64_t(st.st_size) < place->second + length)
                throw StoreError(ErrorCode::Truncated, "run " + quoted(run_id_) + ": chunk " +
                                                           std::to_string(place->first) +
                                                           " truncated (another process cut it)");
            disk->base = place->second;
            std::vector<uint8_t> head(plan.meta_off + meta_len);
            write_extent_head(head.data(), plan, meta, meta_len);
            pwrite_all(disk->chunk->get(), head.data(), head.size(), disk->base, object_where(key));
            disk->head_end = head.size();
            disk->length = length;
        } else if (place) {
            region->data = chunk_mapping->data() + place->second;
            region->size = length;
            region->owner = std::move(chunk_mapping);
        } else if (disk) {
            disk->fd = open_disk_file(file_id, length, disk->reused);
            std::vector<uint8_t> head(plan.meta_off + meta_len);
            write_extent_head(head.data(), plan, meta, meta_len);
            pwrite_all(disk->fd.get(), head.data(), head.size(), 0, disk_path(file_id));
            disk->head_end = head.size();
            disk->length = length;
        } else {
            auto mapping = std::make_shared<Mapping>(create_disk_object(file_id, length));
            region->data = mapping->data();
            region->size = length;
            region->owner = std::move(mapping);
        }
        if (region->data) write_extent_head(region->data, plan, meta, meta_len);
    } catch (...) {
        try {
            Guard guard(*this);
            Update update(*this);
            if (entry_state(index) == kReserved && entry_at(index)->file_id == file_id) tombstone(index);
        } catch (...) {
            // closed meanwhile: its release tombstoned the entry
        }
        throw;
    }
    killpoint("after_reserve");
    return std::unique_ptr<Reservation>(new Reservation(shared_from_this(), key, index, file_id,
                                                        place ? Tier::Ram : Tier::Disk, std::move(region),
                                                        std::move(plan.buffers)));
}

ObjEntry Store::own_reserved(uint32_t index, uint64_t file_id) const {
    ObjEntry e = valid_entry(index);
    if (e.state != kReserved || e.owner_slot != slot_ || e.file_id != file_id)
        throw StoreError(ErrorCode::Corrupted, "run " + quoted(run_id_) + ": reservation entry " +
                                                   std::to_string(index) + " changed under its writer");
    return e;
}

uint64_t Store::seal_reserved(uint32_t index, uint64_t file_id, const std::string& key) {
    check_usable();
    Guard guard(*this);
    check_running();
    ObjEntry e = own_reserved(index, file_id);
    return seal_locked(index, key, e.hash);
}

// Under the lock: the reserved entry becomes the key's visible version.
uint64_t Store::seal_locked(uint32_t index, const std::string& key, uint64_t hash) {
    Update update(*this);
    for (uint32_t i : probe_path(key, hash))
        if (i != index && entry_state(i) == kSealed) tombstone(i);
    uint64_t version = header()->next_version++;
    entry_at(index)->version = version;
    set_entry_state(index, kSealed);
    return version;
}

void Store::abort_reserved(uint32_t index, uint64_t file_id) {
    if (closed_) return;  // the handle's release tombstones its reservations
    check_usable();
    Guard guard(*this);
    own_reserved(index, file_id);
    Update update(*this);
    tombstone(index);
}

// A put that reserves, copies and seals under one hold of the lock: for RAM objects up to
// kFusedPutBytes, where the two lock round trips (four fcntl calls) of reserve + seal cost more
// than the copy keeps other processes waiting. Same states and updates as reserve() and seal():
// RESERVED while the bytes go in, so a death during the copy is reclaimed like any reservation.
// nullopt: no room in the RAM chunks as they are (the caller takes the general path).
std::optional<uint64_t> Store::put_small(const std::string& key, const void* meta, uint64_t meta_len,
                                         const std::vector<Source>& buffers, const ExtentPlan& plan) {
    const uint64_t length = plan.length;
    const uint64_t hash = fnv1a64(key.data(), key.size());
    Guard guard(*this);
    check_running();
    auto place = first_fit(length);
    if (!place && reclaim_dead()) place = first_fit(length);
    if (!place) return std::nullopt;
    const bool replacing = find_sealed(key).has_value();
    std::shared_ptr<Mapping> chunk_mapping = chunk_map(place->first);
    uint32_t index;
    {
        Update update(*this);
        const uint64_t file_id = header()->next_version++;
        index = insert(key, hash, kTierRam, file_id, place->first, place->second, length, replacing);
    }
    uint8_t* base = chunk_mapping->data() + place->second;
    try {
        write_extent_head(base, plan, meta, meta_len);
    } catch (...) {
        Update update(*this);
        tombstone(index);
        throw;
    }
    for (size_t i = 0; i < buffers.size(); ++i)
        if (buffers[i].size) std::memcpy(base + plan.buffers[i].offset, buffers[i].data, buffers[i].size);
    return seal_locked(index, key, hash);
}

uint64_t Store::put(const std::string& key, const void* meta, uint64_t meta_len, const std::vector<Source>& buffers) {
    return put_as(key, meta, meta_len, buffers, false);
}

uint64_t Store::put_guarded(const std::string& key, const void* meta, uint64_t meta_len,
                            const std::vector<Source>& buffers) {
    check_usable();
    check_control_size();
    return put_as(key, meta, meta_len, buffers, true);
}

uint64_t Store::put_as(const std::string& key, const void* meta, uint64_t meta_len, const std::vector<Source>& buffers,
                       bool guarded) {
    std::vector<uint64_t> sizes;
    sizes.reserve(buffers.size());
    for (const Source& b : buffers) sizes.push_back(b.size);
    if (!guarded && !killpoints_armed()) {
        check_usable();
        check_key(key);
        ExtentPlan plan = plan_extent(meta_len, sizes);
        if (plan.length <= kFusedPutBytes) {
            if (auto version = put_small(key, meta, meta_len, buffers, plan)) return *version;
        }
    }
    DiskWrite disk;
    std::unique_ptr<Reservation> res = reserve_as(key, meta, meta_len, sizes, &disk, guarded);
    if (disk.target() >= 0) {  // the disk tier or a guarded put: pwrite, no mapping (an abort unlinks the file)
        const std::string where = object_where(key);
        // A reused file holds its last object's bytes: zero the padding (the head wrote its own).
        static const std::vector<uint8_t> zeros(kPage, 0);
        auto zero = [&](uint64_t from, uint64_t to) {
            for (; disk.reused && from < to; from += std::min<uint64_t>(kPage, to - from))
                pwrite_all(disk.fd.get(), zeros.data(), std::min<uint64_t>(kPage, to - from), from, where);
        };
        uint64_t end = disk.head_end;
        for (size_t i = 0; i < buffers.size(); ++i) {
            const Span& span = res->buffers()[i];
            zero(end, span.offset);
            if (buffers[i].size)
                pwrite_all(disk.target(), buffers[i].data, buffers[i].size, disk.base + span.offset, where);
            end = span.offset + span.length;
        }
        zero(end, disk.length);
        return res->seal();
    }
    uint8_t* base = res->region()->data;
    for (size_t i = 0; i < buffers.size(); ++i)
        if (buffers[i].size) copy_bytes(base + res->buffers()[i].offset, buffers[i].data, buffers[i].size);
    return res->seal();
}

// ---- reads -----------------------------------------------------------------------------------

Object Store::get(const std::string& key) {
    check_usable();
    check_key(key);
    Object out;
    ObjEntry e;
    PinRef pin;                 // declared before the guard: released after it on any exit
    std::shared_ptr<Fd> map_fd;  // RAM objects mapped outside the lock
    Fd disk_fd;
    {
        Guard guard(*this);
        check_running();
        auto index = find_sealed(key);
        if (!index) throw unknown_key(key, run_id_);
        e = valid_entry(*index);
        if (e.tier == kTierRam && e.length < kCopyLoadBytes) {
            // Small: copied under the lock, as the extent may be reused once we let go.
            std::shared_ptr<Mapping> m = chunk_map(uint32_t(e.chunk));
            out.region = heap_region(e.length);
            std::memcpy(out.region->data, m->data() + e.offset, e.length);
        } else if (e.tier == kTierRam) {
            map_fd = open_chunk(uint32_t(e.chunk)).fd;
            pin = pin_locked({e.chunk, e.offset, e.length}, key);
        } else {
            // Opened under the lock: an overwrite may unlink it right after. A mapped one is
            // pinned: its file may be reused for a later save once no view maps it.
            disk_fd = open_disk_object(e.file_id, key);
            if (e.length >= kSmallObjectBytes) pin = pin_locked({kDiskPinChunk, e.file_id, e.length}, key);
        }
    }
    out.version = e.version;
    out.tier = e.tier == kTierRam ? Tier::Ram : Tier::Disk;
    if (map_fd) {
        out.region = mapped_region(Mapping(map_fd->get(), e.length, MAP_PRIVATE, e.offset), std::move(pin));
        out.zero_copy = true;
    } else if (disk_fd.valid()) {
        struct stat st;
        if (::fstat(disk_fd.get(), &st) != 0) throw_system("fstat of " + object_where(key), errno);
        if (uint64_t(st.st_size) < e.length)
            throw StoreError(ErrorCode::Corrupted, object_where(key) + ": disk file truncated");
        if (e.length < kSmallObjectBytes) {
            out.region = heap_region(e.length);
            pread_all(disk_fd.get(), out.region->data, e.length, 0, object_where(key));
        } else {
            out.region = mapped_region(Mapping(disk_fd.get(), e.length, MAP_PRIVATE, 0), std::move(pin));
            out.zero_copy = true;
        }
    }
    ExtentDir dir = parse_extent(out.region->data, out.region->size, e.length,
                                 std::function<std::string()>([&] { return object_where(key); }));
    out.meta.assign(reinterpret_cast<const char*>(out.region->data + dir.meta_off), dir.meta_len);
    out.buffers = std::move(dir.buffers);
    return out;
}

void Store::check_control_size() const {
    struct stat st;
    if (::fstat(ctl_fd_.get(), &st) != 0) throw_system("fstat of the control segment of run " + quoted(run_id_), errno);
    if (uint64_t(st.st_size) < kTotalSize)
        throw StoreError(ErrorCode::Truncated, "run " + quoted(run_id_) + ": control segment truncated to " +
                                                   std::to_string(st.st_size) + " bytes (another process cut it)");
}

void Store::read_object(int fd, void* dst, uint64_t length, uint64_t offset, const std::string& key) const {
    auto* p = static_cast<uint8_t*>(dst);
    while (length > 0) {
        ssize_t n = ::pread(fd, p, length, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_system("read of " + object_where(key), errno);
        if (n == 0) {
            if (run_ended()) throw finished_error();
            throw StoreError(ErrorCode::Truncated, object_where(key) + ": its file ends at byte " +
                                                       std::to_string(offset) +
                                                       ", inside the object (another process truncated it)");
        }
        p += n;
        length -= uint64_t(n);
        offset += uint64_t(n);
    }
}

Object Store::get_guarded(const std::string& key) {
    check_usable();
    check_key(key);
    check_control_size();
    Object out;
    ObjEntry e;
    PinRef pin;  // held while the bytes are read outside the lock, dropped at return
    std::shared_ptr<Fd> chunk_fd;
    Fd disk_fd;
    bool done = false;
    {
        Guard guard(*this);
        check_running();
        auto index = find_sealed(key);
        if (!index) throw unknown_key(key, run_id_);
        e = valid_entry(*index);
        out.region = fresh_region(e.length);
        if (e.tier == kTierRam) {
            chunk_fd = open_chunk(uint32_t(e.chunk)).fd;
            if (e.length < kCopyLoadBytes) {  // small: read under the lock, like get()
                read_object(chunk_fd->get(), out.region->data, e.length, e.offset, key);
                done = true;
            } else {
                pin = pin_locked({e.chunk, e.offset, e.length}, key);
            }
        } else {
            disk_fd = open_disk_object(e.file_id, key);
            if (e.length >= kSmallObjectBytes) pin = pin_locked({kDiskPinChunk, e.file_id, e.length}, key);
        }
    }
    if (!done) {
        if (chunk_fd) {
            read_object(chunk_fd->get(), out.region->data, e.length, e.offset, key);
        } else {
            read_object(disk_fd.get(), out.region->data, e.length, 0, key);
        }
    }
    out.version = e.version;
    out.tier = e.tier == kTierRam ? Tier::Ram : Tier::Disk;
    ExtentDir dir = parse_extent(out.region->data, out.region->size, e.length,
                                 std::function<std::string()>([&] { return object_where(key); }));
    out.meta.assign(reinterpret_cast<const char*>(out.region->data + dir.meta_off), dir.meta_len);
    out.buffers = std::move(dir.buffers);
    return out;
}

bool Store::contains(const std::string& key) {
    check_usable();
    check_key(key);
    Guard guard(*this);
    check_running();
    return find_sealed(key).has_value();
}

bool Store::remove(const std::string& key) {
    check_usable();
    check_key(key);
    Guard guard(*this);
    check_running();
    auto index = find_sealed(key);
    if (!index) return false;
    valid_entry(*index);  // its file_id names the file to unlink
    Update update(*this);
    tombstone(*index);
    return true;
}

std::vector<std::string> Store::keys() {
    check_usable();
    std::vector<std::string> out;
    {
        Guard guard(*this);
        check_running();
        for (uint32_t i = 0; i < kTableCapacity; ++i) {
            if (entry_state(i) != kSealed) continue;
            ObjEntry e = valid_entry(i);
            if (!valid_utf8(e.key, e.key_len))
                throw StoreError(ErrorCode::Corrupted, "run " + quoted(run_id_) + ": object table entry " +
                                                           std::to_string(i) + " holds a key that is not UTF-8");
            out.emplace_back(reinterpret_cast<const char*>(e.key), e.key_len);
        }
    }
    std::sort(out.begin(), out.end());
    return out;
}

ObjectInfo Store::info(const std::string& key) {
    check_usable();
    check_key(key);
    check_control_size();
    const std::string where = object_where(key);
    ObjEntry e;
    std::vector<uint8_t> head;
    {
        Guard guard(*this);
        check_running();
        auto index = find_sealed(key);
        if (!index) throw unknown_key(key, run_id_);
        e = valid_entry(*index);
        // The directory only: its size follows from nbuf, read first.
        auto dir_bytes = [&](uint32_t nbuf) {
            return std::min<uint64_t>(e.length, 32 + 16 * uint64_t(std::min(nbuf, kMaxBuffers)));
        };
        // Read with pread, never through a mapping: a file another process truncated is an
        // error here, not a SIGBUS (ComfyUI's IS_CHANGED asks this in a long-lived server).
        Fd disk;
        int fd = e.tier == kTierRam ? open_chunk(uint32_t(e.chunk)).fd->get()
                                    : (disk = open_disk_object(e.file_id, key)).get();
        const uint64_t base = e.tier == kTierRam ? e.offset : 0;
        ExtentHead h;
        read_object(fd, &h, sizeof h, base, key);
        head.resize(dir_bytes(h.nbuf));
        read_object(fd, head.data(), head.size(), base, key);
    }
    ExtentDir dir = parse_extent(head.data(), head.size(), e.length, where);
    ObjectInfo info;
    info.key = key;
    info.tier = e.tier == kTierRam ? Tier::Ram : Tier::Disk;
    info.version = e.version;
    info.size = e.length;
    info.nbuf = dir.buffers.size();
    for (const Span& b : dir.buffers) info.nbytes += b.length;
    info.meta_len = dir.meta_len;
    if (e.tier == kTierRam) info.chunk = e.chunk;
    info.offset = e.offset;
    return info;
}

Stats Store::stats() {
    check_usable();
    Guard guard(*this);
    check_running();
    reclaim_dead();
    Stats st;
    st.run_id = run_id_;
    for (uint32_t i = 0; i < kTableCapacity; ++i) {
        uint32_t s = entry_state(i);
        if (s == kReserved) {
            ++st.reserved;
        } else if (s == kSealed) {
            ObjEntry e = valid_entry(i);
            (e.tier == kTierRam ? st.objects_ram : st.objects_disk) += 1;
            (e.tier == kTierRam ? st.bytes_ram : st.bytes_disk) += e.length;
        }
    }
    for (uint32_t k = 0; k < kMaxChunks; ++k) {
        uint64_t size = chunk_size(k);
        st.ram_capacity += size;
        st.chunks += size != 0;
    }
    for (uint32_t p = 0; p < kPinCapacity; ++p) {
        const PinEntry* pin = pin_at(p);
        if (pin->state != 1) continue;
        ++st.pins;
        st.pinned_bytes += pin->length;
    }
    for (uint32_t i = 0; i < kSlotCapacity; ++i) st.slots_used += slot_at(i)->state == 1;
    st.ram_budget = header()->ram_budget;
    st.epoch = header()->epoch;
    st.next_version = header()->next_version;
    return st;
}

uint64_t Store::reclaim() {
    check_usable();
    Guard guard(*this);
    return reclaim_dead();
}

void Store::mark_finished() {
    check_usable();
    Guard guard(*this);
    Update update(*this);
    __atomic_fetch_or(&header()->flags, kFlagFinished, __ATOMIC_SEQ_CST);
}

}  // namespace discomfort
