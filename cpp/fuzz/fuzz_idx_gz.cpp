// Fuzz target for the gzip layer of the IDX reader. The fuzzer's bytes after the first two are the
// inflated file, so mutations reach the IDX checks behind a valid gzip stream; byte 0 picks how the
// gzip file is put together: bit 0 splits it into two members at byte 1's share of the data, bit 1
// appends byte 1 after the last member (junk), bit 2 cuts the last 1-8 bytes of the last member.
#include <cstdlib>
#include <vector>
#include <zlib.h>

#include "error.h"
#include "idx.h"
#include "memfile.h"

static void gzip_member(const uint8_t* p, size_t n, std::vector<uint8_t>* out) {
    z_stream z{};
    if (deflateInit2(&z, 1, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK) std::abort();
    std::vector<uint8_t> buf(deflateBound(&z, uLong(n)));
    z.next_in = const_cast<uint8_t*>(p);
    z.avail_in = uInt(n);
    z.next_out = buf.data();
    z.avail_out = uInt(buf.size());
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) std::abort();
    out->insert(out->end(), buf.begin(), buf.begin() + z.total_out);
    deflateEnd(&z);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 2) return 0;
    const uint8_t mode = data[0], arg = data[1];
    const uint8_t* p = data + 2;
    const size_t n = size - 2, cut = (mode & 1) ? n * arg / 255 : n;
    std::vector<uint8_t> gz;
    gzip_member(p, cut, &gz);
    if (mode & 1) gzip_member(p + cut, n - cut, &gz);
    const std::vector<uint8_t> whole = gz;
    if (mode & 4) gz.resize(gz.size() - 1 - (arg & 7));  // a member is at least 20 bytes
    if (mode & 2) gz.push_back(arg);
    // a cut or junk must be refused; cutting the last byte and appending the same one is no change
    // (fuzz/regressions/fuzz_idx_gz/cut-then-same-byte)
    const bool damaged = gz != whole;
    const std::string path = memfile(gz.data(), gz.size());
    try {
        Images im = read_idx_images(path);
        if (damaged || im.pixels.size() + 16 != n) std::abort();
    } catch (const NNError&) {
    }
    try {
        std::vector<uint8_t> y = read_idx_labels(path);
        if (damaged || y.size() + 8 != n) std::abort();
    } catch (const NNError&) {
    }
    return 0;
}
