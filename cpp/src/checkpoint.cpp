// Checkpoint reader/writer. The order of checks follows "What a reader must check"
// in docs/checkpoint-format.md, so C++ and Python reject the same files with the
// same reason.
#include "checkpoint.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include "error.h"
#include "file.h"
#include "json.h"

namespace {

constexpr uint32_t MAX_LAYERS = 64;
constexpr uint32_t MAX_WIDTH = 1000000;

uint32_t get_u32(const std::vector<uint8_t>& b, size_t off) {
    // explicit little-endian decode: correct on any host byte order
    return uint32_t(b[off]) | uint32_t(b[off + 1]) << 8 | uint32_t(b[off + 2]) << 16 |
           uint32_t(b[off + 3]) << 24;
}
uint64_t get_u64(const std::vector<uint8_t>& b, size_t off) {
    return uint64_t(get_u32(b, off)) | uint64_t(get_u32(b, off + 4)) << 32;
}
void put_u32(std::vector<uint8_t>& b, uint32_t v) {
    for (int i = 0; i < 4; i++) b.push_back(uint8_t(v >> (8 * i)));
}
void put_u64(std::vector<uint8_t>& b, uint64_t v) {
    put_u32(b, uint32_t(v));
    put_u32(b, uint32_t(v >> 32));
}
void put_f32s(std::vector<uint8_t>& b, const std::vector<float>& v) {
    for (float f : v) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        put_u32(b, u);
    }
}
// Reads n floats at off (bounds already checked by the caller).
std::vector<float> get_f32s(const std::vector<uint8_t>& b, size_t off, size_t n) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = get_u32(b, off + 4 * i);
        std::memcpy(&v[i], &u, 4);
    }
    return v;
}
uint32_t crc_of(const uint8_t* p, size_t n) {
    // zlib's crc32 takes uInt lengths: feed it in chunks so >4 GiB files are fine too
    uLong c = crc32(0L, Z_NULL, 0);
    while (n > 0) {
        uInt k = n > (1u << 30) ? (1u << 30) : uInt(n);
        c = crc32(c, p, k);
        p += k;
        n -= k;
    }
    return uint32_t(c);
}

}  // namespace

std::string sizes_str(const std::vector<uint32_t>& sizes) {
    std::string s;
    for (size_t i = 0; i < sizes.size(); i++) s += (i ? "-" : "") + std::to_string(sizes[i]);
    return s;
}

// Header fields and the tiling of parameters + sections, without making any arrays.
// Throws Truncated when the layout runs past the end of the file, so a short file
// (an interrupted copy, the usual cause) is reported as such rather than as a bad CRC.
struct Truncated : NNError {
    using NNError::NNError;
};
struct Layout {
    std::vector<uint32_t> sizes;
    uint64_t nparam = 0;
    size_t meta_off = 0, meta_len = 0, optm_off = 0, optm_len = 0;
    bool has_meta = false, has_optm = false;
};

// The header alone (b holds at least its first min(S, MAX_HEADER) bytes of a file of S bytes).
constexpr size_t MAX_HEADER = 24 + 4 * (MAX_LAYERS + 1);
static Layout header_layout(const std::vector<uint8_t>& b, uint64_t S, const std::string& name) {
    uint32_t header_bytes = get_u32(b, 8), dtype = get_u32(b, 12), act = get_u32(b, 16), L = get_u32(b, 20);
    if (dtype != 1) throw file_error(name, "bad header field dtype=" + std::to_string(dtype) + " (version 1 knows 1 = f32)");
    if (act != 1)
        throw file_error(name, "bad header field activation=" + std::to_string(act) + " (version 1 knows 1 = ReLU)");
    if (L < 1 || L > MAX_LAYERS) throw file_error(name, "bad header field L=" + std::to_string(L) + " (must be 1..64)");
    const uint64_t H = 24 + 4 * (uint64_t(L) + 1);
    if (header_bytes != H)
        throw file_error(name, "bad header field header_bytes=" + std::to_string(header_bytes) + " (L=" +
                                   std::to_string(L) + " needs " + std::to_string(H) + ")");
    if (S < H + 4)
        throw Truncated(name + ": truncated (" + std::to_string(S) + " bytes, the header alone needs " +
                        std::to_string(H + 4) + ")");
    Layout lay;
    bool sane = true;
    for (uint32_t i = 0; i <= L; i++) {
        uint32_t n = get_u32(b, 24 + 4 * i);
        sane &= n >= 1 && n <= MAX_WIDTH;
        lay.sizes.push_back(n);
    }
    if (!sane)
        throw file_error(name, "bad header field sizes=" + sizes_str(lay.sizes) + " (each must be 1..1000000)");
    // 64-bit: sizes <= 1e6 and L <= 64, so P < 2^53 and nothing below can overflow
    for (uint32_t l = 0; l < L; l++) lay.nparam += uint64_t(lay.sizes[l + 1]) * lay.sizes[l] + lay.sizes[l + 1];
    const uint64_t P = H + 4 * lay.nparam;
    if (P + 4 > S)
        throw Truncated(name + ": truncated (" + std::to_string(S) + " bytes, sizes " + sizes_str(lay.sizes) +
                        " need at least " + std::to_string(P + 4) + "); the save or copy was interrupted");
    return lay;
}

static Layout layout(const std::vector<uint8_t>& b, const std::string& name) {
    const uint64_t S = b.size();
    Layout lay = header_layout(b, S, name);
    const uint32_t L = uint32_t(lay.sizes.size()) - 1;
    uint64_t off = 24 + 4 * (uint64_t(L) + 1) + 4 * lay.nparam;
    const uint64_t end = S - 4;
    while (off < end) {
        if (off + 16 > end)
            throw file_error(name, "trailing bytes (" + std::to_string(end - off) +
                                       " bytes after the last section, too few for a section header)");
        uint32_t flags = get_u32(b, off + 4);
        uint64_t n = get_u64(b, off + 8);
        if (n > end - off - 16)
            throw Truncated(name + ": truncated (section at byte " + std::to_string(off) + " claims " +
                            std::to_string(n) + " bytes, only " + std::to_string(end - off - 16) + " left)");
        for (int k = 0; k < 4; k++)
            if (b[off + k] >= 0x80)
                throw file_error(name, "bad section tag at byte " + std::to_string(off) +
                                           " (must be four ASCII characters)");
        std::string tag(reinterpret_cast<const char*>(&b[off]), 4);
        if (tag == "META" || tag == "OPTM") {
            if (flags != 0)
                throw file_error(name, "bad section " + tag + " flags=" + std::to_string(flags) + " (version 1 needs 0)");
            bool& seen = tag == "META" ? lay.has_meta : lay.has_optm;
            if (seen) throw file_error(name, "duplicate " + tag + " section");
            seen = true;
            (tag == "META" ? lay.meta_off : lay.optm_off) = size_t(off + 16);
            (tag == "META" ? lay.meta_len : lay.optm_len) = size_t(n);
        }  // unknown tags are skipped, whatever their flags: later versions may add them
        off += 16 + n;
    }
    return lay;
}

static bool all_finite(const std::vector<float>& v) {
    for (float f : v)
        if (!std::isfinite(f)) return false;
    return true;
}

// Checks 1 and 2 on the first min(S, MAX_HEADER) bytes of a file of S bytes, then the truncation that
// the header alone shows (which, like in parse_checkpoint, takes precedence over a checksum mismatch).
static void check_start(const std::vector<uint8_t>& b, uint64_t S, const std::string& name) {
    // 1. magic, 2. version: never guess at a newer layout
    if (S < 4 || std::memcmp(b.data(), "NNCK", 4) != 0)
        throw file_error(name, "not an nn-numba checkpoint (does not start with NNCK)");
    if (S < 8) throw file_error(name, "truncated (" + std::to_string(S) + " bytes)");
    uint32_t version = get_u32(b, 4);
    if (version > CK_VERSION)
        throw file_error(name, "made by a newer nn-numba (format version " + std::to_string(version) +
                                   ", this reader knows " + std::to_string(CK_VERSION) + "): upgrade");
    if (version != CK_VERSION) throw file_error(name, "bad header field version=" + std::to_string(version) + " (must be 1)");
    if (S < 28) throw file_error(name, "truncated (" + std::to_string(S) + " bytes)");
    try {
        header_layout(b, S, name);
    } catch (const Truncated&) {
        throw;
    } catch (const NNError&) {  // a bad header field is reported after the checksum, as below
    }
}

Checkpoint parse_checkpoint(const std::vector<uint8_t>& b, const std::string& name,
                            const std::vector<uint32_t>& expect) {
    const size_t S = b.size();
    check_start(b, S, name);
    // 3. CRC over everything but the last four bytes
    uint32_t stored = get_u32(b, S - 4), crc = crc_of(b.data(), S - 4);
    if (stored != crc) {
        try {
            layout(b, name);
        } catch (const Truncated&) {
            throw;
        } catch (const NNError&) {
        }
        char hex[64];
        std::snprintf(hex, sizeof hex, "stored %08x, computed %08x", stored, crc);
        throw file_error(name, std::string("corrupt (checksum mismatch: ") + hex +
                                   "); use a backup or an earlier checkpoint");
    }
    // 4., 5. header fields and tiling
    Layout lay = layout(b, name);
    const uint32_t L = uint32_t(lay.sizes.size()) - 1;
    Checkpoint ck;
    ck.sizes = lay.sizes;
    // 6. finite parameters
    size_t off = 24 + 4 * (L + 1);
    for (uint32_t l = 0; l < L; l++) {
        size_t nw = size_t(ck.sizes[l + 1]) * ck.sizes[l], nb = ck.sizes[l + 1];
        ck.W.push_back(get_f32s(b, off, nw));
        off += 4 * nw;
        if (!all_finite(ck.W.back())) throw file_error(name, "NaN/Inf in W" + std::to_string(l + 1) + " (saved from a diverged run); use an earlier checkpoint");
        ck.B.push_back(get_f32s(b, off, nb));
        off += 4 * nb;
        if (!all_finite(ck.B.back())) throw file_error(name, "NaN/Inf in B" + std::to_string(l + 1) + " (saved from a diverged run); use an earlier checkpoint");
    }
    // 7. META is a strict JSON object; OPTM matches kind, slots and the parameter shapes
    if (lay.has_meta) {
        std::string text(reinterpret_cast<const char*>(&b[lay.meta_off]), lay.meta_len);
        std::string why;
        if (!json_object_valid(text, &why)) throw file_error(name, "bad META JSON (" + why + ")");
        ck.meta = text;
    }
    if (lay.has_optm) {
        const size_t o = lay.optm_off, n = lay.optm_len;
        if (n < 16) throw file_error(name, "bad OPTM payload (" + std::to_string(n) + " bytes, the header needs 16)");
        uint32_t kind = get_u32(b, o), slots = get_u32(b, o + 4);
        // sgd 0 slots, momentum 1, adam 2: the kind code is also the slot count
        if (kind > 2 || slots != kind)
            throw file_error(name, "bad OPTM payload (kind " + std::to_string(kind) + " with " + std::to_string(slots) +
                                       " slots; known: 0 sgd/0, 1 momentum/1, 2 adam/2)");
        uint64_t need = 16 + uint64_t(slots) * 4 * lay.nparam;
        if (n != need)
            throw file_error(name, "bad OPTM payload (" + std::to_string(n) + " bytes, expected " + std::to_string(need) + ")");
        ck.has_optim = true;
        ck.optim.kind = kind;
        ck.optim.step = get_u64(b, o + 8);
        size_t p = o + 16;
        for (uint32_t s = 0; s < slots; s++) {
            std::vector<std::vector<float>> arrs;
            for (uint32_t l = 0; l < L; l++)
                for (size_t cnt : {size_t(ck.sizes[l + 1]) * ck.sizes[l], size_t(ck.sizes[l + 1])}) {
                    arrs.push_back(get_f32s(b, p, cnt));  // byte-wise decode: payload may be unaligned
                    p += 4 * cnt;
                    if (!all_finite(arrs.back()))
                        throw file_error(name, "bad OPTM payload (NaN/Inf in slot " + std::to_string(s) + ")");
                }
            ck.optim.slots.push_back(std::move(arrs));
        }
    }
    // 8. architecture requested by the caller
    if (!expect.empty() && ck.sizes != expect)
        throw file_error(name, "architecture mismatch: has sizes " + sizes_str(ck.sizes) + ", expected " +
                                   sizes_str(expect));
    return ck;
}

Checkpoint load_checkpoint(const std::string& path, const std::vector<uint32_t>& expect) {
    InFile f(path, "a checkpoint file");
    // The header first: a file that is not a checkpoint, or that holds less than its header promises,
    // is refused after reading at most MAX_HEADER bytes. Otherwise the rest, up to the size fstat gave.
    std::vector<uint8_t> head(std::min<uint64_t>(f.size, MAX_HEADER));
    f.read_exact(head.data(), head.size());
    check_start(head, f.size, path);
    std::vector<uint8_t> b(f.size);
    std::copy(head.begin(), head.end(), b.begin());
    f.read_exact(b.data() + head.size(), b.size() - head.size());
    return parse_checkpoint(b, path, expect);
}

std::vector<uint8_t> serialize_checkpoint(const Checkpoint& ck) {
    const uint32_t L = uint32_t(ck.sizes.size()) - 1;
    std::vector<uint8_t> b;
    b.insert(b.end(), {'N', 'N', 'C', 'K'});
    put_u32(b, CK_VERSION);
    put_u32(b, 24 + 4 * (L + 1));
    put_u32(b, 1);  // dtype f32
    put_u32(b, 1);  // activation ReLU
    put_u32(b, L);
    for (uint32_t n : ck.sizes) put_u32(b, n);
    for (uint32_t l = 0; l < L; l++) {
        put_f32s(b, ck.W[l]);
        put_f32s(b, ck.B[l]);
    }
    if (!ck.meta.empty()) {
        b.insert(b.end(), {'M', 'E', 'T', 'A'});
        put_u32(b, 0);
        put_u64(b, ck.meta.size());
        b.insert(b.end(), ck.meta.begin(), ck.meta.end());
    }
    if (ck.has_optim) {
        uint64_t n = 16;
        for (const auto& slot : ck.optim.slots)
            for (const auto& a : slot) n += 4 * a.size();
        b.insert(b.end(), {'O', 'P', 'T', 'M'});
        put_u32(b, 0);
        put_u64(b, n);
        put_u32(b, ck.optim.kind);
        put_u32(b, uint32_t(ck.optim.slots.size()));
        put_u64(b, ck.optim.step);
        for (const auto& slot : ck.optim.slots)
            for (const auto& a : slot) put_f32s(b, a);
    }
    put_u32(b, crc_of(b.data(), b.size()));
    return b;
}

void save_checkpoint(const Checkpoint& ck, const std::string& path) {
    // a diverged network is not worth a checkpoint, and readers would refuse it anyway
    for (size_t l = 0; l < ck.W.size(); l++)
        if (!all_finite(ck.W[l]) || !all_finite(ck.B[l]))
            throw file_error(path, "cannot save: NaN/Inf in layer " + std::to_string(l + 1) +
                                       " (training diverged? try a smaller --lr); not saved");
    std::vector<uint8_t> b = serialize_checkpoint(ck);
    write_file_atomic(path, b.data(), b.size());
}

void write_file_atomic(const std::string& path, const uint8_t* data, size_t size) {
    std::string tmp = path + ".tmp-" + std::to_string(::getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) throw file_error(path, std::string("cannot write: ") + std::strerror(errno));
    size_t done = 0;
    while (done < size) {
        ssize_t n = ::write(fd, data + done, size - done);
        if (n < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            throw file_error(path, std::string("cannot write: ") + std::strerror(e));
        }
        done += size_t(n);
    }
    // fsync before rename: otherwise a crash can leave the new name pointing at an empty file
    if (::fsync(fd) != 0 || ::close(fd) != 0) {
        int e = errno;
        ::unlink(tmp.c_str());
        throw file_error(path, std::string("cannot write: ") + std::strerror(e));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
        int e = errno;
        ::unlink(tmp.c_str());
        throw file_error(path, std::string("cannot rename temporary file into place: ") + std::strerror(e));
    }
    // fsync the folder so the rename itself survives a crash
    std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
    if (dir.empty()) dir = "/";
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}
