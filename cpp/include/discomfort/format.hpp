// The shared-memory segment format, version 2 (docs/FORMAT.md is the contract).
// Every struct here is laid out exactly as in the segment: little-endian, naturally aligned.
#pragma once

#include <cstddef>
#include <cstdint>

namespace discomfort {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the segment format is little-endian");

constexpr uint32_t kFormatVersion = 2;
constexpr char kMagic[8] = {'D', 'C', 'F', 'S', 'T', 'O', 'R', 'E'};
constexpr uint32_t kObjectMagic = 0x4F464344;  // "DCFO"

constexpr uint64_t kPage = 4096;
constexpr uint64_t kSmallObjectBytes = 65536;  // buffers from here are page-aligned; disk extents below are copied
// RAM extents below this come back as a copy made under the lock, not a mapping: a 64 KiB
// latent loads in ~10 us instead of ~20 (mapping, unmapping, faulting in). Kept under glibc's
// smallest mmap threshold (128 KiB) so that the copy lands in warm heap memory: a copy into
// fresh pages would cost more than the mapping.
constexpr uint64_t kCopyLoadBytes = 128u << 10;
constexpr uint64_t kMinChunk = 64ull << 20;
constexpr uint32_t kMaxBuffers = 65536;
constexpr uint32_t kMaxKeyBytes = 255;
constexpr uint32_t kMaxDiskDirBytes = 1023;
// A pin on a DISK object: chunk = kDiskPinChunk, offset = the object's file_id.
constexpr uint64_t kDiskPinChunk = ~uint64_t(0);
// Retired disk files (an overwritten or deleted object's file, kept for the next disk save).
constexpr uint32_t kRetiredSlots = 4;

constexpr uint32_t kHeaderSize = 4096;
constexpr uint32_t kMaxChunks = 64;
constexpr uint32_t kSlotCapacity = 128;
constexpr uint32_t kTableCapacity = 4096;
constexpr uint32_t kPinCapacity = 4096;
constexpr uint64_t kChunkTableOff = 4096;
constexpr uint64_t kSlotTableOff = 6144;
constexpr uint64_t kObjTableOff = 12288;
constexpr uint64_t kEntrySize = 320;
constexpr uint64_t kPinTableOff = kObjTableOff + kTableCapacity * kEntrySize;
constexpr uint64_t kTotalSize = kPinTableOff + kPinCapacity * 32;
static_assert(kPinTableOff == 1323008 && kTotalSize == 1454080, "table offsets of FORMAT.md");

constexpr uint32_t kFlagFinished = 1;

// Byte ranges of the control segment's file that carry OFD locks (far beyond its end).
constexpr uint64_t kMetaLockByte = 1ull << 40;
constexpr uint64_t kSlotLockBase = kMetaLockByte + 4096;

enum EntryState : uint32_t { kEmpty = 0, kReserved = 1, kSealed = 2, kTombstone = 3 };
enum TierCode : uint32_t { kTierRam = 0, kTierDisk = 1 };

struct RetiredFile {
    uint64_t file_id;
    uint64_t length;
};

struct Header {
    char magic[8];
    uint32_t format_version;
    uint32_t header_size;
    uint64_t total_size;
    uint32_t flags;
    uint32_t dirty;
    uint64_t epoch;
    uint64_t next_version;
    uint64_t ram_budget;
    uint32_t creator_uid;
    uint32_t creator_pid;
    uint32_t max_chunks;
    uint32_t slot_capacity;
    uint32_t table_capacity;
    uint32_t pin_capacity;
    uint64_t chunk_table_off;
    uint64_t slot_table_off;
    uint64_t obj_table_off;
    uint64_t pin_table_off;
    char run_id[64];
    uint32_t disk_dir_len;
    uint32_t zero0;
    uint64_t created_ns;
    uint8_t zero1[64];
    char disk_dir[1024];
    RetiredFile retired[kRetiredSlots];  // file_id 0: an empty slot
    uint8_t zero2[4096 - 1280 - 16 * kRetiredSlots];
};
static_assert(sizeof(Header) == kHeaderSize, "header size");
static_assert(offsetof(Header, flags) == 24 && offsetof(Header, epoch) == 32, "header layout");
static_assert(offsetof(Header, creator_uid) == 56 && offsetof(Header, max_chunks) == 64, "header layout");
static_assert(offsetof(Header, chunk_table_off) == 80 && offsetof(Header, pin_table_off) == 104, "header layout");
static_assert(offsetof(Header, run_id) == 112 && offsetof(Header, disk_dir_len) == 176, "header layout");
static_assert(offsetof(Header, created_ns) == 184 && offsetof(Header, disk_dir) == 256, "header layout");
static_assert(offsetof(Header, retired) == 1280, "header layout");

struct ChunkEntry {
    uint32_t state;  // 0 absent, 1 present
    uint32_t zero0;
    uint64_t size;
    uint64_t zero1[2];
};
static_assert(sizeof(ChunkEntry) == 32, "chunk entry size");

struct SlotEntry {
    uint32_t state;  // 0 free, 1 used
    uint32_t pid;
    uint64_t epoch;
    uint64_t zero[2];
};
static_assert(sizeof(SlotEntry) == 32, "slot entry size");

struct ObjEntry {
    uint32_t state;
    uint32_t tier;
    uint32_t owner_slot;
    uint32_t key_len;
    uint64_t hash;
    uint64_t version;
    uint64_t file_id;
    uint64_t chunk;
    uint64_t offset;
    uint64_t length;
    uint8_t key[256];
};
static_assert(sizeof(ObjEntry) == kEntrySize && offsetof(ObjEntry, key) == 64, "object entry layout");

struct PinEntry {
    uint32_t state;  // 0 free, 1 used
    uint32_t slot;
    uint64_t chunk;
    uint64_t offset;
    uint64_t length;
};
static_assert(sizeof(PinEntry) == 32, "pin entry size");

// The directory at the start of every extent.
struct ExtentHead {
    uint32_t magic;
    uint32_t nbuf;
    uint64_t meta_off;
    uint64_t meta_len;
    uint64_t zero;
};
static_assert(sizeof(ExtentHead) == 32, "extent head size");

struct BufferDesc {
    uint64_t off;
    uint64_t len;
};
static_assert(sizeof(BufferDesc) == 16, "buffer descriptor size");

}  // namespace discomfort
