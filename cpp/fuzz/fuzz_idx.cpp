// Fuzz target: any bytes as an IDX file, read as images and as labels (raw, or gzip when they
// start with 1f 8b). Only NNError may come out; what is accepted has the promised shape.
#include <cstdlib>

#include "error.h"
#include "idx.h"
#include "memfile.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = memfile(data, size);
    try {
        Images im = read_idx_images(path);
        if (im.rows != 28 || im.cols != 28 || im.pixels.size() != size_t(im.n) * 784) std::abort();
    } catch (const NNError&) {
    }
    try {
        for (uint8_t y : read_idx_labels(path))
            if (y > 9) std::abort();
    } catch (const NNError&) {
    }
    return 0;
}
