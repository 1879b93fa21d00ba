#include "augment.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "config.h"
#include "rng.h"
#include "simd.h"

namespace {

constexpr int S = 28, P = S * S, W = S + 3;  // image side; padded side: 1 zero row/column before, 2 after
constexpr double C = (S - 1) / 2.0;          // image centre

constexpr int SV = (S + simd::V - 1) / simd::V * simd::V;  // a row of the spline's tables, whole vectors
constexpr int EP = P + SV - S;  // a row of E, the per-pixel field: whole-vector stores of the last image row end here

inline float pixel(uint8_t v) { return float(v) / 255.0f; }  // exactly numpy's u8 / np.float32(255)

// The inverse affine map output -> source, rows (a, c, e) and (d, g, k), as float32 like the Python side.
void inverse_affine(const Draws& d, float m[6]) {
    const double t = d.angle * (M_PI / 180.0);
    const double a = std::cos(t) / d.scale, b = std::sin(t) / d.scale;
    const double ux = C + d.dx, uy = C + d.dy;  // where the centre goes
    m[0] = float(a), m[1] = float(-b), m[2] = float(C - a * ux + b * uy);
    m[3] = float(b), m[4] = float(a), m[5] = float(C - b * ux - a * uy);
}

// Each pixel p = 28 y + x's x and y as floats, for the warp to load a vector of pixels at a time: made once.
struct Pixels {
    alignas(64) float x[P] = {};
    alignas(64) float y[P] = {};
    constexpr Pixels() {
        for (int p = 0; p < P; p++) x[p] = float(p % S), y[p] = float(p / S);
    }
};
constexpr Pixels XY;

// The image src / 255 into pad (W x W) at rows and columns 1..28; pad's border stays zero, which makes
// bilinear sampling branch-free: clamped positions outside read only zeros. Sets box (x0, x1, y0, y1) to
// the lit pixels' span in padded coordinates, widened by one column and row: a sample at (px, py) can read
// a lit pixel only if x0 < px < x1 and y0 < py < y1, as it reads floor(p) and floor(p) + 1; no lit pixel:
// an empty box. Whole vectors: a row's last one starts at column 28 - V, over pixels the one before also
// stored (the same values), so that no load reads past the image and no store past the row.
void pad_image(const uint8_t* src, float* pad, float box[4]) {
    using namespace simd;
    const vf v255 = bcast(255.0f);
    uint32_t cols = 0, rows = 0;  // bit x: column x has a lit pixel; bit y: row y has
    for (int y = 0; y < S; y++) {
        uint32_t lit = 0;
        for (int k0 = 0; k0 < S; k0 += V) {
            const int k = std::min(k0, S - V);
            const vf v = div(bytes(src + y * S + k), v255);  // correctly rounded: pixel()'s bits
            store(pad + (y + 1) * W + 1 + k, v);
            lit |= nonzero_lanes(v) << k;
        }
        cols |= lit;
        rows |= uint32_t(lit != 0) << y;
    }
    box[0] = 1e9f, box[1] = -1e9f, box[2] = 1e9f, box[3] = -1e9f;  // no lit pixel: no position is inside
    if (rows) {
        box[0] = float(__builtin_ctz(cols)), box[1] = float(31 - __builtin_clz(cols) + 2);
        box[2] = float(__builtin_ctz(rows)), box[3] = float(31 - __builtin_clz(rows) + 2);
    }
}

// out[p] = bilinear sample of the padded source at m (x, y, 1) + (ex[p], ey[p]) for every pixel p = 28 y + x.
// Positions are clamped into the padded image, where outside lands on the zero border. A vector of pixels at
// a time over the flat image (784 is a multiple of every width: no tails), each lane the scalar expression's
// operations in its order, the four taps by two pair gathers (at q and at q + W: the floats at q and q + 1
// of each lane), only for vectors with a position inside `box` (from pad_image): outside it all four taps
// are zeros and the sample is +0, which is stored. Every q is at most 29 W + 29, so q + W + 1 < W W.
void warp(const float* pad, float* out, const float m[6], const float* ex, const float* ey, const float box[4]) {
    using namespace simd;
    const vf lo = zero(), hi = bcast(float(S + 1)), side = bcast(float(W));
    const vf a = bcast(m[0]), c = bcast(m[1]), e = bcast(m[2] + 1.0f);  // + 1: padded coordinates
    const vf d = bcast(m[3]), g = bcast(m[4]), k1 = bcast(m[5] + 1.0f);
    const vf bx0 = bcast(box[0]), bx1 = bcast(box[1]), by0 = bcast(box[2]), by1 = bcast(box[3]);
    for (int k = 0; k < P; k += V) {
        const vf fx = load(XY.x + k), fy = load(XY.y + k);
        const vf px = clamp(add(add(add(mul(a, fx), mul(c, fy)), e), load(ex + k)), lo, hi);
        const vf py = clamp(add(add(add(mul(d, fx), mul(g, fy)), k1), load(ey + k)), lo, hi);
        if (!(inside(px, bx0, bx1) & inside(py, by0, by1))) {
            store(out + k, zero());
            continue;
        }
        const vf x0 = trunc(px), y0 = trunc(py);  // px >= 0: truncation is floor
        const vf tx = sub(px, x0), ty = sub(py, y0), q = add(mul(y0, side), x0);  // q: exact, a small integer
        vf p00, p01, p10, p11;
        gather2(pad, q, p00, p01);
        gather2(pad + W, q, p10, p11);
        const vf top = add(p00, mul(tx, sub(p01, p00)));
        const vf bot = add(p10, mul(tx, sub(p11, p10)));
        store(out + k, add(top, mul(ty, sub(bot, top))));
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
// with weights gw[x][0..3]; gd[i][x] holds them by node (zeros elsewhere, and past column 28), so that each
// node row is interpolated along x in vectors of columns: the same sums as a pixel's four taps in order,
// between exact zeros. The same for every sample: made once per batch.
struct Spline {
    int grid = 0;
    int gi[S];
    float gw[S][4];
    std::vector<float> gd;  // (grid, SV)
    explicit Spline(int grid);
};

Spline::Spline(int grid_) : grid(grid_), gd(size_t(grid_) * SV, 0.0f) {
    const int G = grid - 2;
    const float h = float(G - 1) / float(S - 1), sixth = 1.0f / 6.0f;
    for (int x = 0; x < S; x++) {
        const float g = float(x) * h;
        gi[x] = std::min(int(g), G - 2);
        const float t = g - float(gi[x]), u = 1.0f - t;
        gw[x][0] = u * u * u * sixth;
        gw[x][1] = (3.0f * t * t * (t - 2.0f) + 4.0f) * sixth;
        gw[x][2] = (3.0f * t * (1.0f + t - t * t) + 1.0f) * sixth;
        gw[x][3] = t * t * t * sixth;
        for (int k = 0; k < 4; k++) gd[size_t(gi[x] + k) * SV + x] = gw[x][k];
    }
}

// f (2, grid, grid) one sample's nodes -> T (2 grid, SV): every node row interpolated along x to all 28
// columns (zeros past them), T[(c grid + j) SV + x]. By node, in vectors of columns: T[., x] sums gd[i][x]
// f[c][j][i] over the nodes i in order, x's four taps in order between exact zeros. The sum skips the nodes
// no column of the vector uses (an exact zero added to a sum that starts at +0 never changes it), and runs
// four node rows at once (four chains of adds in flight, not one); a last group of fewer rows repeats the
// last one.
void spline_x(const Spline& sp, const float* f, float* T) {
    using namespace simd;
    const int n = 2 * sp.grid;  // node rows
    for (int k = 0; k < S; k += V) {
        const int i0 = sp.gi[k], i1 = sp.gi[std::min(k + V, S) - 1] + 4;  // the nodes columns k .. k + V - 1 use
        const float* w = sp.gd.data() + k;
        for (int r = 0; r < n; r += 4) {
            const int r1 = std::min(r + 1, n - 1), r2 = std::min(r + 2, n - 1), r3 = std::min(r + 3, n - 1);
            const float *f0 = f + size_t(r) * sp.grid, *f1 = f + size_t(r1) * sp.grid;
            const float *f2 = f + size_t(r2) * sp.grid, *f3 = f + size_t(r3) * sp.grid;
            vf a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
            for (int i = i0; i < i1; i++) {
                const vf wi = load(w + size_t(i) * SV);
                a0 = add(a0, mul(wi, bcast(f0[i]))), a1 = add(a1, mul(wi, bcast(f1[i])));
                a2 = add(a2, mul(wi, bcast(f2[i]))), a3 = add(a3, mul(wi, bcast(f3[i])));
            }
            store(T + size_t(r) * SV + k, a0), store(T + size_t(r1) * SV + k, a1);
            store(T + size_t(r2) * SV + k, a2), store(T + size_t(r3) * SV + k, a3);
        }
    }
}

// ... and along y: E (2, EP) the x then the y displacement of every pixel, each image row from 4 rows of T,
// in vectors of columns (the sums in tap order, as a pixel's scalar sum). Whole vectors: the last one of a
// row runs into the next row, which is written after it (E's rows end EP - P floats past the image).
void spline_y(const Spline& sp, const float* T, float* E) {
    using namespace simd;
    for (int c = 0; c < 2; c++)
        for (int y = 0; y < S; y++) {
            const float* t0 = T + (size_t(c) * sp.grid + sp.gi[y]) * SV;
            const vf w0 = bcast(sp.gw[y][0]), w1 = bcast(sp.gw[y][1]), w2 = bcast(sp.gw[y][2]), w3 = bcast(sp.gw[y][3]);
            for (int k = 0; k < S; k += V) {
                const vf v = add(add(add(mul(w0, load(t0 + k)), mul(w1, load(t0 + SV + k))), mul(w2, load(t0 + 2 * SV + k))),
                                 mul(w3, load(t0 + 3 * SV + k)));
                store(E + size_t(c) * EP + y * S + k, v);
            }
        }
}

// The draws of position q into d, reusing d's memory (augment_draws' values); grid: aug.ringed().
void draw_into(const Augment& aug, int grid, uint64_t seed, uint64_t epoch, uint64_t q, Draws& d) {
    const uint64_t item = rng_item(seed, STREAM_AUGMENT, epoch, q);
    auto u = [&](uint64_t k) { return rng_draw(item, k); };
    const int n = 2 * aug.shift + 1;
    d.dx = aug.shift ? int(std::floor(u(0) * n)) - aug.shift : 0;
    d.dy = aug.shift ? int(std::floor(u(1) * n)) - aug.shift : 0;
    d.angle = aug.rotate * (2 * u(2) - 1);
    d.scale = 1 + aug.scale * (2 * u(3) - 1);
    d.field.clear();
    if (grid > 0) {  // draws 4 .. 4 + 2 grid^2 - 1: one flat loop of inline hashes, which vectorises
        const double alpha = aug.elastic_alpha;
        const int nodes = 2 * grid * grid;
        d.field.resize(size_t(nodes));
        float* f = d.field.data();
        for (int k = 0; k < nodes; k++) f[k] = float(alpha * (2 * rng_draw(item, uint64_t(4 + k)) - 1));
    }
}

// out (784 floats) = src (784 u8) / 255 distorted by d, for an augmentation that interpolates (not a pure
// shift). sp: the spline (null without elastic distortion); the caller's arrays, reused sample after sample:
// pad (W, W) with a zero border, E (2, EP) zeros without elastic distortion (spline_y writes it otherwise),
// T (2 grid, SV). Separate arrays, so that the sanitizers catch a read past any of them.
void warp_one(const uint8_t* src, const Draws& d, const Spline* sp, float* pad, float* E, float* T, float* out) {
    float box[4], m[6];
    pad_image(src, pad, box);
    inverse_affine(d, m);
    if (sp) {
        spline_x(*sp, d.field.data(), T);
        spline_y(*sp, T, E);
    }
    warp(pad, out, m, E, E + EP, box);
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
    Draws d;
    draw_into(aug, aug.ringed(), seed, epoch, q, d);
    return d;
}

void augment_one(const uint8_t* src, const Augment& aug, const Draws& d, float* out) {
    if (!aug.enabled()) {
        for (int i = 0; i < P; i++) out[i] = pixel(src[i]);
        return;
    }
    if (aug.shift_only()) return shift_copy(src, d.dx, d.dy, out);
    std::unique_ptr<Spline> sp(aug.ringed() ? new Spline(aug.ringed()) : nullptr);
    alignas(64) float pad[W * W] = {}, E[2 * EP] = {};
    std::vector<float> T(sp ? size_t(2) * sp->grid * SV : 0);
    warp_one(src, d, sp.get(), pad, E, T.data(), out);
}

void augment_batch(const uint8_t* pixels, const uint32_t* idx, int nb, const Augment& aug, uint64_t seed,
                   uint64_t epoch, uint64_t q0, float* out) {
    if (!aug.enabled() || aug.shift_only()) {
#pragma omp parallel for schedule(static)
        for (int b = 0; b < nb; b++)
            augment_one(pixels + size_t(idx[b]) * P, aug, augment_draws(aug, seed, epoch, q0 + uint64_t(b)), out + size_t(b) * P);
        return;
    }
    // made once: the spline (the same for every sample); per thread, the arrays warp_one reuses
    const int grid = aug.ringed();
    const std::unique_ptr<Spline> sp(grid ? new Spline(grid) : nullptr);
#pragma omp parallel
    {
        alignas(64) float pad[W * W] = {}, E[2 * EP] = {};
        std::vector<float> T(size_t(2) * grid * SV);
        Draws d;
#pragma omp for schedule(static)
        for (int b = 0; b < nb; b++) {
            draw_into(aug, grid, seed, epoch, q0 + uint64_t(b), d);
            warp_one(pixels + size_t(idx[b]) * P, d, sp.get(), pad, E, T.data(), out + size_t(b) * P);
        }
    }
}
