// IDX and PGM readers: good files (raw and gzip) and every way they can be wrong.
#include <cstring>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "checkpoint.h"
#include "file.h"
#include "idx.h"
#include "gz.h"

using Bytes = std::vector<uint8_t>;
static std::string g_dir;

static void add_be32(Bytes& b, uint32_t v) {
    for (int i = 3; i >= 0; i--) b.push_back(uint8_t(v >> (8 * i)));
}
static Bytes idx(uint8_t type, uint8_t ndim, std::vector<uint32_t> dims, size_t ndata, uint8_t fill = 3) {
    Bytes b = {0, 0, type, ndim};
    for (uint32_t d : dims) add_be32(b, d);
    for (size_t i = 0; i < ndata; i++) b.push_back(uint8_t(fill + i % 5));
    return b;
}
static std::string write(const std::string& name, const Bytes& b, bool gz = false) {
    std::string path = g_dir + "/" + name;
    if (gz) {
        gzFile f = gzopen(path.c_str(), "wb");
        if (!b.empty()) gzwrite(f, b.data(), unsigned(b.size()));
        gzclose(f);
    } else {
        FILE* f = std::fopen(path.c_str(), "wb");
        if (!b.empty()) std::fwrite(b.data(), 1, b.size(), f);
        std::fclose(f);
    }
    return path;
}

// gzip of head followed by n zero bytes, made without holding the n bytes (this process's peak memory
// is inherited by the children that expect_bounded measures)
static Bytes gzip_zeros(const Bytes& head, size_t n) {
    z_stream z{};
    deflateInit2(&z, 9, Z_DEFLATED, 16 + MAX_WBITS, 9, Z_DEFAULT_STRATEGY);
    Bytes out, zeros(1 << 16, 0), buf(1 << 16);
    auto feed = [&](const uint8_t* p, size_t k, int flush) {
        z.next_in = const_cast<uint8_t*>(p);
        z.avail_in = uInt(k);
        do {
            z.next_out = buf.data();
            z.avail_out = uInt(buf.size());
            deflate(&z, flush);
            out.insert(out.end(), buf.data(), buf.data() + buf.size() - z.avail_out);
        } while (z.avail_out == 0);
    };
    feed(head.data(), head.size(), Z_NO_FLUSH);
    for (size_t left = n; left > 0; left -= std::min(left, zeros.size()))
        feed(zeros.data(), std::min(left, zeros.size()), Z_NO_FLUSH);
    feed(nullptr, 0, Z_FINISH);
    deflateEnd(&z);
    return out;
}
static Bytes cat(Bytes a, const Bytes& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

static void test_idx() {
    for (bool gz : {false, true}) {
        std::string sfx = gz ? ".gz" : "";
        Images im = read_idx_images(write("im" + sfx, idx(8, 3, {3, 28, 28}, 3 * 784), gz));
        CHECK(im.n == 3 && im.rows == 28 && im.cols == 28 && im.pixels.size() == 3 * 784);
        CHECK(im.pixels[0] == 3 && im.pixels[6] == 4);
        auto lab = read_idx_labels(write("lab" + sfx, idx(8, 1, {4}, 4, 6), gz));
        CHECK((lab == std::vector<uint8_t>{6, 7, 8, 9}));
        auto img = [&](const Bytes& b) { return [=] { read_idx_images(write("bad" + sfx, b, gz)); }; };
        expect_error("magic", img(Bytes{1, 0, 8, 3, 0, 0, 0, 0}), "bad IDX magic 0x01000803, expected 0x00000803");
        expect_error("type", img(idx(0x0d, 3, {1, 28, 28}, 784)), "bad IDX magic 0x00000d03");
        expect_error("dims", img(idx(8, 2, {1, 784}, 784)), "bad IDX magic 0x00000802");
        expect_error("short header", img(Bytes{0, 0, 8, 3, 0, 0}), "only 6 bytes, too short for an IDX images header");
        expect_error("truncated", img(idx(8, 3, {3, 28, 28}, 3 * 784 - 1)),
                     "truncated: the IDX header promises 2352 bytes of images but the file holds 2351");
        expect_error("trailing", img(idx(8, 3, {3, 28, 28}, 3 * 784 + 1)), "trailing bytes after the data");
        expect_error("empty", img(Bytes{}), "file is empty (no IDX header)");
        // a 29x27 file is not MNIST, whatever its size
        expect_error("29x27", img(idx(8, 3, {1, 29, 27}, 784)), "images are 29x27, expected 28x28");
        expect_error("29x27 exact", img(idx(8, 3, {1, 29, 27}, 29 * 27)), "images are 29x27, expected 28x28");
        // the header claims 4 billion images: refused before any data is read
        expect_error("lying", img(idx(8, 3, {4000000000u, 28, 28}, 100)),
                     "header claims 4000000000 images, more than the 1000000");
        expect_error("lying 2", img(idx(8, 3, {1000000, 28, 28}, 100)), "truncated");
        expect_error("labels range", [&] { read_idx_labels(write("l" + sfx, idx(8, 1, {4}, 4, 7), gz)); },
                     "label 10 at index 3 is outside 0-9");
        expect_error("labels dims", [&] { read_idx_labels(write("l" + sfx, idx(8, 3, {1, 1, 1}, 1), gz)); },
                     "bad IDX magic 0x00000803, expected 0x00000801 for a labels file");
        expect_error("labels count", [&] { read_idx_labels(write("l" + sfx, idx(8, 1, {4}, 4), gz), 5); },
                     "header claims 4 labels, expected 5");
    }
    // damaged gzip: bad CRC in the trailer, a stream cut in half, junk after the member
    const Bytes five = idx(8, 3, {50, 28, 28}, 50 * 784);
    Bytes z = gzip(five);
    Bytes cut(z.begin(), z.begin() + z.size() / 2);
    expect_error("gzip cut", [&] { read_idx_images(write("cut.gz", cut)); },
                 "corrupt gzip file (compressed stream ends early, truncated)");
    for (const Bytes& junk : {Bytes{'j', 'u', 'n', 'k'}, Bytes{0}, Bytes{0x1f}, Bytes(1000, 0)})
        expect_error("gzip junk", [&] { read_idx_images(write("junk.gz", cat(z, junk))); },
                     "corrupt gzip file (junk after the compressed data)");
    // several members are one gzip file (as Python reads them), and the count must still match
    Bytes half1(five.begin(), five.begin() + 1000), half2(five.begin() + 1000, five.end());
    CHECK(read_idx_images(write("two.gz", cat(gzip(half1), gzip(half2)))).pixels == Bytes(five.begin() + 16, five.end()));
    expect_error("two members, more data", [&] { read_idx_images(write("two.gz", cat(z, gzip({1})))); },
                 "trailing bytes after the data");
    Bytes crc = z;
    crc[crc.size() - 6] ^= 0xff;
    expect_error("gzip crc", [&] { read_idx_images(write("crc.gz", crc)); }, "corrupt gzip file (incorrect data check)");
    expect_error("missing", [] { read_idx_images("/nonexistent/x.gz"); }, "/nonexistent/x.gz: cannot open");
    expect_error("folder", [] { read_idx_images("/tmp"); }, "/tmp: is a directory, not an IDX file");
}

// Files that cannot be IDX data, and gzip bombs: refused early, in bounded time and memory.
static void test_idx_hostile() {
    std::string fifo = g_dir + "/fifo";
    CHECK(mkfifo(fifo.c_str(), 0600) == 0);
    expect_bounded("fifo", [&] { read_idx_images(fifo); }, "fifo: is a FIFO, not an IDX file", 64);
    expect_bounded("dev zero", [] { read_idx_labels("/dev/zero"); }, "/dev/zero: is a character device", 64);
    // 100 MB of zeros in about 100 KB of gzip, whose header claims 1,000,000 images
    Bytes small = gzip_zeros(idx(8, 3, {1000000, 28, 28}, 0), size_t(100) << 20);
    CHECK(small.size() < 200000);
    write("bomb.gz", small);  // test_pick reads it too
    write("train-images-idx3-ubyte.gz", small);
    write("train-labels-idx1-ubyte.gz", gzip(idx(8, 1, {60000}, 60000, 0)));
    expect_bounded("gzip bomb", [] { load_mnist(g_dir, true); },
                   "train-images-idx3-ubyte.gz: header claims 1000000 images, expected 60000", 64);
    // a claim of 2^31 images anywhere: refused from the header
    std::string b31 = write("b.gz", gzip_zeros(idx(8, 3, {1u << 31, 28, 28}, 0), size_t(1) << 20));
    expect_bounded("gzip bomb 2^31", [&] { read_idx_images(b31); },
                   "header claims 2147483648 images, more than the 1000000", 64);
}

// predict --index: only the images asked for are kept, in the order asked, while the file streams by
static void test_pick() {
    Bytes five = idx(8, 3, {5, 28, 28}, 0);
    for (uint8_t i = 0; i < 5; i++) five.insert(five.end(), 784, uint8_t(10 * i + 1));
    for (bool gz : {false, true}) {
        std::string p = write(gz ? "five.gz" : "five", five, gz);
        Images im = read_idx_images(p, [](uint32_t n) {
            CHECK(n == 5);
            return std::vector<uint32_t>{4, 0, 4, 2};
        });
        CHECK(im.n == 5 && im.pixels.size() == 4 * 784);
        CHECK(im.pixels[0] == 41 && im.pixels[784] == 1 && im.pixels[2 * 784 + 783] == 41 && im.pixels[3 * 784] == 21);
        expect_error("pick throws", [&] { read_idx_images(p, [](uint32_t) -> std::vector<uint32_t> { throw NNError("no"); }); }, "no");
        // the file is still checked whole
        expect_error("pick, trailing", [&] { read_idx_images(write("six", cat(five, {1}), gz), [](uint32_t) {
                         return std::vector<uint32_t>{0};
                     }); }, "trailing bytes");
    }
    // test_idx_hostile's 100 MB of zeros claiming 1,000,000 images: one image kept, not the 100 MB
    const std::string bomb = g_dir + "/bomb.gz";
    expect_bounded("pick from a bomb", [&] { read_idx_images(bomb, [](uint32_t) { return std::vector<uint32_t>{0}; }); },
                   "truncated: the IDX header promises 784000000 bytes of images but the file holds 104857600", 64);
}

static void test_load_mnist() {
    // MNIST's own counts, 28x28 images, labels 0-9; anything else is named with the file at fault
    write("t10k-images-idx3-ubyte.gz", gzip(idx(8, 3, {10000, 28, 28}, 10000 * 784)));
    write("t10k-labels-idx1-ubyte", idx(8, 1, {10000}, 10000, 0));  // raw files are found too
    Dataset d = load_mnist(g_dir, false);
    CHECK(d.images.n == 10000 && d.labels.size() == 10000 && d.images.pixels.size() == 10000 * 784);
    CHECK(d.labels[9999] == 4);
    write("t10k-labels-idx1-ubyte", idx(8, 1, {9999}, 9999, 0));
    expect_error("count", [] { load_mnist(g_dir, false); },
                 "t10k-labels-idx1-ubyte: header claims 9999 labels, expected 10000");
    write("t10k-labels-idx1-ubyte", idx(8, 1, {10000}, 10000, 0));
    write("t10k-images-idx3-ubyte.gz", gzip(idx(8, 3, {10000, 29, 27}, 10000 * 784)));
    expect_error("29x27", [] { load_mnist(g_dir, false); }, "t10k-images-idx3-ubyte.gz: images are 29x27");
    char empty[] = "/tmp/nncpp-empty-XXXXXX";
    CHECK(mkdtemp(empty) != nullptr);
    std::string e = empty;
    expect_error("no test files", [&] { load_mnist(e, false); }, "t10k-images-idx3-ubyte.gz: not found");
    rmdir(empty);
    // the network must fit MNIST: blamed on the checkpoint (or option) it came from
    check_mnist_net({784, 250, 10}, "a.ck");
    expect_error("inputs", [] { check_mnist_net({4, 3, 2}, "tiny.ck"); },
                 "tiny.ck: the network has 4 inputs and 2 outputs (sizes 4-3-2); MNIST needs 784 inputs and 10 outputs");
    expect_error("outputs", [] { check_mnist_net({784, 3, 9}, "x.ck"); }, "x.ck: the network has 784 inputs and 9");
}

static void test_pgm() {
    auto pgm = [](const std::string& head, size_t n, uint8_t v = 200) {
        Bytes b(head.begin(), head.end());
        b.insert(b.end(), n, v);
        return b;
    };
    auto px = read_pgm(write("a.pgm", pgm("P5\n# a comment\n28 28\n255\n", 784)));
    CHECK(px.size() == 784 && px[0] == 200);
    px = read_pgm(write("b.pgm", pgm("P5 28 28 15\n", 784, 15)));  // maxval 15 scales to 255
    CHECK(px[783] == 255);
    auto bad = [&](const Bytes& b) { return [=] { read_pgm(write("bad.pgm", b)); }; };
    expect_error("ascii pgm", bad(pgm("P2\n28 28\n255\n", 784)), "not a binary PGM");
    expect_error("size", bad(pgm("P5\n28 27\n255\n", 756)), "image is 28x27, expected 28x28");
    expect_error("maxval", bad(pgm("P5\n28 28\n65535\n", 1568)), "maxval 65535");
    expect_error("short", bad(pgm("P5\n28 28\n255\n", 783)), "truncated");
    expect_error("long", bad(pgm("P5\n28 28\n255\n", 785)), "trailing bytes");
    expect_error("header", bad(pgm("P5\n28\n", 0)), "bad PGM header");
    expect_error("above maxval", bad(pgm("P5\n28 28\n100\n", 784, 101)), "above maxval");
    expect_error("huge", bad(pgm("P5\n99999999999 28\n255\n", 0)), "too large");
    std::string big = write("big.pgm", pgm("P5\n28 28\n255\n", 784));
    CHECK(truncate(big.c_str(), off_t(1) << 30) == 0);  // sparse: a video named .pgm is not read
    expect_bounded("1 GB pgm", [&] { read_pgm(big); }, "1073741824 bytes, too large for a 28x28 PGM image", 64);
    CHECK(mkfifo((g_dir + "/fifo.pgm").c_str(), 0600) == 0);
    expect_bounded("fifo pgm", [] { read_pgm(g_dir + "/fifo.pgm"); }, "is a FIFO, not a PGM image", 64);
}

// huge_copy: the same bytes, at a 2 MiB boundary, for sizes below, at and above one huge page.
static void test_huge_copy() {
    for (size_t n : {size_t(1), size_t(2) << 20, (size_t(2) << 20) + 3, size_t(47040000)}) {
        std::vector<uint8_t> v(n);
        for (size_t i = 0; i < n; i++) v[i] = uint8_t(i * 131 + i / 4099);
        const auto p = huge_copy(v);
        CHECK(reinterpret_cast<uintptr_t>(p.get()) % (size_t(2) << 20) == 0);
        CHECK(std::memcmp(p.get(), v.data(), n) == 0);
    }
}

int main() {
    char dir[] = "/tmp/nncpp-idx-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    g_dir = dir;
    try {
        test_idx();
        test_idx_hostile();
        test_pick();
        test_load_mnist();
        test_pgm();
        test_huge_copy();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    std::string rm = "rm -rf " + g_dir;
    if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", g_dir.c_str());
    return finish("test_idx");
}
