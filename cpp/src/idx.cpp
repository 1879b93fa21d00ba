#include "idx.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sys/stat.h>
#include <zlib.h>

#include "checkpoint.h"  // read_file
#include "error.h"

namespace {

// gzopen/gzread read gzip and plain files alike (plain files pass straight through),
// so one code path serves both .gz and raw IDX files.
struct GzFile {
    gzFile f;
    std::string path;
    explicit GzFile(const std::string& p) : path(p) {
        struct stat st;
        if (::stat(p.c_str(), &st) != 0) throw file_error(p, std::string("cannot open: ") + std::strerror(errno));
        if (S_ISDIR(st.st_mode)) throw file_error(p, "is a folder, expected an IDX file");
        f = gzopen(p.c_str(), "rb");
        if (!f) throw file_error(p, std::string("cannot open: ") + std::strerror(errno));
    }
    ~GzFile() { gzclose(f); }
    // Reads up to n bytes; returns how many arrived (less only at end of data).
    size_t read(void* dst, size_t n) {
        size_t got = 0;
        while (got < n) {
            unsigned k = unsigned(std::min<size_t>(n - got, 1u << 20));
            int r = gzread(f, static_cast<uint8_t*>(dst) + got, k);
            if (r < 0) {
                int code;
                const char* msg = gzerror(f, &code);
                throw file_error(path, std::string("corrupt gzip data (") + msg + ")");
            }
            if (r == 0) break;
            got += size_t(r);
        }
        // a gzip stream cut short reads as a clean end in some zlib versions; gzerror tells
        int code;
        gzerror(f, &code);
        if (code != Z_OK && code != Z_BUF_ERROR) throw file_error(path, "corrupt gzip data");
        if (code == Z_BUF_ERROR) throw file_error(path, "truncated (gzip stream ends early)");
        return got;
    }
};

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }

// Reads header + data of a u8 IDX file with `ndim` dimensions.
std::vector<uint8_t> read_idx(const std::string& path, uint8_t ndim, std::vector<uint32_t>* dims) {
    GzFile g(path);
    uint8_t head[4];
    if (g.read(head, 4) != 4) throw file_error(path, "truncated (no IDX header)");
    if (head[0] != 0 || head[1] != 0) throw file_error(path, "not an IDX file (bad magic)");
    if (head[2] != 0x08) {
        char t[8];
        std::snprintf(t, sizeof t, "0x%02x", head[2]);
        throw file_error(path, std::string("IDX element type ") + t + " is not unsigned byte (0x08)");
    }
    if (head[3] != ndim)
        throw file_error(path, "IDX file has " + std::to_string(head[3]) + " dimensions, expected " +
                                   std::to_string(ndim));
    uint64_t total = 1;
    for (uint8_t i = 0; i < ndim; i++) {
        uint8_t d[4];
        if (g.read(d, 4) != 4) throw file_error(path, "truncated (IDX header)");
        dims->push_back(be32(d));
        total *= dims->back();  // at most 3 dims of < 2^32: no overflow before the check below
        if (total > (uint64_t(1) << 40)) throw file_error(path, "IDX dimensions are absurdly large");
    }
    // Grow in 1 MiB steps as data arrives: never trust the header with the allocation.
    std::vector<uint8_t> data;
    while (data.size() < total) {
        size_t want = size_t(std::min<uint64_t>(total - data.size(), 1 << 20));
        size_t old = data.size();
        data.resize(old + want);
        size_t got = g.read(data.data() + old, want);
        if (got < want)
            throw file_error(path, "truncated (header promises " + std::to_string(total) + " data bytes, file has " +
                                       std::to_string(old + got) + ")");
    }
    uint8_t extra;
    if (g.read(&extra, 1) != 0) throw file_error(path, "trailing bytes after the IDX data");
    return data;
}

std::string sibling(const std::string& dir, const std::string& stem) {
    std::string p = dir + "/" + stem;
    struct stat st;
    if (::stat((p + ".gz").c_str(), &st) == 0) return p + ".gz";
    if (::stat(p.c_str(), &st) == 0) return p;
    throw file_error(p + ".gz", "not found (expected the MNIST IDX files in " + dir + ")");
}

}  // namespace

Images read_idx_images(const std::string& path) {
    std::vector<uint32_t> dims;
    Images im;
    im.pixels = read_idx(path, 3, &dims);
    im.n = dims[0];
    im.rows = dims[1];
    im.cols = dims[2];
    if (im.rows == 0 || im.cols == 0) throw file_error(path, "IDX images have a zero dimension");
    return im;
}

std::vector<uint8_t> read_idx_labels(const std::string& path, uint32_t n_classes) {
    std::vector<uint32_t> dims;
    std::vector<uint8_t> y = read_idx(path, 1, &dims);
    for (size_t i = 0; i < y.size(); i++)
        if (y[i] >= n_classes)
            throw file_error(path, "label " + std::to_string(y[i]) + " at index " + std::to_string(i) +
                                       " is out of range 0.." + std::to_string(n_classes - 1));
    return y;
}

Dataset load_mnist(const std::string& dir, bool train, uint32_t n_inputs, uint32_t n_classes) {
    const std::string pre = train ? "train" : "t10k";
    Dataset d;
    std::string ip = sibling(dir, pre + "-images-idx3-ubyte"), lp = sibling(dir, pre + "-labels-idx1-ubyte");
    d.images = read_idx_images(ip);
    d.labels = read_idx_labels(lp, n_classes);
    if (d.labels.size() != d.images.n)
        throw file_error(lp, std::to_string(d.labels.size()) + " labels for " + std::to_string(d.images.n) +
                                 " images in " + ip);
    if (uint64_t(d.images.rows) * d.images.cols != n_inputs)
        throw file_error(ip, "images are " + std::to_string(d.images.rows) + "x" + std::to_string(d.images.cols) +
                                 " but the network has " + std::to_string(n_inputs) + " inputs");
    return d;
}

std::vector<uint8_t> read_pgm(const std::string& path, uint32_t rows, uint32_t cols) {
    std::vector<uint8_t> b = read_file(path);
    size_t p = 0;
    // header tokens separated by whitespace, '#' comments to end of line
    auto token = [&](const char* what) -> uint64_t {
        for (;;) {
            while (p < b.size() && std::isspace(b[p])) p++;
            if (p < b.size() && b[p] == '#') {
                while (p < b.size() && b[p] != '\n') p++;
                continue;
            }
            break;
        }
        if (p >= b.size() || !std::isdigit(b[p])) throw file_error(path, std::string("bad PGM header: no ") + what);
        uint64_t v = 0;
        while (p < b.size() && std::isdigit(b[p])) {
            v = v * 10 + (b[p++] - '0');
            if (v > 1000000) throw file_error(path, std::string("bad PGM header: ") + what + " too large");
        }
        return v;
    };
    if (b.size() < 2 || b[0] != 'P' || b[1] != '5')
        throw file_error(path, "not a binary PGM (P5) image; convert it with e.g. `convert in.png -depth 8 out.pgm`");
    p = 2;
    uint64_t w = token("width"), h = token("height"), maxval = token("maxval");
    if (maxval < 1 || maxval > 255) throw file_error(path, "PGM maxval " + std::to_string(maxval) + " unsupported (need 1..255)");
    if (w != cols || h != rows)
        throw file_error(path, "image is " + std::to_string(w) + "x" + std::to_string(h) + ", expected " +
                                   std::to_string(cols) + "x" + std::to_string(rows));
    if (p >= b.size() || !std::isspace(b[p])) throw file_error(path, "bad PGM header");
    p++;  // exactly one whitespace byte before the raster
    size_t need = size_t(w) * h;
    if (b.size() - p < need) throw file_error(path, "truncated (PGM raster shorter than " + std::to_string(need) + " bytes)");
    if (b.size() - p > need) throw file_error(path, "trailing bytes after the PGM raster");
    std::vector<uint8_t> px(b.begin() + p, b.end());
    for (auto& v : px) {
        if (v > maxval) throw file_error(path, "pixel value above maxval");
        if (maxval != 255) v = uint8_t(std::lround(v * 255.0 / maxval));
    }
    return px;
}
