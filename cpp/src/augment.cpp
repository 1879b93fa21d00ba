#include "augment.h"

#include <algorithm>
#include <cmath>

#include "config.h"
#include "rng.h"

namespace {

constexpr int S = 28, P = S * S, W = S + 3;  // image side; padded side: 1 zero row/column before, 2 after
constexpr double C = (S - 1) / 2.0;          // image centre

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
// clamped into the padded image, where outside lands on the zero border: no branch per pixel.
void warp_row(const float* pad, float* o, int y, const float m[6], const float* ex, const float* ey) {
    const float lo = 0.0f, hi = float(S + 1), fy = float(y);
    for (int x = 0; x < S; x++) {
        const float fx = float(x);
        const float px = std::min(std::max(m[0] * fx + m[1] * fy + (m[2] + 1.0f) + ex[x], lo), hi);
        const float py = std::min(std::max(m[3] * fx + m[4] * fy + (m[5] + 1.0f) + ey[x], lo), hi);
        const int x0 = int(px), y0 = int(py);
        const float tx = px - float(x0), ty = py - float(y0);
        const float* q = pad + y0 * W + x0;
        const float top = q[0] + tx * (q[1] - q[0]);
        const float bot = q[W] + tx * (q[W + 1] - q[W]);
        o[y * S + x] = top + ty * (bot - top);
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
// whose G x G inner nodes span the image corner to corner.
void elastic_field(const std::vector<float>& f, int grid, float* ex, float* ey) {
    const int G = grid - 2;
    int gi[S];
    float gw[S][4];
    const float h = float(G - 1) / float(S - 1), sixth = 1.0f / 6.0f;
    for (int x = 0; x < S; x++) {
        const float g = float(x) * h;
        gi[x] = std::min(int(g), G - 2);
        const float t = g - float(gi[x]), u = 1.0f - t;
        gw[x][0] = u * u * u * sixth;
        gw[x][1] = (3.0f * t * t * (t - 2.0f) + 4.0f) * sixth;
        gw[x][2] = (3.0f * t * (1.0f + t - t * t) + 1.0f) * sixth;
        gw[x][3] = t * t * t * sixth;
    }
    std::vector<float> T(size_t(2) * grid * S);  // each node row interpolated along x
    for (int c = 0; c < 2; c++)
        for (int j = 0; j < grid; j++)
            for (int x = 0; x < S; x++) {
                const float* r = f.data() + (size_t(c) * grid + j) * grid + gi[x];
                T[(size_t(c) * grid + j) * S + x] = gw[x][0] * r[0] + gw[x][1] * r[1] + gw[x][2] * r[2] + gw[x][3] * r[3];
            }
    for (int c = 0; c < 2; c++) {
        float* e = c == 0 ? ex : ey;
        for (int y = 0; y < S; y++) {
            const float* t0 = T.data() + (size_t(c) * grid + gi[y]) * S;
            for (int x = 0; x < S; x++)
                e[y * S + x] = gw[y][0] * t0[x] + gw[y][1] * t0[S + x] + gw[y][2] * t0[2 * S + x] + gw[y][3] * t0[3 * S + x];
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
    for (int y = 0; y < S; y++)
        for (int x = 0; x < S; x++) pad[(y + 1) * W + x + 1] = pixel(src[y * S + x]);
    float m[6];
    inverse_affine(d, m);
    float ex[P] = {}, ey[P] = {};
    if (aug.elastic_alpha > 0) elastic_field(d.field, aug.grid(), ex, ey);
    for (int y = 0; y < S; y++) warp_row(pad, out, y, m, ex + y * S, ey + y * S);
}

void augment_batch(const uint8_t* pixels, const uint32_t* idx, int nb, const Augment& aug, uint64_t seed,
                   uint64_t epoch, uint64_t q0, float* out) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nb; b++)
        augment_one(pixels + size_t(idx[b]) * P, aug, augment_draws(aug, seed, epoch, q0 + uint64_t(b)), out + size_t(b) * P);
}
