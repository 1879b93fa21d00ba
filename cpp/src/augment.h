// Data augmentation with the [augment] meaning of nn_numba/augment.py: integer shift, rotation, scaling
// and elastic distortion (a random control grid under a cubic B-spline), drawn per sample from the
// counter-based generator of rng.h (docs/training.md), so both trainers distort sample q of epoch e alike.
//
// Geometry: pixel (x, y) has its centre at integer coordinates, x right, y down, image centre (13.5, 13.5).
// Each output pixel is mapped back to a source position (inverse mapping) and the source is read there
// bilinearly; outside the image is zero. A pure shift copies pixels (no interpolation).
#pragma once
#include <cstdint>
#include <vector>

struct Config;

struct Augment {
    int shift = 0;  // max integer translation per axis, pixels
    double rotate = 0, scale = 0, elastic_alpha = 0, elastic_sigma = 4;
    explicit Augment(const Config& c);
    Augment() = default;
    bool enabled() const { return shift > 0 || rotate > 0 || scale > 0 || elastic_alpha > 0; }
    bool shift_only() const { return rotate == 0 && scale == 0 && elastic_alpha == 0; }
    int grid() const;  // G + 2: nodes per axis of the elastic control grid, with its outer ring
    int ringed() const { return elastic_alpha > 0 ? grid() : 0; }  // grid(), 0 without elastic distortion
};

// The random parameters of one sample.
struct Draws {
    int dx = 0, dy = 0;         // pixels, right / down
    double angle = 0;           // degrees, counter-clockwise on screen
    double scale = 1;           // factor
    std::vector<float> field;   // (2, grid, grid): x then y displacement at the control nodes, pixels
};
// Draws of the sample at position q of epoch `epoch`'s order (k = 0 .. 4 + 2 * grid^2 - 1).
Draws augment_draws(const Augment& aug, uint64_t seed, uint64_t epoch, uint64_t q);
// out (784 floats) = src (784 u8) / 255 distorted by d.
void augment_one(const uint8_t* src, const Augment& aug, const Draws& d, float* out);
// out (nb x 784) = samples pixels[idx[b]] distorted with the draws of positions q0 .. q0 + nb - 1.
// Parallel over samples; each sample depends only on its own draws, so any thread count gives the same.
void augment_batch(const uint8_t* pixels, const uint32_t* idx, int nb, const Augment& aug, uint64_t seed,
                   uint64_t epoch, uint64_t q0, float* out);
