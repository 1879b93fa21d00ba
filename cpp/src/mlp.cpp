#include "mlp.h"
#include "simd.h"
#include "error.h"
#include "update.h"

#include "rng.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

size_t Net::n_params() const {
    size_t n = 0;
    for (int l = 0; l < layers(); l++) n += W[l].size() + B[l].size();
    return n;
}

Net net_from_checkpoint(const Checkpoint& ck) { return Net{ck.sizes, ck.W, ck.B}; }

// ---------------------------------------------------------------- random numbers

static uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

Rng::Rng(uint64_t seed) {
    for (auto& v : s) v = splitmix64(seed);  // spreads any seed (even 0) over the state
}
uint64_t Rng::next() {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}
double Rng::uniform() { return double(next() >> 11) * 0x1.0p-53; }
uint64_t Rng::below(uint64_t n) {
    // reject the top sliver so every residue is equally likely
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    for (;;) {
        uint64_t r = next();
        if (r < lim) return r % n;
    }
}
double Rng::normal() {
    double u1 = 1.0 - uniform();  // (0, 1]: log never sees 0
    double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}
void Rng::shuffle(std::vector<uint32_t>& v) {  // Fisher-Yates
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[below(i)]);
}

Net he_init(const std::vector<uint32_t>& sizes, Rng& rng) {
    Net net;
    net.sizes = sizes;
    for (size_t l = 0; l + 1 < sizes.size(); l++) {
        double sd = std::sqrt(2.0 / sizes[l]);
        std::vector<float> w(size_t(sizes[l + 1]) * sizes[l]);
        for (auto& x : w) x = float(rng.normal() * sd);
        net.W.push_back(std::move(w));
        net.B.emplace_back(sizes[l + 1], 0.0f);
    }
    return net;
}

// ---------------------------------------------------------------- gemm

// Register tile: MR rows of C x NR columns, held in MR x 2 vectors of 8 floats
// (GCC/Clang vector extensions: two AVX registers per row with -mavx2, pairs of SSE
// registers otherwise). Per k: two loads of the Bm row, MR broadcasts of A, 2*MR FMAs.
// There is no reduction inside the tile, so the sum order over k stays fixed and
// results do not depend on vector width or thread count.
constexpr int MR = 6, NR = 16;
static_assert(MR == 6, "gemm() dispatches on 1..6 rows");
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float* p) {
    v8 v;
    std::memcpy(&v, p, sizeof v);  // unaligned load, no aliasing games
    return v;
}

// R (1..MR) rows x NR columns of C; only the first nr columns are stored. Bm must have NR
// readable columns per row: the right-edge strip is zero-padded by gemm() first.
template <int R>
static void tile(int K, const float* A, int lda, const float* Bm, int ldb, float* C, int ldc, int nr) {
    v8 acc[R][2] = {};
    for (int k = 0; k < K; k++) {
        const float* b = Bm + size_t(k) * ldb;
        v8 b0 = load8(b), b1 = load8(b + 8);
        for (int r = 0; r < R; r++) {
            float a = A[size_t(r) * lda + k];  // broadcast by the vector arithmetic
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }
    for (int r = 0; r < R; r++) {
        float* c = C + size_t(r) * ldc;
        if (nr == NR) {  // constant size: inlined vector stores, not a libc memcpy call
            std::memcpy(c, &acc[r][0], sizeof(v8));
            std::memcpy(c + 8, &acc[r][1], sizeof(v8));
        } else {
            float out[NR];
            std::memcpy(out, &acc[r][0], sizeof(v8));
            std::memcpy(out + 8, &acc[r][1], sizeof(v8));
            for (int q = 0; q < nr; q++) c[q] = out[q];
        }
    }
}

void gemm(int M, int N, int K, const float* A, int lda, const float* Bm, int ldb, float* C, int ldc) {
    const int mt = (M + MR - 1) / MR, nt = (N + NR - 1) / NR;
    // The last column strip, if narrower than NR, is copied once into a zero-padded K x NR
    // block so every tile runs the same vector code.
    const int edge = N % NR;
    std::vector<float> pad;
    if (edge) {
        pad.assign(size_t(K) * NR, 0.0f);
        for (int k = 0; k < K; k++) std::memcpy(&pad[size_t(k) * NR], Bm + size_t(k) * ldb + (N - edge), sizeof(float) * edge);
    }
    // Column strips outermost: consecutive tiles of one thread share a K x NR strip of Bm,
    // which then stays in L1/L2. Every C element belongs to exactly one tile: no races.
    // Below ~1M multiply-adds (e.g. the 10-logit layer) waking threads costs more than it saves.
#pragma omp parallel for schedule(static) if (long(M) * N * K >= (1L << 20))
    for (int t = 0; t < mt * nt; t++) {
        int i = (t % mt) * MR, j = (t / mt) * NR;
        int mr = std::min(MR, M - i), nr = std::min(NR, N - j);
        const float* a = A + size_t(i) * lda;
        const float* b = nr == NR ? Bm + j : pad.data();
        const int bs = nr == NR ? ldb : NR;
        float* c = C + size_t(i) * ldc + j;
        switch (mr) {
            case 6: tile<6>(K, a, lda, b, bs, c, ldc, nr); break;
            case 5: tile<5>(K, a, lda, b, bs, c, ldc, nr); break;
            case 4: tile<4>(K, a, lda, b, bs, c, ldc, nr); break;
            case 3: tile<3>(K, a, lda, b, bs, c, ldc, nr); break;
            case 2: tile<2>(K, a, lda, b, bs, c, ldc, nr); break;
            default: tile<1>(K, a, lda, b, bs, c, ldc, nr); break;
        }
    }
}

// C = A Bt^T: every C[i, j] is the dot product of row i of A and row j of Bt, both
// contiguous. This is the forward pass Z = A W^T with W as stored (out x in), so no
// transposed copy of the weights is needed. A tile of TM x TN dot products keeps TM x TN
// vector accumulators (12 of the 16 AVX registers): per 8 k's it loads TM + TN vectors
// for TM * TN FMAs. Lanes are added up in a fixed order at the end, then the k tail.
constexpr int TM = 4, TN = 3;

template <int R, int S>
static void tile_nt(int K, const float* A, int lda, const float* Bt, int ldb, float* C, int ldc) {
    v8 acc[R][S] = {};
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        v8 b[S];
        for (int s = 0; s < S; s++) b[s] = load8(Bt + size_t(s) * ldb + k);
        for (int r = 0; r < R; r++) {
            v8 a = load8(A + size_t(r) * lda + k);
            for (int s = 0; s < S; s++) acc[r][s] += a * b[s];
        }
    }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            float lane[8];
            std::memcpy(lane, &acc[r][s], sizeof lane);
            float sum = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
            for (int q = k; q < K; q++) sum += A[size_t(r) * lda + q] * Bt[size_t(s) * ldb + q];
            C[size_t(r) * ldc + s] = sum;
        }
}

template <int R>
static void tile_nt_rows(int S, int K, const float* A, int lda, const float* Bt, int ldb, float* C, int ldc) {
    if (S == 3) tile_nt<R, 3>(K, A, lda, Bt, ldb, C, ldc);
    else if (S == 2) tile_nt<R, 2>(K, A, lda, Bt, ldb, C, ldc);
    else tile_nt<R, 1>(K, A, lda, Bt, ldb, C, ldc);
}

void gemm_nt(int M, int N, int K, const float* A, int lda, const float* Bt, int ldb, float* C, int ldc) {
    static_assert(TM == 4 && TN == 3, "gemm_nt() dispatches on 1..4 rows and 1..3 columns");
    const int mt = (M + TM - 1) / TM, nt = (N + TN - 1) / TN;
    // Bt row groups outermost: a thread's consecutive tiles reuse the same TN rows of Bt from
    // L1 while rows of A stream from L2. One tile per C element group: no races.
#pragma omp parallel for schedule(static) if (long(M) * N * K >= (1L << 20))
    for (int t = 0; t < mt * nt; t++) {
        int i = (t % mt) * TM, j = (t / mt) * TN;
        int mr = std::min(TM, M - i), nr = std::min(TN, N - j);
        const float* a = A + size_t(i) * lda;
        const float* b = Bt + size_t(j) * ldb;
        float* c = C + size_t(i) * ldc + j;
        switch (mr) {
            case 4: tile_nt_rows<4>(nr, K, a, lda, b, ldb, c, ldc); break;
            case 3: tile_nt_rows<3>(nr, K, a, lda, b, ldb, c, ldc); break;
            case 2: tile_nt_rows<2>(nr, K, a, lda, b, ldb, c, ldc); break;
            default: tile_nt_rows<1>(nr, K, a, lda, b, ldb, c, ldc); break;
        }
    }
}

// ---------------------------------------------------------------- forward / backward

Work::Work(const Net& net, int cap_) : cap(cap_) {
    int L = net.layers();
    for (int l = 0; l <= L; l++) A.emplace_back(size_t(cap) * net.sizes[l]);
    for (int l = 0; l < L; l++) {
        dZ.emplace_back(size_t(cap) * net.sizes[l + 1]);
        dW.emplace_back(net.W[l].size());
        dB.emplace_back(net.B[l].size());
    }
    uint32_t widest = *std::max_element(net.sizes.begin() + 1, net.sizes.end());
    T.resize(size_t(cap) * widest);
}

static void transpose(const float* src, int rows, int cols, float* dst) {  // dst = src^T
    // 32x32 blocks keep both the reads and the writes within a few cache lines
    for (int i0 = 0; i0 < rows; i0 += 32)
        for (int j0 = 0; j0 < cols; j0 += 32)
            for (int i = i0; i < std::min(rows, i0 + 32); i++)
                for (int j = j0; j < std::min(cols, j0 + 32); j++) dst[size_t(j) * rows + i] = src[size_t(i) * cols + j];
}

void load_batch(Work& w, const uint8_t* pixels, int n_in, const uint32_t* idx, int nb) {
    // a vector of pixels at a time, divided by 255 (correctly rounded: numpy's u8 / np.float32(255)),
    // the samples split between the threads from 32 on (fewer are converted by the calling thread)
    const simd::vf d = simd::bcast(255.0f);
    float* x = w.A[0].data();
#pragma omp parallel for schedule(static) if (nb >= 32)
    for (int b = 0; b < nb; b++) {
        if (b + 4 < nb)  // random rows: ask for the row four ahead while this one is converted
            for (int i = 0; i < n_in; i += 64) __builtin_prefetch(pixels + size_t(idx[b + 4]) * n_in + i);
        const uint8_t* p = pixels + size_t(idx[b]) * n_in;
        float* r = x + size_t(b) * n_in;
        int i = 0;
        for (; i + simd::V <= n_in; i += simd::V) simd::store(r + i, simd::div(simd::bytes(p + i), d));
        for (; i < n_in; i++) r[i] = float(p[i]) / 255.0f;
    }
}

// The rule of train_step: nothing reads W1 while train_step holds it.
static void check_not_lent(bool lent) {
    if (lent) throw NNError("internal error: train_step holds the first layer's weights; call sync(net, w, opt) first");
}

void forward(const Net& net, Work& w, int nb) {
    check_not_lent(net.w1_lent);
    const int L = net.layers();
    for (int l = 0; l < L; l++) {
        const int in = int(net.sizes[l]), out = int(net.sizes[l + 1]);
        float* z = w.A[l + 1].data();
        // Z (nb x out) = A (nb x in) * W^T: dot products of contiguous rows of A and W
        gemm_nt(nb, out, in, w.A[l].data(), in, net.W[l].data(), in, z, out);
        const float* bias = net.B[l].data();
        const bool relu = l + 1 < L;
        for (int b = 0; b < nb; b++)
            for (int o = 0; o < out; o++) {
                float v = z[size_t(b) * out + o] + bias[o];
                z[size_t(b) * out + o] = relu ? std::max(v, 0.0f) : v;
            }
    }
}

double xent_row(const float* z, int C, int y, double scale, float* d, int* arg) {
    // stable softmax: subtract the row max; double inside so exp/log add no visible error
    int a = 0;
    for (int c = 1; c < C; c++)
        if (z[c] > z[a]) a = c;  // first maximum, like np.argmax
    double small[16];
    std::vector<double> big(C > 16 ? C : 0);
    double* e = C > 16 ? big.data() : small;
    double m = z[a], s = 0;
    for (int c = 0; c < C; c++) s += e[c] = std::exp(double(z[c]) - m);
    for (int c = 0; c < C; c++) d[c] = float((e[c] / s - (c == y)) * scale);
    *arg = a;
    return std::log(s) - (double(z[y]) - m);
}

double loss_grad(Work& w, const Net& net, const uint8_t* y, int nb, bool mean, int* correct) {
    const int L = net.layers(), C = int(net.sizes[L]);
    double loss = 0;
    int hits = 0;
    for (int b = 0; b < nb; b++) {
        int arg;
        loss += xent_row(w.A[L].data() + size_t(b) * C, C, y[b], mean ? 1.0 / nb : 1.0, w.dZ[L - 1].data() + size_t(b) * C,
                         &arg);
        hits += arg == y[b];
    }
    if (correct) *correct = hits;
    return loss;
}

void backward(const Net& net, Work& w, int nb) {
    for (int l = net.layers() - 1; l >= 0; l--) {
        const int in = int(net.sizes[l]), out = int(net.sizes[l + 1]);
        const float* dz = w.dZ[l].data();
        // dB = sum over the batch, in batch order
        float* db = w.dB[l].data();
        std::fill(db, db + out, 0.0f);
        for (int b = 0; b < nb; b++)
            for (int o = 0; o < out; o++) db[o] += dz[size_t(b) * out + o];
        // dW (out x in) = dZ^T (out x nb) * A_{l} (nb x in)
        transpose(dz, nb, out, w.T.data());
        gemm(out, in, nb, w.T.data(), nb, w.A[l].data(), in, w.dW[l].data(), in);
        if (l == 0) break;  // no gradient for the inputs
        // dZ_{l-1} (nb x in) = (dZ (nb x out) * W (out x in)) masked by Z_{l-1} > 0 (same as A > 0)
        float* dprev = w.dZ[l - 1].data();
        gemm(nb, in, out, dz, out, net.W[l].data(), in, dprev, in);
        const float* a = w.A[l].data();
        for (size_t k = 0; k < size_t(nb) * in; k++)
            if (!(a[k] > 0.0f)) dprev[k] = 0.0f;
    }
}

// ---------------------------------------------------------------- optimisers

Optimizer::Optimizer(int kind_, const Net& net) : kind(kind_) {
    for (int l = 0; l < net.layers(); l++)
        for (const auto* p : {&net.W[l], &net.B[l]}) {
            if (kind >= 1) slot0.emplace_back(p->size(), 0.0f);
            if (kind == 2) slot1.emplace_back(p->size(), 0.0f);
        }
}

StepArgs Optimizer::begin(double lr) {
    t++;
    // Adam's bias corrections in double, then folded into two float factors;
    // 1 - beta in double too: 1.0f - 0.999f is off by 5e-5 relative, which would show in v
    const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
    return {kind, nesterov, float(lr), wd, momentum, float(beta1), float(beta2), float(1.0 - beta1),
            float(1.0 - beta2), float(lr / bc1), float(1.0 / bc2), float(eps)};
}

// The update rule over whole arrays, V lanes at a time. A thread owns a contiguous slice.
static void update_all(const StepArgs& s, float* th, const float* g, float* m, float* v, long n, bool decay) {
    const long chunks = (n + simd::V - 1) / simd::V;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (long c = 0; c < chunks; c++) {
        const long k = c * simd::V;
        const int r = int(std::min<long>(simd::V, n - k));
        float* mk = m ? m + k : nullptr;
        float* vk = v ? v + k : nullptr;
        simd::st(th + k, update(s, simd::ld(th + k, r), simd::ld(g + k, r), mk, vk, r, decay), r);
    }
}

void Optimizer::step(Net& net, const Work& w, double lr) {
    check_not_lent(net.w1_lent || w1_lent);
    const StepArgs s = begin(lr);
    int pi = 0;
    for (int l = 0; l < net.layers(); l++) {
        for (int isw = 1; isw >= 0; isw--, pi++) {  // W then B, the file order
            float* th = isw ? net.W[l].data() : net.B[l].data();
            const float* g = isw ? w.dW[l].data() : w.dB[l].data();
            const long n = long(isw ? net.W[l].size() : net.B[l].size());
            update_all(s, th, g, kind >= 1 ? slot0[pi].data() : nullptr, kind == 2 ? slot1[pi].data() : nullptr, n,
                       isw == 1);
        }
    }
}

OptimState Optimizer::state() const {
    check_not_lent(w1_lent);
    OptimState st;
    st.kind = uint32_t(kind);
    st.step = t;
    if (kind >= 1) st.slots.push_back(slot0);
    if (kind == 2) st.slots.push_back(slot1);
    return st;
}

long Schedule::warmup_steps(double warmup_epochs, long steps_per_epoch) {
    return round_half_up(warmup_epochs * double(steps_per_epoch));  // the product rounded, then + 0.5: no FMA
}

double Schedule::at(long s) const {
    if (s < warmup) return lr * double(s + 1) / double(warmup);
    if (kind == "step") return lr * std::pow(gamma, double(s / steps_per_epoch / std::max(1, step_epochs)));
    if (kind == "cosine") {
        const double frac = std::min(1.0, double(s - warmup) / double(std::max(total - warmup, 1L)));
        return min_lr + (lr - min_lr) * (1.0 + std::cos(M_PI * frac)) / 2.0;
    }
    return lr;
}

// ---------------------------------------------------------------- evaluation

Eval evaluate(const Net& net, const uint8_t* pixels, const uint8_t* labels, uint32_t n_total,
              const std::vector<uint32_t>& idx_in) {
    std::vector<uint32_t> idx = idx_in;
    if (idx.empty()) {
        idx.resize(n_total);
        for (uint32_t i = 0; i < n_total; i++) idx[i] = i;
    }
    const int chunk = 500, n_in = int(net.sizes[0]);
    Work w(net, chunk);
    Eval e;
    std::vector<uint8_t> y(chunk);
    for (size_t s = 0; s < idx.size(); s += chunk) {
        int nb = int(std::min<size_t>(chunk, idx.size() - s));
        load_batch(w, pixels, n_in, idx.data() + s, nb);
        for (int b = 0; b < nb; b++) y[b] = labels[idx[s + b]];
        forward(net, w, nb);
        int hits;
        e.loss += loss_grad(w, net, y.data(), nb, true, &hits);
        e.correct += hits;
    }
    e.n = long(idx.size());
    e.accuracy = e.n ? double(e.correct) / e.n : 0.0;
    e.loss = e.n ? e.loss / e.n : 0.0;
    return e;
}

void predict(const Net& net, const uint8_t* pixels, int n, std::vector<float>* logits, std::vector<float>* probs) {
    const int L = net.layers(), C = int(net.sizes[L]), n_in = int(net.sizes[0]);
    Work w(net, std::max(n, 1));
    std::vector<uint32_t> idx(n);
    for (int i = 0; i < n; i++) idx[i] = uint32_t(i);
    load_batch(w, pixels, n_in, idx.data(), n);
    forward(net, w, n);
    logits->assign(w.A[L].begin(), w.A[L].begin() + size_t(n) * C);
    probs->resize(size_t(n) * C);
    for (int b = 0; b < n; b++) {
        const float* z = logits->data() + size_t(b) * C;
        double m = *std::max_element(z, z + C), s = 0;
        for (int c = 0; c < C; c++) s += std::exp(double(z[c]) - m);
        for (int c = 0; c < C; c++) (*probs)[size_t(b) * C + c] = float(std::exp(double(z[c]) - m) / s);
    }
}
