// Typed access to the control segment, and the validation of what is read from it.
#include <cstdio>
#include <cstring>

#include "discomfort/errors.hpp"
#include "discomfort/store.hpp"

namespace discomfort {

ObjEntry* Store::entry_at(uint32_t i) const {
    return reinterpret_cast<ObjEntry*>(base_ + kObjTableOff + uint64_t(i) * kEntrySize);
}

PinEntry* Store::pin_at(uint32_t p) const {
    return reinterpret_cast<PinEntry*>(base_ + kPinTableOff + uint64_t(p) * sizeof(PinEntry));
}

ChunkEntry* Store::chunk_at(uint32_t k) const {
    return reinterpret_cast<ChunkEntry*>(base_ + kChunkTableOff + uint64_t(k) * sizeof(ChunkEntry));
}

SlotEntry* Store::slot_at(uint32_t i) const {
    return reinterpret_cast<SlotEntry*>(base_ + kSlotTableOff + uint64_t(i) * sizeof(SlotEntry));
}

uint32_t Store::entry_state(uint32_t i) const { return __atomic_load_n(&entry_at(i)->state, __ATOMIC_ACQUIRE); }

namespace {
bool live_state(uint32_t s) { return s == kReserved || s == kSealed; }
}  // namespace

// Every other field is written before the state (FORMAT.md: "state last").
void Store::set_entry_state(uint32_t i, uint32_t state) noexcept {
    const uint32_t before = entry_state(i);
    if (cache_fresh()) {
        if (before == kEmpty && state != kEmpty) ++cache_.nonempty;
        if (before != kEmpty && state == kEmpty) --cache_.nonempty;
        const ObjEntry* e = entry_at(i);
        if (live_state(before) != live_state(state)) {
            if (live_state(state)) {
                ++cache_.live;
            } else {
                --cache_.live;
            }
            if (e->tier == kTierRam) note_extent({e->chunk, e->offset, e->length}, live_state(state));
        }
    } else {
        cache_.valid = false;
    }
    __atomic_store_n(&entry_at(i)->state, state, __ATOMIC_RELEASE);
}

void Store::set_pin_state(uint32_t p, uint32_t state) noexcept {
    PinEntry* pin = pin_at(p);
    const uint32_t before = __atomic_load_n(&pin->state, __ATOMIC_ACQUIRE);
    if (!cache_fresh()) {
        cache_.valid = false;
    } else if ((before == 1) != (state == 1) && pin->chunk < kMaxChunks) {
        note_extent({pin->chunk, pin->offset, pin->length}, state == 1);
    }
    __atomic_store_n(&pin->state, state, __ATOMIC_RELEASE);
}

// Out of memory, the cache is dropped rather than the table write it follows.
void Store::note_extent(const Extent& extent, bool add) noexcept {
    if (add) {
        try {
            ++cache_.used[extent];
        } catch (...) {
            cache_.valid = false;
        }
        return;
    }
    auto it = cache_.used.find(extent);
    if (it == cache_.used.end()) {
        cache_.valid = false;  // cannot happen while the cache is right: trust the tables instead
    } else if (--it->second == 0) {
        cache_.used.erase(it);
    }
}

const Store::TableCache& Store::tables() {
    if (cache_fresh()) return cache_;
    cache_.valid = false;
    cache_.nonempty = 0;
    cache_.live = 0;
    cache_.used.clear();
    for (uint32_t i = 0; i < kTableCapacity; ++i) {
        uint32_t s = entry_state(i);
        cache_.nonempty += s != kEmpty;
        if (!live_state(s)) continue;
        ++cache_.live;
        ObjEntry e = valid_entry(i);  // an extent we cannot trust could overlap a new one
        if (e.tier == kTierRam) ++cache_.used[{e.chunk, e.offset, e.length}];
    }
    for (uint32_t p = 0; p < kPinCapacity; ++p) {
        PinEntry pin;
        std::memcpy(&pin, pin_at(p), sizeof pin);
        if (pin.state == 1 && pin.chunk < kMaxChunks) ++cache_.used[{pin.chunk, pin.offset, pin.length}];
    }
    cache_.epoch = header()->epoch;
    cache_.valid = true;
    return cache_;
}

// A private copy: validation and use then see the same bytes.
ObjEntry Store::read_entry(uint32_t i) const {
    ObjEntry e;
    std::memcpy(&e, entry_at(i), sizeof e);
    return e;
}

uint64_t Store::chunk_size(uint64_t k) const {
    if (k >= kMaxChunks) return 0;
    const ChunkEntry* c = chunk_at(uint32_t(k));
    return __atomic_load_n(&c->state, __ATOMIC_ACQUIRE) == 1 ? c->size : 0;
}

std::string Store::entry_problem(const ObjEntry& e) const {
    if (e.key_len < 1 || e.key_len > kMaxKeyBytes) return "key length " + std::to_string(e.key_len);
    if (fnv1a64(e.key, e.key_len) != e.hash) return "key hash mismatch";
    if (e.owner_slot >= kSlotCapacity) return "owner slot " + std::to_string(e.owner_slot);
    if (e.length == 0) return "zero length";
    if (e.tier == kTierRam) {
        if (e.chunk >= kMaxChunks) return "chunk " + std::to_string(e.chunk);
        uint64_t size = chunk_size(e.chunk);
        if (size == 0 || e.offset % kPage || e.length % kPage || e.offset > size || e.length > size - e.offset)
            return "extent " + std::to_string(e.offset) + "+" + std::to_string(e.length) + " outside chunk " +
                   std::to_string(e.chunk);
    } else if (e.tier == kTierDisk) {
        if (e.file_id == 0 || !disk_dir_) return "disk object without a disk tier";
    } else {
        return "tier " + std::to_string(e.tier);
    }
    return "";
}

ObjEntry Store::valid_entry(uint32_t i) const {
    ObjEntry e = read_entry(i);
    std::string problem = entry_problem(e);
    if (!problem.empty()) {
        cache_.valid = false;  // written behind the protocol's back: rescan from now on
        throw StoreError(ErrorCode::Corrupted, "run " + quoted(run_id_) + ": object table entry " + std::to_string(i) +
                                                   " is corrupted (" + problem + ")");
    }
    return e;
}

std::string Store::object_where(const std::string& key) const {
    return "run " + quoted(run_id_) + ", object " + quoted(key);
}

std::string Store::disk_path(uint64_t file_id) const {
    return *disk_dir_ + "/" + disk_name(file_id);
}

}  // namespace discomfort
