// IDX files (the MNIST container), raw or gzip-compressed, and the PGM images
// that `nn-cpp predict` reads.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

struct Images {
    uint32_t n = 0, rows = 0, cols = 0;
    std::vector<uint8_t> pixels;  // n * rows * cols, row-major, one image after another
};

// MNIST's shape: every network that reads it has these many inputs and outputs.
constexpr uint32_t MNIST_INPUTS = 784, MNIST_CLASSES = 10;

// 28x28 u8 images (magic 00 00 08 03), raw or gzip (told by the first two bytes, as in
// nn_numba.data). `expect_n`: the count the header must claim (0: any up to 1,000,000). Throws
// NNError("PATH: ...") on a wrong magic, count or image size (checked from the header, before any
// data is read or inflated), truncation, trailing bytes, a corrupt gzip stream or junk after it.
// Only regular files are read; memory is what the header promises, touched as data arrives.
Images read_idx_images(const std::string& path, uint32_t expect_n = 0);
// Only the images that pick(n) selects (n: the header's count; pick may throw), in that order:
// memory is what is selected, whatever the file holds. im.n is the file's count.
Images read_idx_images(const std::string& path, const std::function<std::vector<uint32_t>(uint32_t)>& pick);
// u8 labels (00 00 08 01), each 0-9; the same checks.
std::vector<uint8_t> read_idx_labels(const std::string& path, uint32_t expect_n = 0);

struct Dataset {
    Images images;
    std::vector<uint8_t> labels;
};
// DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] with MNIST's own counts (60,000 / 10,000).
Dataset load_mnist(const std::string& dir, bool train);
// A copy of `bytes` in memory that Linux backs with transparent huge pages where it can (2 MiB
// aligned and madvise(MADV_HUGEPAGE); a hint, nothing changes without them): a training batch reads
// random rows of the 47 MB training images, which on 4 KiB pages mostly miss the TLB.
std::unique_ptr<uint8_t, void (*)(void*)> huge_copy(const std::vector<uint8_t>& bytes);
// NNError("SOURCE: the network has ...") unless sizes start with 784 and end with 10. Callers name
// the checkpoint or option the sizes came from, so a wrong network is not blamed on the data.
void check_mnist_net(const std::vector<uint32_t>& sizes, const std::string& source);

// A binary PGM (P5), maxval 1..255, exactly rows x cols. Pixels are rescaled to 0..255
// when maxval < 255 so the network always sees u8/255.
std::vector<uint8_t> read_pgm(const std::string& path, uint32_t rows = 28, uint32_t cols = 28);
