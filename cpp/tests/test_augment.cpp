// Augmentation geometry and draws (the pixel-level comparison with nn_numba.augment is in
// tests/test_cpp.py): a pure shift copies pixels, the identity warp reproduces the image, a quarter turn
// moves pixels where the inverse map says, zero outside, the elastic field is bounded by alpha, and a
// batch does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "augment.h"
#include "check.h"
#include "config.h"
#include "rng.h"

static std::vector<uint8_t> image(uint64_t seed) {
    std::vector<uint8_t> im(784);
    for (int i = 0; i < 784; i++) im[i] = uint8_t(rng_bits(seed, 9, 0, i, 0) >> 56);
    return im;
}

int main() {
    const std::vector<uint8_t> im = image(1);
    std::vector<float> out(784), ref(784);
    for (int i = 0; i < 784; i++) ref[i] = float(im[i]) / 255.0f;

    Augment shift;
    shift.shift = 3;
    Draws d;
    d.dx = 2, d.dy = -1;
    augment_one(im.data(), shift, d, out.data());
    bool ok = true;
    for (int y = 0; y < 28; y++)
        for (int x = 0; x < 28; x++) {
            int sx = x - 2, sy = y + 1;
            float want = sx >= 0 && sx < 28 && sy >= 0 && sy < 28 ? ref[sy * 28 + sx] : 0.0f;
            ok = ok && out[y * 28 + x] == want;
        }
    CHECK(ok);  // exact: no interpolation

    Augment rot;
    rot.rotate = 90;
    Draws id;  // angle 0, scale 1, no shift: the identity through the interpolating path
    augment_one(im.data(), rot, id, out.data());
    double worst = 0;
    for (int i = 0; i < 784; i++) worst = std::max(worst, double(std::abs(out[i] - ref[i])));
    CHECK(worst < 1e-6);

    Draws quarter;
    quarter.angle = 90;  // counter-clockwise on screen (y down)
    augment_one(im.data(), rot, quarter, out.data());
    worst = 0;
    for (int y = 0; y < 28; y++)
        for (int x = 0; x < 28; x++) {
            // the inverse map of nn_numba.augment.affine_mats at 90 degrees: source (27 - y, x)
            int sx = 27 - y, sy = x;
            worst = std::max(worst, double(std::abs(out[y * 28 + x] - ref[sy * 28 + sx])));
        }
    CHECK(worst < 1e-5);

    Draws far;
    far.dx = 40;  // moved out of the picture entirely (through the affine path): all zero
    augment_one(im.data(), rot, far, out.data());
    bool zero = true;
    for (float v : out) zero = zero && v == 0.0f;
    CHECK(zero);

    Config c;
    c.shift = 2, c.rotate = 12, c.scale = 0.12, c.elastic_alpha = 2, c.elastic_sigma = 4;
    Augment all(c);
    CHECK(all.grid() == 10);  // round(27 / 4) + 1 = 8 inner nodes, + a ring
    Augment half;
    half.elastic_sigma = 6;  // 27 / 6 = 4.5 rounds half up to 5 (Python's round() would give 4): 6 inner nodes
    CHECK(half.grid() == 8);
    double fmax = 0;
    int dmin = 99, dmax = -99;
    for (uint64_t q = 0; q < 2000; q++) {
        Draws r = augment_draws(all, 3, 1, q);
        dmin = std::min({dmin, r.dx, r.dy}), dmax = std::max({dmax, r.dx, r.dy});
        CHECK(std::abs(r.angle) <= 12 && std::abs(r.scale - 1) <= 0.12 && r.field.size() == 2 * 10 * 10);
        for (float f : r.field) fmax = std::max(fmax, double(std::abs(f)));
    }
    CHECK(dmin == -2 && dmax == 2 && fmax <= 2 && fmax > 1.9);
    Augment rot_only;  // a part that is off still owns its draws: turning rotation on moves nothing else
    rot_only.shift = 2;
    Draws a = augment_draws(rot_only, 3, 1, 17), b = augment_draws(all, 3, 1, 17);
    CHECK(a.dx == b.dx && a.dy == b.dy);

    // a batch: the same bits on 1 and 2 threads
    std::vector<uint8_t> pixels;
    for (int i = 0; i < 40; i++) {
        auto m = image(100 + i);
        pixels.insert(pixels.end(), m.begin(), m.end());
    }
    std::vector<uint32_t> idx(40);
    for (int i = 0; i < 40; i++) idx[i] = uint32_t((i * 7) % 40);
    std::vector<float> one(40 * 784), two(40 * 784);
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    augment_batch(pixels.data(), idx.data(), 40, all, 5, 2, 100, one.data());
#ifdef _OPENMP
    omp_set_num_threads(2);
#endif
    augment_batch(pixels.data(), idx.data(), 40, all, 5, 2, 100, two.data());
    CHECK(one == two);
    std::vector<float> single(784);  // sample b of the batch is position 100 + b
    augment_one(pixels.data() + size_t(idx[7]) * 784, all, augment_draws(all, 5, 2, 107), single.data());
    CHECK(std::equal(single.begin(), single.end(), one.begin() + 7 * 784));
    return finish("test_augment");
}
