// gzip of a byte string in one member (zlib's deflate with the gzip wrapper): the test and fuzz
// seed files' compressed IDX files.
#pragma once
#include <cstdint>
#include <vector>
#include <zlib.h>

inline std::vector<uint8_t> gzip(const std::vector<uint8_t>& b) {
    z_stream z{};
    deflateInit2(&z, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
    std::vector<uint8_t> out(deflateBound(&z, uLong(b.size())));
    z.next_in = const_cast<uint8_t*>(b.data());
    z.avail_in = uInt(b.size());
    z.next_out = out.data();
    z.avail_out = uInt(out.size());
    deflate(&z, Z_FINISH);
    out.resize(z.total_out);
    deflateEnd(&z);
    return out;
}
