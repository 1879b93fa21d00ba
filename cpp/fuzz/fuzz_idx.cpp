// Fuzz target: any bytes as an IDX file, read as images and as labels (raw, or gzip when they
// start with 1f 8b), and through predict --index's streaming reader. Only NNError may come out; what
// is accepted has the promised shape.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "error.h"
#include "idx.h"
#include "memfile.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = memfile(data, size);
    Images all;
    bool ok = true;
    try {
        all = read_idx_images(path);
        if (all.rows != 28 || all.cols != 28 || all.pixels.size() != size_t(all.n) * 784) std::abort();
    } catch (const NNError&) {
        ok = false;
    }
    // predict --index's reader: the same verdict, and the images picked are the file's
    try {
        const auto pick = [](uint32_t n) { return n ? std::vector<uint32_t>{n - 1, 0, n / 2} : std::vector<uint32_t>{}; };
        Images some = read_idx_images(path, pick);
        if (!ok || some.n != all.n) std::abort();
        std::vector<uint32_t> idx = pick(all.n);
        for (size_t j = 0; j < idx.size(); j++)
            if (!std::equal(all.pixels.begin() + idx[j] * 784, all.pixels.begin() + (idx[j] + 1) * 784,
                            some.pixels.begin() + j * 784))
                std::abort();
    } catch (const NNError&) {
        if (ok) std::abort();
    }
    try {
        for (uint8_t y : read_idx_labels(path))
            if (y > 9) std::abort();
    } catch (const NNError&) {
    }
    return 0;
}
