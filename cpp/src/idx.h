// IDX files (the MNIST container), raw or gzip-compressed, and the PGM images
// that `nn-cpp predict` reads.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct Images {
    uint32_t n = 0, rows = 0, cols = 0;
    std::vector<uint8_t> pixels;  // n * rows * cols, row-major, one image after another
};

// u8 IDX with 3 dimensions (magic 00 00 08 03). Throws NNError("PATH: ...") on wrong
// magic or dimensions, truncation, trailing bytes or a corrupt gzip stream. Memory grows
// only as bytes actually arrive, so a header that lies about the count cannot make us
// allocate gigabytes.
Images read_idx_images(const std::string& path);
// u8 IDX with 1 dimension (00 00 08 01); every label must be < n_classes.
std::vector<uint8_t> read_idx_labels(const std::string& path, uint32_t n_classes = 10);

struct Dataset {
    Images images;
    std::vector<uint8_t> labels;
};
// DIR/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; checks counts agree and
// image size equals n_inputs.
Dataset load_mnist(const std::string& dir, bool train, uint32_t n_inputs, uint32_t n_classes);

// A binary PGM (P5), maxval 1..255, exactly rows x cols. Pixels are rescaled to 0..255
// when maxval < 255 so the network always sees u8/255.
std::vector<uint8_t> read_pgm(const std::string& path, uint32_t rows = 28, uint32_t cols = 28);
