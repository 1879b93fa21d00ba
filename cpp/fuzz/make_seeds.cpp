// make_seeds OUT TINY_CK: writes the fuzzers' seed corpus, OUT/{fuzz_checkpoint,fuzz_idx,fuzz_idx_gz}/,
// from tests/data/tiny.ck and small IDX files made here (no MNIST needed): valid files of each kind,
// so mutations start from inputs that reach every check.
#include <cstdio>
#include <string>
#include <sys/stat.h>
#include <vector>
#include <zlib.h>

#include "checkpoint.h"
#include "file.h"
#include "idx.h"
#include "../tests/gz.h"

using Bytes = std::vector<uint8_t>;

static void put(const std::string& path, const Bytes& b) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(b.data(), 1, b.size(), f) != b.size() || std::fclose(f) != 0) {
        std::perror(path.c_str());
        std::exit(1);
    }
}
static Bytes idx(std::vector<uint32_t> header, size_t n, uint8_t mod) {
    Bytes b;
    for (uint32_t v : header)
        for (int i = 3; i >= 0; i--) b.push_back(uint8_t(v >> (8 * i)));
    for (size_t i = 0; i < n; i++) b.push_back(uint8_t(i * 7 % mod));
    return b;
}
static Bytes cat(Bytes a, const Bytes& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: make_seeds OUT TINY_CK\n");
        return 2;
    }
    const std::string out = argv[1];
    for (std::string d : {"", "/fuzz_checkpoint", "/fuzz_idx", "/fuzz_idx_gz"}) ::mkdir((out + d).c_str(), 0755);
    // checkpoints: the shared example (META + momentum OPTM), and the same network bare and with Adam
    Checkpoint ck = load_checkpoint(argv[2]);
    put(out + "/fuzz_checkpoint/tiny.ck", read_file(argv[2]));
    Checkpoint bare = ck;
    bare.meta.clear();
    bare.has_optim = false;
    put(out + "/fuzz_checkpoint/bare.ck", serialize_checkpoint(bare));
    Checkpoint adam = ck;
    adam.optim.kind = 2;
    adam.optim.slots.push_back(adam.optim.slots[0]);
    put(out + "/fuzz_checkpoint/adam.ck", serialize_checkpoint(adam));
    // IDX: two 28x28 images and three labels, raw and gzip, and gzip in two members
    const Bytes images = idx({0x803, 2, 28, 28}, 2 * 784, 251), labels = idx({0x801, 3}, 3, 10);
    put(out + "/fuzz_idx/images", images);
    put(out + "/fuzz_idx/labels", labels);
    put(out + "/fuzz_idx/images.gz", gzip(images));
    put(out + "/fuzz_idx/labels.gz", gzip(labels));
    put(out + "/fuzz_idx/two-members.gz", cat(gzip(Bytes(images.begin(), images.begin() + 20)),
                                              gzip(Bytes(images.begin() + 20, images.end()))));
    // fuzz_idx_gz: mode byte, its argument, then the inflated file
    put(out + "/fuzz_idx_gz/images", cat({0, 0}, images));
    put(out + "/fuzz_idx_gz/labels", cat({0, 0}, labels));
    put(out + "/fuzz_idx_gz/images-two-members", cat({1, 9}, images));
    // every seed is a file the readers accept (throws, and so fails, otherwise)
    for (const char* f : {"tiny.ck", "bare.ck", "adam.ck"}) load_checkpoint(out + "/fuzz_checkpoint/" + f);
    for (const char* f : {"images", "images.gz", "two-members.gz"}) read_idx_images(out + "/fuzz_idx/" + f);
    for (const char* f : {"labels", "labels.gz"}) read_idx_labels(out + "/fuzz_idx/" + f);
    return 0;
}
