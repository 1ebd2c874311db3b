#include "discomfort/layout.hpp"

#include <cstdio>
#include <cstring>

#include "discomfort/errors.hpp"
#include "discomfort/format.hpp"

namespace discomfort {

uint64_t fnv1a64(const void* data, size_t len) {
    const auto* p = static_cast<const uint8_t*>(data);
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

bool valid_utf8(const void* data, size_t len) {
    const auto* p = static_cast<const uint8_t*>(data);
    size_t i = 0;
    while (i < len) {
        uint8_t c = p[i];
        size_t n;
        uint32_t cp;
        if (c < 0x80) {
            ++i;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            n = 1, cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2, cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3, cp = c & 0x07;
        } else {
            return false;
        }
        if (len - i <= n) return false;  // truncated sequence
        for (size_t k = 1; k <= n; ++k) {
            if ((p[i + k] & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }
        static const uint32_t min_cp[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += n + 1;
    }
    return true;
}

namespace {

// Code points Python's repr() escapes beyond ASCII controls: C1 controls, no-break and other
// invisible spaces, format characters, line and paragraph separators (the common ones).
bool invisible(uint32_t cp) {
    return (cp >= 0x80 && cp <= 0xa0) || cp == 0xad || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200f) ||
           (cp >= 0x2028 && cp <= 0x202f) || (cp >= 0x205f && cp <= 0x206f) || cp == 0x3000 || cp == 0xfeff ||
           (cp >= 0xfff9 && cp <= 0xfffb);
}

void escape_code_point(std::string& out, uint32_t cp) {
    char buf[16];
    if (cp < 0x100) {
        std::snprintf(buf, sizeof buf, "\\x%02x", unsigned(cp));
    } else if (cp < 0x10000) {
        std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(cp));
    } else {
        std::snprintf(buf, sizeof buf, "\\U%08x", unsigned(cp));
    }
    out += buf;
}

}  // namespace

// Like Python's repr() of a str, so that both backends name a key the same way and a key with
// a NUL or a newline is shown in full, on one line. Bytes that are not UTF-8 show as \xNN.
std::string quoted(const std::string& text) {
    const bool has_single = text.find('\'') != std::string::npos;
    const char quote = has_single && text.find('"') == std::string::npos ? '"' : '\'';
    std::string out(1, quote);
    const auto* p = reinterpret_cast<const uint8_t*>(text.data());
    const size_t n = text.size();
    for (size_t i = 0; i < n;) {
        const uint8_t c = p[i];
        if (c < 0x80) {
            if (c == uint8_t(quote) || c == '\\') {
                out += '\\';
                out += char(c);
            } else if (c == '\n') {
                out += "\\n";
            } else if (c == '\r') {
                out += "\\r";
            } else if (c == '\t') {
                out += "\\t";
            } else if (c < 0x20 || c == 0x7f) {
                escape_code_point(out, c);
            } else {
                out += char(c);
            }
            ++i;
            continue;
        }
        size_t len = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (len == 0 || i + len > n || !valid_utf8(p + i, len)) {
            escape_code_point(out, c);  // not UTF-8: the byte itself
            ++i;
            continue;
        }
        uint32_t cp = len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
        for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (p[i + k] & 0x3f);
        if (invisible(cp)) {
            escape_code_point(out, cp);
        } else {
            out.append(text, i, len);
        }
        i += len;
    }
    return out + quote;
}

void check_key(const std::string& key) {
    if (key.empty()) throw StoreError(ErrorCode::InvalidKey, "key must not be empty");
    if (key.find('\0') != std::string::npos)
        throw StoreError(ErrorCode::InvalidKey, "key " + quoted(key) + " contains a NUL character");
    if (key.size() > kMaxKeyBytes)
        throw StoreError(ErrorCode::InvalidKey, "key is " + std::to_string(key.size()) +
                                                    " UTF-8 bytes long; the limit is 255");
}

void check_run_id(const std::string& run_id) {
    bool ok = !run_id.empty() && run_id.size() <= 64;
    for (char c : run_id) {
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        ok = ok && (alnum || c == '_' || c == '-');
    }
    if (!ok)
        throw StoreError(ErrorCode::InvalidRunId,
                         "run id " + quoted(run_id) + " is not 1-64 characters of [A-Za-z0-9_-]");
}

ExtentPlan plan_extent(uint64_t meta_len, const std::vector<uint64_t>& sizes) {
    if (sizes.size() > kMaxBuffers)
        throw StoreError(ErrorCode::InvalidArgument, "an object holds at most 65536 buffers");
    // Anything near 2^63 cannot be stored anyway; refusing early keeps the sums below exact.
    const uint64_t limit = 1ull << 62;
    ExtentPlan plan;
    plan.meta_off = align_up(32 + 16 * sizes.size(), 64);
    if (meta_len > limit) throw StoreError(ErrorCode::StoreFull, "object metadata too large");
    uint64_t pos = plan.meta_off + meta_len;
    plan.buffers.reserve(sizes.size());
    for (uint64_t n : sizes) {
        pos = align_up(pos, n >= kSmallObjectBytes ? kPage : 64);
        if (n > limit || pos > limit - n) throw StoreError(ErrorCode::StoreFull, "object too large to store");
        plan.buffers.push_back({pos, n});
        pos += n;
    }
    plan.length = align_up(pos, kPage);
    return plan;
}

void write_extent_head(uint8_t* dst, const ExtentPlan& plan, const void* meta, uint64_t meta_len) {
    ExtentHead head{kObjectMagic, static_cast<uint32_t>(plan.buffers.size()), plan.meta_off, meta_len, 0};
    std::memcpy(dst, &head, sizeof head);
    uint8_t* desc = dst + sizeof head;
    for (const Span& b : plan.buffers) {
        BufferDesc d{b.offset, b.length};
        std::memcpy(desc, &d, sizeof d);
        desc += sizeof d;
    }
    // Zero the padding up to the meta so that an extent never carries stale bytes there.
    std::memset(desc, 0, plan.meta_off - (desc - dst));
    if (meta_len) std::memcpy(dst + plan.meta_off, meta, meta_len);
}

ExtentDir parse_extent(const uint8_t* data, uint64_t available, uint64_t length, const std::string& where) {
    return parse_extent(data, available, length, [&] { return where; });
}

ExtentDir parse_extent(const uint8_t* data, uint64_t available, uint64_t length,
                       const std::function<std::string()>& where) {
    auto bad = [&](const std::string& why) { return StoreError(ErrorCode::Corrupted, where() + ": " + why); };
    if (length < sizeof(ExtentHead) || available < sizeof(ExtentHead))
        throw bad("extent of " + std::to_string(length) + " bytes is too short");
    ExtentHead head;
    std::memcpy(&head, data, sizeof head);
    if (head.magic != kObjectMagic) throw bad("bad object magic");
    uint64_t dir_end = 32 + 16 * uint64_t(head.nbuf);
    if (head.nbuf > kMaxBuffers || dir_end > length)
        throw bad("buffer count " + std::to_string(head.nbuf) + " does not fit the extent");
    if (dir_end > available) throw bad("buffer directory truncated");
    if (head.meta_off < dir_end || head.meta_off > length || head.meta_len > length - head.meta_off)
        throw bad("metadata range out of bounds");
    ExtentDir dir;
    dir.meta_off = head.meta_off;
    dir.meta_len = head.meta_len;
    dir.buffers.resize(head.nbuf);
    for (uint32_t i = 0; i < head.nbuf; ++i) {
        BufferDesc d;
        std::memcpy(&d, data + 32 + 16 * uint64_t(i), sizeof d);
        if (d.off > length || d.len > length - d.off) throw bad("buffer " + std::to_string(i) + " out of bounds");
        dir.buffers[i] = {d.off, d.len};
    }
    return dir;
}

}  // namespace discomfort
