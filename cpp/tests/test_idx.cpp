// IDX and PGM readers: good files (raw and gzip) and every way they can be wrong.
#include <cstring>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "checkpoint.h"
#include "idx.h"

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

static void test_idx() {
    for (bool gz : {false, true}) {
        std::string sfx = gz ? ".gz" : "";
        Images im = read_idx_images(write("im" + sfx, idx(8, 3, {3, 2, 4}, 24), gz));
        CHECK(im.n == 3 && im.rows == 2 && im.cols == 4 && im.pixels.size() == 24);
        CHECK(im.pixels[0] == 3 && im.pixels[6] == 4);
        auto lab = read_idx_labels(write("lab" + sfx, idx(8, 1, {4}, 4, 6), gz));
        CHECK((lab == std::vector<uint8_t>{6, 7, 8, 9}));
        auto img = [&](const Bytes& b) { return [=] { read_idx_images(write("bad" + sfx, b, gz)); }; };
        expect_error("magic", img(Bytes{1, 0, 8, 3, 0, 0, 0, 0}), "not an IDX file");
        expect_error("type", img(idx(0x0d, 3, {1, 1, 1}, 1)), "not unsigned byte");
        expect_error("dims", img(idx(8, 2, {1, 1}, 1)), "has 2 dimensions, expected 3");
        expect_error("short header", img(Bytes{0, 0, 8, 3, 0, 0}), "truncated");
        expect_error("truncated", img(idx(8, 3, {3, 2, 4}, 23)), "truncated");
        expect_error("trailing", img(idx(8, 3, {3, 2, 4}, 25)), "trailing bytes");
        expect_error("empty", img(Bytes{}), "truncated");
        // the header claims 4 billion images: we must not allocate for them
        expect_error("lying", img(idx(8, 3, {4000000000u, 28, 28}, 100)), "absurdly large");
        expect_error("lying 2", img(idx(8, 3, {1000000, 28, 28}, 100)), "truncated");
        expect_error("labels range", [&] { read_idx_labels(write("l" + sfx, idx(8, 1, {4}, 4, 7), gz)); },
                     "label 10 at index 3 is out of range 0..9");
        expect_error("labels dims", [&] { read_idx_labels(write("l" + sfx, idx(8, 3, {1, 1, 1}, 1), gz)); },
                     "has 3 dimensions, expected 1");
    }
    // damaged gzip: bad CRC in the trailer, and a stream cut in half
    std::string p = write("c.gz", idx(8, 3, {50, 28, 28}, 50 * 784), true);
    Bytes z = read_file(p);
    Bytes cut(z.begin(), z.begin() + z.size() / 2);
    expect_error("gzip cut", [&] { read_idx_images(write("cut.gz", cut)); }, "truncated");
    z[z.size() - 6] ^= 0xff;
    expect_error("gzip crc", [&] { read_idx_images(write("crc.gz", z)); }, "corrupt gzip");
    expect_error("missing", [] { read_idx_images("/nonexistent/x.gz"); }, "/nonexistent/x.gz: cannot open");
    expect_error("folder", [] { read_idx_images("/tmp"); }, "is a folder");
    // load_mnist: counts must agree
    write("train-images-idx3-ubyte", idx(8, 3, {3, 2, 2}, 12));
    write("train-labels-idx1-ubyte", idx(8, 1, {2}, 2));
    expect_error("count", [] { load_mnist(g_dir, true, 4, 10); }, "2 labels for 3 images");
    write("train-labels-idx1-ubyte", idx(8, 1, {3}, 3));
    expect_error("inputs", [] { load_mnist(g_dir, true, 784, 10); }, "network has 784 inputs");
    Dataset d = load_mnist(g_dir, true, 4, 10);
    CHECK(d.images.n == 3 && d.labels.size() == 3);
    expect_error("no test files", [] { load_mnist(g_dir, false, 4, 10); }, "not found");
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
}

int main() {
    char dir[] = "/tmp/nncpp-idx-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    g_dir = dir;
    try {
        test_idx();
        test_pgm();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    std::string rm = "rm -rf " + g_dir;
    if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", g_dir.c_str());
    return finish("test_idx");
}
