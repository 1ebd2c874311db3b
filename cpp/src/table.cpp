// The object table (open addressing, linear probing), slot liveness, reclaim and repair.
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include "discomfort/errors.hpp"
#include "guard.hpp"

namespace discomfort {

namespace {
uint32_t next_index(uint32_t i) { return (i + 1) % kTableCapacity; }
uint32_t prev_index(uint32_t i) { return (i + kTableCapacity - 1) % kTableCapacity; }
}  // namespace

std::vector<uint32_t> Store::probe_path(const std::string& key, uint64_t hash) const {
    std::vector<uint32_t> found;
    uint32_t i = uint32_t(hash % kTableCapacity);
    for (uint32_t step = 0; step < kTableCapacity; ++step, i = next_index(i)) {
        uint32_t s = entry_state(i);
        if (s == kEmpty) break;
        if (s != kReserved && s != kSealed) continue;
        const ObjEntry* e = entry_at(i);
        if (e->hash == hash && e->key_len == key.size() && std::memcmp(e->key, key.data(), key.size()) == 0)
            found.push_back(i);
    }
    return found;
}

std::optional<uint32_t> Store::find_sealed(const std::string& key) const {
    for (uint32_t i : probe_path(key, fnv1a64(key.data(), key.size())))
        if (entry_state(i) == kSealed) return i;
    return std::nullopt;
}

std::optional<uint32_t> Store::first_free(uint64_t hash) const {
    uint32_t i = uint32_t(hash % kTableCapacity);
    for (uint32_t step = 0; step < kTableCapacity; ++step, i = next_index(i)) {
        uint32_t s = entry_state(i);
        if (s == kEmpty || s == kTombstone) return i;
    }
    return std::nullopt;
}

uint32_t Store::insert(const std::string& key, uint64_t hash, uint32_t tier, uint64_t file_id, uint64_t chunk,
                       uint64_t offset, uint64_t length, bool replacing) {
    // New keys: at most 3/4 of the table live. Any insertion leaves one EMPTY entry, which ends
    // every probe; tombstones that no probe needs are made EMPTY first when it comes to that.
    auto full = [&](const std::string& why) {
        return StoreError(ErrorCode::StoreFull, "run " + quoted(run_id_) + ": object table full (" + why +
                                                    "); cannot add key " + quoted(key));
    };
    if (!replacing && tables().live + 1 > kTableCapacity * 3 / 4)
        throw full(std::to_string(kTableCapacity * 3 / 4) + " keys at most");
    auto fits = [&](std::optional<uint32_t> i) {
        // Reusing a TOMBSTONE leaves the count of non-EMPTY entries as it is.
        return i && tables().nonempty + (entry_state(*i) == kEmpty) <= kTableCapacity - 1;
    };
    std::optional<uint32_t> i = first_free(hash);
    if (!fits(i) && purge_tombstones() > 0) i = first_free(hash);
    if (!fits(i)) throw full(std::to_string(tables().nonempty) + " of 4096 entries in use");
    ObjEntry e;
    std::memset(&e, 0, sizeof e);
    e.state = entry_state(*i);  // unchanged until set_entry_state() below
    e.tier = tier;
    e.owner_slot = slot_;
    e.key_len = uint32_t(key.size());
    e.hash = hash;
    e.file_id = file_id;
    e.chunk = chunk;
    e.offset = offset;
    e.length = length;
    std::memcpy(e.key, key.data(), key.size());
    std::memcpy(entry_at(*i), &e, sizeof e);
    set_entry_state(*i, kReserved);
    return *i;
}

// TOMBSTONEs that no live entry's probe path crosses become EMPTY, without moving any entry
// (entries are named by index while their writers hold them). A tombstone at position t of a
// cluster (a run of non-EMPTY entries) is crossed when a live entry after it has its home at
// or before t. One backward pass per cluster. Returns how many became EMPTY.
uint32_t Store::purge_tombstones() {
    uint32_t start = kTableCapacity;
    for (uint32_t i = 0; i < kTableCapacity && start == kTableCapacity; ++i)
        if (entry_state(i) == kEmpty) start = i;
    if (start == kTableCapacity) return 0;  // no EMPTY entry: no cluster boundary to start from
    Update update(*this);
    uint32_t freed = 0;
    std::vector<uint32_t> cluster;
    auto flush = [&]() {
        // min_home: the smallest home (relative to the cluster) of a live entry after position p.
        int64_t min_home = INT64_MAX;
        for (size_t p = cluster.size(); p-- > 0;) {
            const uint32_t j = cluster[p];
            const uint32_t s = entry_state(j);
            if (s == kTombstone && min_home > int64_t(p)) {
                set_entry_state(j, kEmpty);
                ++freed;
            } else if (s == kReserved || s == kSealed) {
                const uint32_t home = uint32_t(entry_at(j)->hash % kTableCapacity);
                const int64_t dist = int64_t((j + kTableCapacity - home) % kTableCapacity);
                min_home = std::min(min_home, dist > int64_t(p) ? int64_t(-1) : int64_t(p) - dist);
            } else if (s != kTombstone) {
                min_home = -1;  // an unknown state: keep everything before it as it is
            }
        }
        cluster.clear();
    };
    for (uint32_t n = 1, i = next_index(start); n <= kTableCapacity; ++n, i = next_index(i)) {
        if (n < kTableCapacity && entry_state(i) != kEmpty) {
            cluster.push_back(i);
        } else {
            flush();
        }
    }
    return freed;
}

void Store::tombstone(uint32_t i) {
    const ObjEntry* e = entry_at(i);
    // The entry goes regardless; a file we cannot unlink goes with the disk directory. A sealed
    // object's file is kept for the next disk save when it is large enough to be mapped (small
    // ones are read with pread outside the lock, so their files are never rewritten).
    if (e->tier == kTierDisk && disk_fd_.valid() && e->file_id != 0) {
        if (entry_state(i) == kSealed && e->length >= kSmallObjectBytes)
            retire_disk_file(e->file_id, e->length);
        else
            ::unlinkat(disk_fd_.get(), disk_name(e->file_id).c_str(), 0);
    }
    set_entry_state(i, kTombstone);
    // Tombstones followed by an EMPTY entry end no probe path: they can become EMPTY.
    if (entry_state(next_index(i)) != kEmpty) return;
    for (uint32_t j = i, n = 0; n < kTableCapacity && entry_state(j) == kTombstone; ++n, j = prev_index(j))
        set_entry_state(j, kEmpty);
}

bool Store::slot_alive(uint32_t i) const {
    if (i == slot_) return true;  // our own lock is invisible to F_OFD_GETLK on our descriptor
    return ofd_locked_by_other(ctl_fd_.get(), kSlotLockBase + i);
}

uint64_t Store::reclaim_slot(uint32_t slot) {
    Update update(*this);
    uint64_t count = 0;
    for (uint32_t i = 0; i < kTableCapacity; ++i) {
        if (entry_state(i) == kReserved && entry_at(i)->owner_slot == slot) {
            tombstone(i);
            ++count;
        }
    }
    for (uint32_t p = 0; p < kPinCapacity; ++p) {
        PinEntry* pin = pin_at(p);
        if (__atomic_load_n(&pin->state, __ATOMIC_ACQUIRE) == 1 && pin->slot == slot) {
            set_pin_state(p, 0);
            ++count;
        }
    }
    __atomic_store_n(&slot_at(slot)->state, 0u, __ATOMIC_RELEASE);
    return count;
}

uint64_t Store::reclaim_dead() {
    std::vector<uint32_t> dead;
    for (uint32_t i = 0; i < kSlotCapacity; ++i)
        if (slot_at(i)->state == 1 && !slot_alive(i)) dead.push_back(i);
    if (dead.empty()) return 0;
    Update update(*this);
    uint64_t count = 0;
    for (uint32_t i : dead) count += reclaim_slot(i);
    return count;
}

// A holder died inside an update: keep what is valid and consistent, drop the rest.
void Store::repair() {
    Update update(*this);
    cache_.valid = false;  // rescanned after the repair
    std::map<std::string, std::vector<std::pair<uint64_t, uint32_t>>> sealed;  // key -> (version, entry)
    uint64_t highest = 0;
    for (uint32_t i = 0; i < kTableCapacity; ++i) {
        uint32_t s = entry_state(i);
        if (s == kEmpty || s == kTombstone) continue;
        if (s != kReserved && s != kSealed) {
            set_entry_state(i, kTombstone);
            continue;
        }
        ObjEntry e = read_entry(i);
        if (!entry_problem(e).empty()) {
            set_entry_state(i, kTombstone);  // its file_id cannot be trusted: leave the disk alone
        } else if (s == kReserved && !slot_alive(e.owner_slot)) {
            tombstone(i);
        } else {
            highest = std::max({highest, e.version, e.file_id});
            if (s == kSealed)
                sealed[std::string(reinterpret_cast<char*>(e.key), e.key_len)].push_back({e.version, i});
        }
    }
    for (auto& kv : sealed) {
        auto& versions = kv.second;
        std::sort(versions.begin(), versions.end());
        for (size_t n = 0; n + 1 < versions.size(); ++n) tombstone(versions[n].second);
    }
    for (uint32_t p = 0; p < kPinCapacity; ++p) {
        PinEntry pin;
        std::memcpy(&pin, pin_at(p), sizeof pin);
        if (pin.state == 0) continue;
        if (pin.chunk == kDiskPinChunk) {  // a disk object's file: offset is its file_id
            if (pin.state != 1 || pin.slot >= kSlotCapacity) set_pin_state(p, 0);
            continue;
        }
        uint64_t size = chunk_size(pin.chunk);
        if (pin.state != 1 || pin.slot >= kSlotCapacity || pin.offset > size || pin.length > size - pin.offset)
            set_pin_state(p, 0);
    }
    for (uint32_t i = 0; i < kSlotCapacity; ++i)
        if (slot_at(i)->state > 1) __atomic_store_n(&slot_at(i)->state, 0u, __ATOMIC_RELEASE);
    forget_retired();  // their slots may be half-written: their files go
    // A counter behind the values already handed out would hand them out twice.
    Header* h = header();
    if (h->next_version <= highest) h->next_version = highest + 1;
}

}  // namespace discomfort
