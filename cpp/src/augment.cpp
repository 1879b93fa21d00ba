#include "augment.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "config.h"
#include "rng.h"
#include "simd.h"

namespace {

constexpr int S = 28, P = S * S, W = S + 3;  // image side; padded side: 1 zero row/column before, 2 after
constexpr double C = (S - 1) / 2.0;          // image centre

constexpr int SV = (S + simd::V - 1) / simd::V * simd::V;  // a row in whole vectors

inline float pixel(uint8_t v) { return float(v) / 255.0f; }  // exactly numpy's u8 / np.float32(255)

// The inverse affine map output -> source, rows (a, c, e) and (d, g, k), as float32 like the Python side.
void inverse_affine(const Draws& d, float m[6]) {
    const double t = d.angle * (M_PI / 180.0);
    const double a = std::cos(t) / d.scale, b = std::sin(t) / d.scale;
    const double ux = C + d.dx, uy = C + d.dy;  // where the centre goes
    m[0] = float(a), m[1] = float(-b), m[2] = float(C - a * ux + b * uy);
    m[3] = float(b), m[4] = float(a), m[5] = float(C - b * ux - a * uy);
}

// One output row y: bilinear sample of the padded source at m (x, y, 1) + (ex[x], ey[x]). Positions are
// clamped into the padded image, where outside lands on the zero border. The row's positions in vectors,
// each lane the scalar expression's operations in its order; then the four taps per pixel, only from the
// row's first to its last pixel whose position falls inside `box` (x0, x1, y0, y1: a sample strictly
// inside can read a lit pixel; outside, all four taps are zeros and the sample is +0, which the row
// already holds).
void warp_row(const float* pad, float* o, int y, const float m[6], const float* ex, const float* ey,
              const float box[4]) {
    using namespace simd;
    float tx[SV], ty[SV], qf[SV];
    const vf lo = zero(), hi = bcast(float(S + 1)), side = bcast(float(W)), fy = bcast(float(y));
    const vf a = bcast(m[0]), cy = mul(bcast(m[1]), fy), e = bcast(m[2] + 1.0f);
    const vf d = bcast(m[3]), gy = mul(bcast(m[4]), fy), k1 = bcast(m[5] + 1.0f);
    const vf bx0 = bcast(box[0]), bx1 = bcast(box[1]), by0 = bcast(box[2]), by1 = bcast(box[3]);
    float* r = o + y * S;
    uint32_t lit = 0;
    for (int k = 0; k < S; k += V) {
        const int n = S - k;
        const vf fx = add(iota(), bcast(float(k)));
        const vf px = clamp(add(add(add(mul(a, fx), cy), e), ld(ex + k, n)), lo, hi);
        const vf py = clamp(add(add(add(mul(d, fx), gy), k1), ld(ey + k, n)), lo, hi);
        const vf x0 = trunc(px), y0 = trunc(py);  // px >= 0: truncation is floor
        store(tx + k, sub(px, x0));
        store(ty + k, sub(py, y0));
        store(qf + k, add(mul(y0, side), x0));  // exact: small integers
        lit |= (inside(px, bx0, bx1) & inside(py, by0, by1) & first_lanes(n)) << k;
        st(r + k, zero(), n);
    }
    if (!lit) return;
    const int first = __builtin_ctz(lit), last = 31 - __builtin_clz(lit);
    for (int x = first; x <= last; x++) {
        const float* p = pad + int(qf[x]);
        const float top = p[0] + tx[x] * (p[1] - p[0]);
        const float bot = p[W] + tx[x] * (p[W + 1] - p[W]);
        r[x] = top + ty[x] * (bot - top);
    }
}

void shift_copy(const uint8_t* src, int dx, int dy, float* out) {
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) {
            const int sx = x - dx, sy = y - dy;
            out[y * S + x] = (sx >= 0 && sx < S && sy >= 0 && sy < S) ? pixel(src[sy * S + sx]) : 0.0f;
        }
}

// The elastic field at every pixel: the control grid (2, G + 2, G + 2) through a separable cubic B-spline
// whose G x G inner nodes span the image corner to corner. Pixel x (or row y) uses nodes gi[x] .. gi[x] + 3
// with weights gw[x][0..3]; gd[i][x] holds them by node (zeros elsewhere), so that each node row is
// interpolated along x in vectors of columns: the same sums as a pixel's four taps in order, between exact
// zeros.
struct Spline {
    int grid = 0;
    int gi[S];
    float gw[S][4];
    std::vector<float> gd;  // (grid, SV)
};

const Spline& spline(int grid) {
    thread_local Spline sp;
    if (sp.grid == grid) return sp;
    const int G = grid - 2;
    const float h = float(G - 1) / float(S - 1), sixth = 1.0f / 6.0f;
    sp.gd.assign(size_t(grid) * SV, 0.0f);
    for (int x = 0; x < S; x++) {
        const float g = float(x) * h;
        sp.gi[x] = std::min(int(g), G - 2);
        const float t = g - float(sp.gi[x]), u = 1.0f - t;
        sp.gw[x][0] = u * u * u * sixth;
        sp.gw[x][1] = (3.0f * t * t * (t - 2.0f) + 4.0f) * sixth;
        sp.gw[x][2] = (3.0f * t * (1.0f + t - t * t) + 1.0f) * sixth;
        sp.gw[x][3] = t * t * t * sixth;
        for (int k = 0; k < 4; k++) sp.gd[size_t(sp.gi[x] + k) * SV + x] = sp.gw[x][k];
    }
    sp.grid = grid;
    return sp;
}

void elastic_field(const std::vector<float>& f, int grid, float* ex, float* ey) {
    using namespace simd;
    const Spline& sp = spline(grid);
    thread_local std::vector<float> T;  // each node row interpolated along x: (2 grid, SV)
    T.resize(size_t(2) * grid * SV);
    for (int c = 0; c < 2; c++)
        for (int j = 0; j < grid; j++) {
            const float* r = f.data() + (size_t(c) * grid + j) * grid;
            for (int k = 0; k < S; k += V) {
                vf acc = zero();
                for (int i = 0; i < grid; i++) acc = add(acc, mul(load(sp.gd.data() + size_t(i) * SV + k), bcast(r[i])));
                store(T.data() + (size_t(c) * grid + j) * SV + k, acc);
            }
        }
    for (int c = 0; c < 2; c++) {
        float* e = c == 0 ? ex : ey;
        for (int y = 0; y < S; y++) {
            const float* t0 = T.data() + (size_t(c) * grid + sp.gi[y]) * SV;
            const vf w0 = bcast(sp.gw[y][0]), w1 = bcast(sp.gw[y][1]), w2 = bcast(sp.gw[y][2]), w3 = bcast(sp.gw[y][3]);
            for (int k = 0; k < S; k += V) {
                const vf v = add(add(add(mul(w0, load(t0 + k)), mul(w1, load(t0 + SV + k))), mul(w2, load(t0 + 2 * SV + k))),
                                 mul(w3, load(t0 + 3 * SV + k)));
                st(e + y * S + k, v, S - k);
            }
        }
    }
}

}  // namespace

Augment::Augment(const Config& c)
    : shift(int(c.shift)), rotate(c.rotate), scale(c.scale), elastic_alpha(c.elastic_alpha),
      elastic_sigma(c.elastic_sigma) {}

int Augment::grid() const {
    // nn_numba.augment.grid_size: max(2, floor(27 / sigma + 0.5) + 1) inner nodes, + the ring
    return std::max(2, int(round_half_up((S - 1) / elastic_sigma)) + 1) + 2;
}

Draws augment_draws(const Augment& aug, uint64_t seed, uint64_t epoch, uint64_t q) {
    const uint64_t item = rng_item(seed, STREAM_AUGMENT, epoch, q);
    auto u = [&](uint64_t k) { return rng_draw(item, k); };
    Draws d;
    const int n = 2 * aug.shift + 1;
    d.dx = aug.shift ? int(std::floor(u(0) * n)) - aug.shift : 0;
    d.dy = aug.shift ? int(std::floor(u(1) * n)) - aug.shift : 0;
    d.angle = aug.rotate * (2 * u(2) - 1);
    d.scale = 1 + aug.scale * (2 * u(3) - 1);
    if (aug.elastic_alpha > 0) {
        const int g = aug.grid();
        d.field.resize(size_t(2) * g * g);
        for (size_t k = 0; k < d.field.size(); k++) d.field[k] = float(aug.elastic_alpha * (2 * u(4 + k) - 1));
    }
    return d;
}

void augment_one(const uint8_t* src, const Augment& aug, const Draws& d, float* out) {
    if (!aug.enabled()) {
        for (int i = 0; i < P; i++) out[i] = pixel(src[i]);
        return;
    }
    if (aug.shift_only()) return shift_copy(src, d.dx, d.dy, out);
    float pad[W * W] = {};
    uint8_t img[P + simd::V];  // the image with room for a row's last vector to read past its end
    std::memcpy(img, src, P);
    const simd::vf v255 = simd::bcast(255.0f);
    uint32_t cols = 0, rows = 0;  // bit x: column x has a lit pixel; bit y: row y has
    for (int y = 0; y < S; y++) {
        uint32_t lit = 0;
        for (int k = 0; k < S; k += simd::V) {
            const int n = S - k;
            const simd::vf v = simd::div(simd::bytes(img + y * S + k), v255);  // correctly rounded: pixel()'s bits
            simd::st(pad + (y + 1) * W + 1 + k, v, n);
            lit |= (simd::nonzero_lanes(v) & simd::first_lanes(n)) << k;
        }
        cols |= lit;
        rows |= uint32_t(lit != 0) << y;
    }
    // in padded coordinates the lit pixels span x0 + 1 .. x1 + 1; a sample at px reads floor(px) and floor(px) + 1
    float box[4] = {1e9f, -1e9f, 1e9f, -1e9f};  // no lit pixel: no position is inside
    if (rows) {
        box[0] = float(__builtin_ctz(cols)), box[1] = float(31 - __builtin_clz(cols) + 2);
        box[2] = float(__builtin_ctz(rows)), box[3] = float(31 - __builtin_clz(rows) + 2);
    }
    float m[6];
    inverse_affine(d, m);
    float ex[P] = {}, ey[P] = {};
    if (aug.elastic_alpha > 0) elastic_field(d.field, aug.grid(), ex, ey);
    for (int y = 0; y < S; y++) warp_row(pad, out, y, m, ex + y * S, ey + y * S, box);
}

void augment_batch(const uint8_t* pixels, const uint32_t* idx, int nb, const Augment& aug, uint64_t seed,
                   uint64_t epoch, uint64_t q0, float* out) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nb; b++)
        augment_one(pixels + size_t(idx[b]) * P, aug, augment_draws(aug, seed, epoch, q0 + uint64_t(b)), out + size_t(b) * P);
}
