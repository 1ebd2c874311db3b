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

// Every other field is written before the state (FORMAT.md: "state last").
void Store::set_entry_state(uint32_t i, uint32_t state) {
    __atomic_store_n(&entry_at(i)->state, state, __ATOMIC_RELEASE);
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
    if (!problem.empty())
        throw StoreError(ErrorCode::Corrupted, "run " + quoted(run_id_) + ": object table entry " + std::to_string(i) +
                                                   " is corrupted (" + problem + ")");
    return e;
}

std::string Store::object_where(const std::string& key) const {
    return "run " + quoted(run_id_) + ", object " + quoted(key);
}

std::string Store::disk_path(uint64_t file_id) const {
    char name[32];
    std::snprintf(name, sizeof name, "%016llx.obj", static_cast<unsigned long long>(file_id));
    return *disk_dir_ + "/" + name;
}

}  // namespace discomfort
