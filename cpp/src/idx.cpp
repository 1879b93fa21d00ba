#include "idx.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <functional>
#include <new>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "checkpoint.h"  // sizes_str
#include "error.h"
#include "file.h"

namespace {

constexpr uint32_t MAX_ITEMS = 1000000;  // MNIST has 60,000; EMNIST, the largest of the family, about 800,000
const std::string FIX = "point --data-dir at a good copy (`nn-numba download --dir DIR` fetches one)";
constexpr size_t CHUNK = 1 << 20;
constexpr uint64_t MAX_DEFLATE_RATIO = 1032;

NNError idx_error(const std::string& path, const std::string& what) { return file_error(path, what + "; " + FIX); }

// The bytes of an IDX file, inflated when it is gzip (told by its first two bytes, not its name).
// A gzip file is read member after member as Python's reader does: anything after a member that is
// not another member is junk and refused (zlib's gzread would skip it silently).
class IdxStream {
  public:
    explicit IdxStream(const std::string& path) : f_(path, "an IDX file") {
        uint8_t magic[2] = {0, 0};
        gz_ = f_.peek(magic, 2) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
        if (gz_ && inflateInit2(&z_, 16 + MAX_WBITS) != Z_OK) throw NNError("out of memory");
    }
    ~IdxStream() {
        if (gz_) inflateEnd(&z_);
    }
    bool gz() const { return gz_; }
    uint64_t file_size() const { return f_.size; }
    // Up to min(n, CHUNK) bytes of data; fewer only at its end.
    size_t read(uint8_t* dst, size_t n) {
        n = std::min(n, CHUNK);
        if (!gz_) return f_.read(dst, n);
        z_.next_out = dst;
        z_.avail_out = uInt(n);
        while (z_.avail_out > 0) {
            if (z_.avail_in == 0 && !fill()) break;
            if (!in_member_) {  // between members: another one may follow, nothing else
                if (z_.avail_in < 2) fill();
                if (z_.avail_in < 2 || z_.next_in[0] != 0x1f || z_.next_in[1] != 0x8b)
                    throw idx_error(f_.path, "corrupt gzip file (junk after the compressed data)");
                inflateReset(&z_);
                in_member_ = true;
            }
            int r = inflate(&z_, Z_NO_FLUSH);
            if (r == Z_STREAM_END) {
                in_member_ = false;
            } else if (r != Z_OK && !(r == Z_BUF_ERROR && z_.avail_in == 0)) {
                throw idx_error(f_.path, std::string("corrupt gzip file (") + (z_.msg ? z_.msg : "inflate failed") + ")");
            }
        }
        if (z_.avail_out > 0 && in_member_)  // the input ran out inside a member
            throw idx_error(f_.path, "corrupt gzip file (compressed stream ends early, truncated)");
        return n - z_.avail_out;
    }

  private:
    // More input after what is left; false when the file has no more.
    bool fill() {
        size_t left = z_.avail_in;
        std::memmove(in_, z_.next_in ? z_.next_in : in_, left);
        size_t got = f_.read(in_ + left, sizeof in_ - left);
        z_.next_in = in_;
        z_.avail_in = uInt(left + got);
        return got > 0;
    }
    InFile f_;
    bool gz_ = false, in_member_ = false;
    z_stream z_{};
    uint8_t in_[1 << 16];
};

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }

// What an IDX file must be: magic, header length, bytes per item.
struct Kind {
    const char *name, *file;  // "images", "an images file"
    uint32_t magic;
    size_t hlen, item;
};
const Kind IMAGES = {"images", "an images file", 0x00000803, 16, 784},
           LABELS = {"labels", "a labels file", 0x00000801, 8, 1};

// Checks the header in head[0..got) and returns the item count. `expect_n`: the count it must claim
// (0: any up to MAX_ITEMS). All of this happens before a byte of data is read or inflated.
uint32_t check_header(const std::string& path, const uint8_t* head, size_t got, const Kind& k, uint32_t expect_n) {
    if (got == 0) throw idx_error(path, "file is empty (no IDX header)");
    if (got >= 4 && be32(head) != k.magic) {
        char m[64];
        std::snprintf(m, sizeof m, "bad IDX magic 0x%08x, expected 0x%08x", be32(head), k.magic);
        throw idx_error(path, m + (std::string(" for ") + k.file + " (wrong or damaged file)"));
    }
    if (got < k.hlen)
        throw idx_error(path, "only " + std::to_string(got) + " bytes, too short for an IDX " + k.name + " header");
    const uint32_t n = be32(head + 4);
    if (n > MAX_ITEMS)
        throw idx_error(path, "header claims " + std::to_string(n) + " " + k.name + ", more than the " +
                                  std::to_string(MAX_ITEMS) + " any MNIST-style file has");
    if (expect_n && n != expect_n)
        throw idx_error(path, "header claims " + std::to_string(n) + " " + k.name + ", expected " +
                                  std::to_string(expect_n) + " (not the original MNIST file?)");
    if (k.hlen == 16 && (be32(head + 8) != 28 || be32(head + 12) != 28))
        throw idx_error(path, "images are " + std::to_string(be32(head + 8)) + "x" + std::to_string(be32(head + 12)) +
                                  ", expected 28x28 (not MNIST?)");
    return n;
}

NNError size_error(const std::string& path, const Kind& k, uint64_t expected, uint64_t got, bool more) {
    const std::string what = got < expected ? "truncated" : "trailing bytes after the data";
    return idx_error(path, what + ": the IDX header promises " + std::to_string(expected) + " bytes of " + k.name +
                               " but the file holds " + (more ? "more than " + std::to_string(expected) : std::to_string(got)));
}

// Reads an IDX file of kind k: checks its header, calls on_header(n, most) before any data is read
// (most: the data bytes the file can really hold: deflate expands at most 1032:1), then hands the
// data to sink(bytes, len, offset) in pieces of whole items, at most CHUNK bytes each.
void stream_idx(const std::string& path, const Kind& k, uint32_t expect_n,
                const std::function<void(uint32_t, uint64_t)>& on_header,
                const std::function<void(const uint8_t*, size_t, uint64_t)>& sink) {
    IdxStream s(path);
    uint8_t head[16];
    size_t got = 0;
    for (size_t r; got < k.hlen && (r = s.read(head + got, k.hlen - got)) > 0;) got += r;
    const uint32_t n = check_header(path, head, got, k, expect_n);
    const uint64_t expected = uint64_t(n) * k.item;
    if (!s.gz() && s.file_size() - k.hlen != expected)  // a plain file: its size tells before reading
        throw size_error(path, k, expected, s.file_size() - k.hlen, false);
    on_header(n, s.gz() ? std::min(expected, MAX_DEFLATE_RATIO * s.file_size()) : expected);
    std::vector<uint8_t> buf(std::min<uint64_t>(expected, CHUNK / k.item * k.item));
    for (uint64_t off = 0; off < expected;) {
        const size_t want = size_t(std::min<uint64_t>(expected - off, buf.size()));
        size_t have = 0;
        for (size_t r; have < want && (r = s.read(buf.data() + have, want - have)) > 0;) have += r;
        if (have < want) throw size_error(path, k, expected, off + have, false);
        sink(buf.data(), want, off);
        off += want;
    }
    uint8_t extra;
    if (s.read(&extra, 1) != 0) throw size_error(path, k, expected, expected + 1, true);
}

// All the data of an IDX file of kind k; *n gets the item count.
std::vector<uint8_t> read_idx(const std::string& path, const Kind& k, uint32_t expect_n, uint32_t* n) {
    std::vector<uint8_t> data;
    stream_idx(path, k, expect_n, [&](uint32_t count, uint64_t most) {
        *n = count;
        data.reserve(size_t(most));  // one allocation, no copies as it grows, and little for a small file that lies
    }, [&](const uint8_t* p, size_t len, uint64_t) { data.insert(data.end(), p, p + len); });
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

Images read_idx_images(const std::string& path, uint32_t expect_n) {
    Images im;
    im.pixels = read_idx(path, IMAGES, expect_n, &im.n);
    im.rows = im.cols = 28;
    return im;
}

Images read_idx_images(const std::string& path, const std::function<std::vector<uint32_t>(uint32_t)>& pick) {
    Images im;
    im.rows = im.cols = 28;
    std::vector<std::pair<uint32_t, size_t>> want;  // (image index in the file, place in the result)
    size_t next = 0;
    stream_idx(path, IMAGES, 0, [&](uint32_t n, uint64_t) {
        im.n = n;
        std::vector<uint32_t> sel = pick(n);
        for (size_t j = 0; j < sel.size(); j++) want.push_back({sel[j], j});
        std::sort(want.begin(), want.end());
        im.pixels.resize(sel.size() * IMAGES.item);
    }, [&](const uint8_t* p, size_t len, uint64_t off) {
        const uint64_t first = off / IMAGES.item, end = (off + len) / IMAGES.item;
        for (; next < want.size() && want[next].first < end; next++)
            std::copy_n(p + (want[next].first - first) * IMAGES.item, IMAGES.item,
                        im.pixels.data() + want[next].second * IMAGES.item);
    });
    return im;
}

std::vector<uint8_t> read_idx_labels(const std::string& path, uint32_t expect_n) {
    uint32_t n;
    std::vector<uint8_t> y = read_idx(path, LABELS, expect_n, &n);
    for (size_t i = 0; i < y.size(); i++)
        if (y[i] > 9)
            throw idx_error(path, "label " + std::to_string(y[i]) + " at index " + std::to_string(i) +
                                      " is outside 0-9 (damaged file?)");
    return y;
}

void check_mnist_net(const std::vector<uint32_t>& sizes, const std::string& source) {
    if (sizes.front() != MNIST_INPUTS || sizes.back() != MNIST_CLASSES)
        throw file_error(source, "the network has " + std::to_string(sizes.front()) + " inputs and " +
                                     std::to_string(sizes.back()) + " outputs (sizes " + sizes_str(sizes) +
                                     "); MNIST needs " + std::to_string(MNIST_INPUTS) + " inputs and " +
                                     std::to_string(MNIST_CLASSES) + " outputs");
}

std::unique_ptr<uint8_t, void (*)(void*)> huge_copy(const std::vector<uint8_t>& bytes) {
    const size_t page = size_t(2) << 20, n = std::max(page, (bytes.size() + page - 1) / page * page);
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(page, n));
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);  // before the first touch: the copy below faults the huge pages in
#endif
    std::copy(bytes.begin(), bytes.end(), p);
    return {p, std::free};
}

Dataset load_mnist(const std::string& dir, bool train) {
    const std::string pre = train ? "train" : "t10k";
    const uint32_t n = train ? 60000 : 10000;
    Dataset d;
    d.images = read_idx_images(sibling(dir, pre + "-images-idx3-ubyte"), n);
    d.labels = read_idx_labels(sibling(dir, pre + "-labels-idx1-ubyte"), n);
    return d;
}

std::vector<uint8_t> read_pgm(const std::string& path, uint32_t rows, uint32_t cols) {
    InFile f(path, "a PGM image");
    // a 28x28 P5 file is under a kilobyte, header comments included: do not read a video named .pgm
    if (f.size > (1 << 20))
        throw file_error(path, std::to_string(f.size) + " bytes, too large for a " + std::to_string(cols) + "x" +
                                   std::to_string(rows) + " PGM image");
    std::vector<uint8_t> b(f.size);
    f.read_exact(b.data(), b.size());
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
