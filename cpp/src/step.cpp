// train_step: one optimiser step on a mini-batch, as fast as this CPU allows.
//
// Layout: activations and their gradients live in w.H / w.G with rows padded to 64 floats
// (zeros in the padding), 64-byte aligned. The weights stay as stored (out x in), except W1 on
// the sparse path (below). Products:
//   forward       Z = A W^T        hidden layers after the first: axpy form over a panel of W^T
//                                  each task writes first                -> TR rows x TS vectors
//                                  dense first layers and the output layer: dot form
//                                                                        -> TR x TS dot-product tiles
//   input grad   dA = dZ W         axpy form over rows of W            -> TR rows x TS vectors
//   weight grad  dW = dZ^T A       axpy form over rows of A            -> TR rows x TS vectors,
//                                  then the optimiser step on that tile of W (update.h)
// A tile keeps its TR x TS sums in vector registers for the whole reduction: 24 of AVX-512's 32
// registers, 12 of AVX2's 16.
//
// The first layer. Most of MNIST's pixels are 0, so on a sparse batch the first layer keeps W1
// transposed, WT (n0 x ld1): row k is what pixel k adds to every output.
//   forward       a sample's outputs are the sum of its lit pixels' rows of WT, computed for two
//                 samples at once over the rows either lights (each row loaded once for both), a
//                 chunk of outputs of both in registers at a time
//   weight grad   for each block of 3 neighbouring pixels, a 3 x BS-vector tile of dWT summed over
//                 only the samples that light the block, then the optimiser step on WT
//
// Threads: one parallel region per step; in each phase every output element belongs to one task
// and is summed in a fixed order, so the result is the same for any number of threads.
#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "error.h"
#include "mlp.h"
#include "simd.h"
#include "update.h"

using namespace simd;

namespace {

constexpr int PAD = 64;  // row padding of w.H, w.G, WT, in floats
int pad(int n) { return (n + PAD - 1) / PAD * PAD; }

constexpr int TR = 6;  // rows of a tile (samples, outputs or pixels)
#if defined(__AVX512F__)
constexpr int TS = 4;  // vectors per tile row: 64 columns
constexpr int PU = 8;  // vectors per sample one sparse-forward pass over a pair keeps in registers (2 x 8 of 32)
#else
constexpr int TS = 2;
constexpr int PU = 4;  // 2 x 4 of AVX2's 16
#endif
constexpr int TW = TS * V;  // columns of a tile
// The sparse weight gradient's tile: TB pixels x BS vectors, 12 accumulators; per sample BS loads of
// dZ and TB broadcasts for 12 FMAs. On MNIST a lit block of 6 pixels has 3.4 lit pixels, one of 3 has
// 2.25: a tile summed over a block's samples does 1.78 FMAs per lit pixel's FMA with blocks of 6, 1.33
// with blocks of 3.
constexpr int TB = 3;
constexpr int BS = 4;
constexpr int BW = BS * V;  // columns of that tile
static_assert(PAD % BW == 0, "the tiles of dWT cover a padded row of WT");

// The threads of the parallel region this runs in.
int team() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

// The task order of a loop over nr row blocks x nc column panels of an array it writes, in bands of
// bs = ceil(nr / threads) row blocks: the static schedule gives each thread one band of whole rows,
// give or take a few tasks where the shares and the bands do not meet. When two threads write
// interleaved parts of the same rows, the cores pass those rows' cache lines back and forth at each
// call, and a tiled read-modify-write can take longer on two threads than on one (docs/performance.md,
// "Threads write whole rows"). Inside a band the column panels go slowest, so a run of tasks reads the
// same panel of the other operand. Unbanded, or with one thread: row blocks fastest over the whole
// array. Either way each tile is one task, summed in the same order, so the bits do not depend on it.
struct Bands {
    int nr, nc, bs;
    Bands(int rows, int panels, bool banded) : nr(rows), nc(panels), bs(banded ? (rows + team() - 1) / team() : rows) {}
    int tasks() const { return nr * nc; }
    std::pair<int, int> at(int t) const {  // task t's row block and column panel
        const int band = t / (bs * nc), u = t % (bs * nc), n = std::min(bs, nr - band * bs);
        return {band * bs + u % n, u / n};
    }
};

// ---------------------------------------------------------------- forward

// Z[r, s] = relu?(A[r] . W[s] + bias[s]) for R rows of A and S rows of W.
template <int R, int S>
void dot_tile(int K, const float* A, int lda, const float* W, int ldw, const float* bias, bool relu, float* Z, int ldz) {
    vf acc[R * S + 3];  // + 3 zeros: the sums go four at a time
    for (auto& a : acc) a = zero();
    const int kf = K - K % V;
    for (int k = 0; k < kf; k += V) {
        vf w[S];
        for (int s = 0; s < S; s++) w[s] = load(W + size_t(s) * ldw + k);
        for (int r = 0; r < R; r++) {
            vf a = load(A + size_t(r) * lda + k);
            pin(a);
            for (int s = 0; s < S; s++) acc[r * S + s] = fma(a, w[s], acc[r * S + s]);
        }
    }
    if (kf < K) {
        vf w[S];
        for (int s = 0; s < S; s++) w[s] = loadn(W + size_t(s) * ldw + kf, K - kf);
        for (int r = 0; r < R; r++) {
            vf a = loadn(A + size_t(r) * lda + kf, K - kf);
            for (int s = 0; s < S; s++) acc[r * S + s] = fma(a, w[s], acc[r * S + s]);
        }
    }
    float out[R * S + 3];
    for (int q = 0; q < R * S; q += 4) sum4(acc + q, out + q);
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            float z = out[r * S + s] + bias[s];
            Z[size_t(r) * ldz + s] = relu ? std::max(z, 0.0f) : z;
        }
}

template <int R>
void dot_rows(int S, int K, const float* A, int lda, const float* W, int ldw, const float* bias, bool relu, float* Z,
              int ldz) {
    static_assert(TS <= 4, "dot_rows dispatches on 1..4 rows of W");
    switch (S) {
        case 4: dot_tile<R, (TS >= 4 ? 4 : 1)>(K, A, lda, W, ldw, bias, relu, Z, ldz); break;
        case 3: dot_tile<R, (TS >= 3 ? 3 : 1)>(K, A, lda, W, ldw, bias, relu, Z, ldz); break;
        case 2: dot_tile<R, 2>(K, A, lda, W, ldw, bias, relu, Z, ldz); break;
        default: dot_tile<R, 1>(K, A, lda, W, ldw, bias, relu, Z, ldz); break;
    }
}

// Z (nb x N, row stride ldz) = relu?(A W^T + bias), W (N x K) as stored. Tiles with W's rows
// outermost, so a thread's consecutive tiles share TS rows of W in L1 and each thread reads only its
// part of W (in Bands of samples it reads all of W, and measures slower: docs/performance.md).
// One TR x TS tile of forward_dense at rows i, columns j.
void dot_task(int i, int j, int nb, int N, int K, const float* A, int lda, const float* W, const float* bias, bool relu,
              float* Z, int ldz) {
    const int mr = std::min(TR, nb - i), nr = std::min(TS, N - j);
    const float* a = A + size_t(i) * lda;
    const float* w = W + size_t(j) * K;
    float* z = Z + size_t(i) * ldz + j;
    switch (mr) {
        case 6: dot_rows<6>(nr, K, a, lda, w, K, bias + j, relu, z, ldz); break;
        case 5: dot_rows<5>(nr, K, a, lda, w, K, bias + j, relu, z, ldz); break;
        case 4: dot_rows<4>(nr, K, a, lda, w, K, bias + j, relu, z, ldz); break;
        case 3: dot_rows<3>(nr, K, a, lda, w, K, bias + j, relu, z, ldz); break;
        case 2: dot_rows<2>(nr, K, a, lda, w, K, bias + j, relu, z, ldz); break;
        default: dot_rows<1>(nr, K, a, lda, w, K, bias + j, relu, z, ldz); break;
    }
}

void forward_dense(int nb, int N, int K, const float* A, int lda, const float* W, const float* bias, bool relu,
                   float* Z, int ldz) {
    const int mt = (nb + TR - 1) / TR, nt = (N + TS - 1) / TS;
#pragma omp for schedule(static)
    for (int t = 0; t < mt * nt; t++) dot_task((t % mt) * TR, (t / mt) * TS, nb, N, K, A, lda, W, bias, relu, Z, ldz);
}

// Z (nb x N, row stride ldz) = relu?(A W^T + bias) in axpy form over W^T, for the hidden layers
// after the first: in the step, where A and W come from L2 and L3, it is faster than forward_dense's
// dot products, the transposes included (docs/performance.md). Each task owns TW outputs: it writes
// its panel WT[:, j : j + TW] = W[j : j + TW]^T (zeros past N), then runs TR x TS tiles over the
// whole batch, each output one sum over k in order, then + bias. A panel is K x TW floats of its own
// (WT + j K): rows a power of two apart in a padded K x ld array would share a sixteenth of L1's sets.
// Not in Bands of samples: every thread would then read every panel, half of them transposed on the
// other core after a barrier, which measures slower (docs/performance.md).
template <int R>
void tfwd_tile(int K, const float* A, int lda, const float* WT, int j, int N, const float* bias, bool relu,
               float* Z, int ldz) {
    vf acc[R][TS];
    for (auto& row : acc)
        for (auto& a : row) a = zero();
    for (int k = 0; k < K; k++) {
        vf wv[TS];
        for (int s = 0; s < TS; s++) wv[s] = load(WT + size_t(k) * TW + s * V);
        for (int r = 0; r < R; r++) {
            const vf a = bcast(A[size_t(r) * lda + k]);
            for (int s = 0; s < TS; s++) acc[r][s] = fma(a, wv[s], acc[r][s]);
        }
    }
    for (int s = 0; s < TS; s++) {
        const int col = j + s * V;  // < the padded row length: whole vectors, zeros past N
        const vf b = loadn(bias + col, N - col);
        for (int r = 0; r < R; r++) {
            const vf z = add(acc[r][s], b);
            store(Z + size_t(r) * ldz + col, relu ? simd::relu(z) : z);
        }
    }
}

void tfwd_rows(int mr, int K, const float* A, int lda, const float* WT, int j, int N, const float* bias, bool relu,
               float* Z, int ldz) {
    switch (mr) {
        case 6: tfwd_tile<6>(K, A, lda, WT, j, N, bias, relu, Z, ldz); break;
        case 5: tfwd_tile<5>(K, A, lda, WT, j, N, bias, relu, Z, ldz); break;
        case 4: tfwd_tile<4>(K, A, lda, WT, j, N, bias, relu, Z, ldz); break;
        case 3: tfwd_tile<3>(K, A, lda, WT, j, N, bias, relu, Z, ldz); break;
        case 2: tfwd_tile<2>(K, A, lda, WT, j, N, bias, relu, Z, ldz); break;
        default: tfwd_tile<1>(K, A, lda, WT, j, N, bias, relu, Z, ldz); break;
    }
}

// P (K x TW) = W[j : j + TW]^T, W (N x K) as stored; zeros in the columns past N. V x V blocks, each
// loaded as V rows of W (zeros past N, masked past K), transposed in registers and stored as V rows of P.
void transpose_panel(const float* W, int N, int K, int j, float* P) {
    for (int ob = 0; ob < TW; ob += V)
        for (int k0 = 0; k0 < K; k0 += V) {
            const int kn = std::min(V, K - k0);
            vf r[V];
            for (int i = 0; i < V; i++) {
                const int o = j + ob + i;
                r[i] = o < N ? ld(W + size_t(o) * K + k0, kn) : zero();
            }
            transpose(r);
            for (int i = 0; i < kn; i++) store(P + size_t(k0 + i) * TW + ob, r[i]);
        }
}

void forward_t(int nb, int N, int K, const float* A, int lda, const float* W, const float* bias, bool relu, float* Z,
               int ldz, float* WT) {
#pragma omp for schedule(static)
    for (int j = 0; j < ldz; j += TW) {
        float* P = WT + size_t(j) * K;
        transpose_panel(W, N, K, j, P);
        for (int i = 0; i < nb; i += TR)
            tfwd_rows(std::min(TR, nb - i), K, A + size_t(i) * lda, lda, P, j, N, bias, relu, Z + size_t(i) * ldz,
                      ldz);
    }
}

// The pixels lit in either of two samples a and b (n0 floats each; b may be null: zeros) in pixel
// order: cols[:cnt], and each sample's values there, va[:cnt] and vb[:cnt] (one of them may be 0).
// Blocks of V zero pixels cost one compare; the others are appended branch-free (a zero is written,
// then overwritten). cols, va and vb need n0 + V slots.
int lit_pair(const float* a, const float* b, int n0, int32_t* cols, float* va, float* vb) {
    int c = 0;
    for (int k = 0; k < n0; k += V) {
        const int n = n0 - k;
        const vf x = ld(a + k, n), z = b ? ld(b + k, n) : zero();
        const unsigned m = nonzero_lanes(x) | nonzero_lanes(z);
        if (!m) continue;
#if defined(__AVX512F__)
        const __m512i ix = _mm512_add_epi32(_mm512_set1_epi32(k),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        _mm512_storeu_ps(va + c, _mm512_maskz_compress_ps(__mmask16(m), x));
        _mm512_storeu_ps(vb + c, _mm512_maskz_compress_ps(__mmask16(m), z));
        _mm512_storeu_si512(cols + c, _mm512_maskz_compress_epi32(__mmask16(m), ix));
        c += __builtin_popcount(m);
#else
        for (int q = 0; q < std::min(n, V); q++) {
            const float xa = a[k + q], xb = b ? b[k + q] : 0.0f;
            cols[c] = k + q;
            va[c] = xa;
            vb[c] = xb;
            c += xa != 0.0f || xb != 0.0f;
        }
#endif
    }
    return c;
}

// Two samples' first-layer outputs oa[c0 .. c0 + NV*V) and ob[..] (ob may be null) from their pair's
// lit pixels: each row of WT is loaded once for both (loading WT is what bounds this loop), and the
// sample that does not light a pixel adds an exact zero (its sums keep their bits: they start at +0,
// and a sum plus a zero of either sign is the sum).
template <int NV>
void sparse_pair_chunk(int cnt, const int32_t* cols, const float* va, const float* vb, const float* WT, int ldT,
                       int c0, const float* bias, int n1, bool relu, float* oa, float* ob) {
    vf acc[NV], bcc[NV];
    for (int q = 0; q < NV; q++) acc[q] = bcc[q] = zero();
    for (int e = 0; e < cnt; e++) {
        const float* row = WT + size_t(cols[e]) * ldT + c0;
        const vf x = bcast(va[e]), z = bcast(vb[e]);
        for (int q = 0; q < NV; q++) {
            vf w = load(row + q * V);
            pin(w);  // one load for both FMAs (GCC would fold it into each, doubling the loads that bound this loop)
            acc[q] = fma(x, w, acc[q]);
            bcc[q] = fma(z, w, bcc[q]);
        }
    }
    for (int q = 0; q < NV; q++) {
        const int col = c0 + q * V;
        const vf bq = loadn(bias + col, n1 - col);  // zeros past n1: the padding stays 0
        const vf za = add(acc[q], bq), zb = add(bcc[q], bq);
        store(oa + col, relu ? simd::relu(za) : za);
        if (ob) store(ob + col, relu ? simd::relu(zb) : zb);
    }
}

// For the blocks 2h and 2h + 1 (pixels 6h .. 6h + 2 and 6h + 3 .. 6h + 5) the samples that light
// each, in sample order: ia[:cnt[0]] and ib[:cnt[1]] (a block past n0 lights in none). One masked
// load and compare per sample gives both blocks' lit pixels as bits (NaN counts as lit), with 8-lane
// AVX2 instructions also where AVX-512 is there (its 16-lane load, compare and mask move made this loop
// a quarter slower). Each sample is written to both lists and kept in each only if it lights that
// block: no branch to mispredict at stroke edges. size_t counts: no sign extension at each store.
void lit_blocks(const float* X, int n0, int nb, int h, int32_t* ia, int32_t* ib, int32_t* cnt) {
    const int k = h * 2 * TB, n = std::min(2 * TB, n0 - k);
#if defined(__AVX2__)
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#endif
    size_t ca = 0, cb = 0;
    for (int b = 0; b < nb; b++) {
        const float* x = X + size_t(b) * n0 + k;
#if defined(__AVX2__)
        const __m256 v = _mm256_maskload_ps(x, m);
        const unsigned bits = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ)));
#else
        unsigned bits = 0;
        for (int q = 0; q < n; q++) bits |= unsigned(x[q] != 0.0f) << q;
#endif
        ia[ca] = b;
        ib[cb] = b;
        ca += (bits & ((1u << TB) - 1)) != 0;
        cb += (bits >> TB) != 0;
    }
    cnt[0] = int(ca);
    cnt[1] = int(cb);
}

// ---------------------------------------------------------------- backward

// D[r, k0 ..] = (dZ[r] W)[k0 ..] where A[r] > 0, for R samples and one column block of TW.
// In the last block (EDGE) a row of W ends inside the tile; the mask A > 0 zeroes the lanes past it
// (A's padding is 0), whatever they read. If the tile overhangs a row by at most a row (k0 + TW <= 2K:
// a layer at least half a tile wide, as 250 is at every width), a row's whole-vector loads end inside
// the next row, so they stay inside W for every row but the last, which alone takes masked loads. A
// narrower layer's loads would run past W's end from its last rows, so there every row takes masked
// loads. Either way every read is inside W.
template <int R, bool EDGE>
void input_tile(int N, const float* dZ, int ldz, const float* W, int K, int k0, const float* A, int lda, float* D,
                int ldd) {
    vf acc[R][TS];
    for (auto& row : acc)
        for (auto& a : row) a = zero();
    auto add_row = [&](int o, const vf* wv) {
        for (int r = 0; r < R; r++) {
            const vf d = bcast(dZ[size_t(r) * ldz + o]);
            for (int s = 0; s < TS; s++) acc[r][s] = fma(d, wv[s], acc[r][s]);
        }
    };
    const int whole = !EDGE ? N : k0 + TW <= 2 * K ? N - 1 : 0;  // rows read with whole vectors
    for (int o = 0; o < whole; o++) {
        const float* w = W + size_t(o) * K + k0;
        vf wv[TS];
        for (int s = 0; s < TS; s++) wv[s] = load(w + s * V);
        add_row(o, wv);
    }
    if (EDGE) {
        lmask m[TS];
        for (int s = 0; s < TS; s++) m[s] = mask_of(K - k0 - s * V);
        for (int o = whole; o < N; o++) {
            const float* w = W + size_t(o) * K + k0;
            vf wv[TS];
            for (int s = 0; s < TS; s++) wv[s] = loadm(w + s * V, m[s]);
            add_row(o, wv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < TS; s++) {
            const int col = k0 + s * V;  // < the padded row length: whole vectors, zeros past K
            store(D + size_t(r) * ldd + col, where_pos(acc[r][s], load(A + size_t(r) * lda + col)));
        }
}

template <bool EDGE>
void input_rows(int mr, int N, const float* dZ, int ldz, const float* W, int K, int k0, const float* A, int lda,
                float* D, int ldd) {
    switch (mr) {
        case 6: input_tile<6, EDGE>(N, dZ, ldz, W, K, k0, A, lda, D, ldd); break;
        case 5: input_tile<5, EDGE>(N, dZ, ldz, W, K, k0, A, lda, D, ldd); break;
        case 4: input_tile<4, EDGE>(N, dZ, ldz, W, K, k0, A, lda, D, ldd); break;
        case 3: input_tile<3, EDGE>(N, dZ, ldz, W, K, k0, A, lda, D, ldd); break;
        case 2: input_tile<2, EDGE>(N, dZ, ldz, W, K, k0, A, lda, D, ldd); break;
        default: input_tile<1, EDGE>(N, dZ, ldz, W, K, k0, A, lda, D, ldd); break;
    }
}

// D (nb x K, stride ldd = A's) = (dZ W) masked by A > 0: the gradient at the layer's input through
// the previous ReLU. Column blocks outermost: a run of tiles reads the same N x TW block of W, and
// each thread reads only its columns of W (in Bands of samples every thread reads all of W, which the
// weight step then writes: the two phases together measure slower, docs/performance.md).
// One TR x TW tile of input_grad at rows i, columns k0.
void input_task(int i, int k0, int nb, int N, int K, const float* dZ, int ldz, const float* W, const float* A, int lda,
                float* D) {
    const int mr = std::min(TR, nb - i);
    const float* dz = dZ + size_t(i) * ldz;
    const float* a = A + size_t(i) * lda;
    float* d = D + size_t(i) * lda;
    if (k0 + TW <= K) input_rows<false>(mr, N, dz, ldz, W, K, k0, a, lda, d, lda);
    else input_rows<true>(mr, N, dz, ldz, W, K, k0, a, lda, d, lda);
}

void input_grad(int nb, int N, int K, const float* dZ, int ldz, const float* W, const float* A, int lda, float* D) {
    const int mt = (nb + TR - 1) / TR, kt = (K + TW - 1) / TW;
#pragma omp for schedule(static)
    for (int t = 0; t < mt * kt; t++) input_task((t % mt) * TR, (t / mt) * TW, nb, N, K, dZ, ldz, W, A, lda, D);
}

// The optimiser step on rows o .. o + nr - 1, columns k0 .. of a (.. x K) parameter matrix P with
// its gradient tile g (S vectors a row) in registers; M, Vs its slots (or null).
template <int KIND, int S = TS>
void step_tile(const vf (*g)[S], int nr, int o, int k0, int K, float* P, float* M, float* Vs, const StepArgs& s) {
    for (int r = 0; r < nr; r++)
        for (int q = 0; q < S; q++) {
            const int n = K - k0 - q * V;
            if (n <= 0) break;
            const size_t off = size_t(o + r) * K + k0 + q * V;
            st(P + off, update_k<KIND>(s, ld(P + off, n), g[r][q], M ? M + off : nullptr, Vs ? Vs + off : nullptr, n, true), n);
        }
}

// The gradient of rows o .. o + TR - 1 of W (N x K) at columns k0 .. k0 + TW - 1, summed over the
// batch in sample order, then the optimiser step on that block of W. dZ has TR readable columns
// from o (the padding and the buffers' slack); rows past N are computed and dropped. EDGE: A's
// rows end inside the tile (an unpadded input batch), so its loads are masked.
template <bool EDGE, int KIND>
void weight_tile(int nb, const float* dZ, int ldz, int o, const float* A, int lda, int K, int k0, int N, float* W,
                 float* M, float* Vs, const StepArgs& s) {
    vf acc[TR][TS];
    for (auto& row : acc)
        for (auto& a : row) a = zero();
    lmask m[TS];
    for (int q = 0; q < TS; q++) m[q] = mask_of(K - k0 - q * V);
    for (int b = 0; b < nb; b++) {
        const float* a = A + size_t(b) * lda + k0;
        vf av[TS];
        for (int q = 0; q < TS; q++) av[q] = EDGE ? loadm(a + q * V, m[q]) : load(a + q * V);
        const float* d = dZ + size_t(b) * ldz + o;
        for (int r = 0; r < TR; r++) {
            const vf c = bcast(d[r]);
            for (int q = 0; q < TS; q++) acc[r][q] = fma(c, av[q], acc[r][q]);
        }
    }
    step_tile<KIND>(acc, std::min(TR, N - o), o, k0, K, W, M, Vs, s);
}

// dB[o0 .. o0 + V) = column sums of dZ in sample order, then the step on those biases.
void bias_step(int nb, const float* dZ, int ldz, int o0, int N, float* B, float* M, float* Vs, const StepArgs& s) {
    vf g = zero();
    for (int b = 0; b < nb; b++) g = add(g, load(dZ + size_t(b) * ldz + o0));
    const int n = N - o0;
    st(B + o0, update(s, ld(B + o0, n), g, M ? M + o0 : nullptr, Vs ? Vs + o0 : nullptr, n, false), n);
}

// Layer l's weight gradient and bias gradient with the optimiser step fused: the tiles of W, then
// the biases, each loop split evenly (a bias task is a fraction of a tile's work). The tiles go in
// Bands of W's rows (row blocks fastest inside a band, so a run of them reads the same TW columns of
// A from L1) when there are at least two row blocks per thread; a layer with fewer (the 10 outputs)
// keeps the column panels, which read only the part of A that the forward over W^T wrote on the
// same thread (banded, its step measures slower). nowait: the next phase (the input gradient of the
// layer below) touches nothing this one writes.
void weight_step(int nb, int N, int K, const float* dZ, int ldz, const float* A, int lda, float* W, float* B,
                 float* MW, float* VW, float* MB, float* VB, const StepArgs& s) {
    const bool padded = lda >= (K + TW - 1) / TW * TW;  // whole tiles of A are readable
    const int nt = (N + TR - 1) / TR, bt = (N + V - 1) / V;
    const Bands w(nt, (K + TW - 1) / TW, nt >= 2 * team());
#pragma omp for schedule(static) nowait
    for (int t = 0; t < w.tasks(); t++) {
        const auto [r, p] = w.at(t);
        const int o = r * TR, k0 = p * TW;
        auto tile = padded || k0 + TW <= K ? (s.kind == 0   ? weight_tile<false, 0>
                                    : s.kind == 1 ? weight_tile<false, 1>
                                                  : weight_tile<false, 2>)
                                 : (s.kind == 0   ? weight_tile<true, 0>
                                    : s.kind == 1 ? weight_tile<true, 1>
                                                  : weight_tile<true, 2>);
        tile(nb, dZ, ldz, o, A, lda, K, k0, N, W, MW, VW, s);
    }
#pragma omp for schedule(static) nowait
    for (int t = 0; t < bt; t++) bias_step(nb, dZ, ldz, t * V, N, B, MB, VB, s);
}

// The first layer's weight gradient on the sparse path: for pixel block kb, a TB x BW tile of dWT
// summed over the m samples idx[:m] that light it, then the step on WT. The pixels are broadcast from
// X (nb x n0) itself; the last block's pixels past n0 read X's last column instead, and their rows are
// not stored. A sample that lights the block but not a pixel of it adds an exact 0 to that pixel's
// sums, so they are those over the samples that light the pixel, for any block size.
template <int KIND>
void sparse_weight_tile(int m, const int32_t* idx, const float* X, int n0, const float* dZ, int ldz, int kb, int j,
                        float* WT, float* MT, float* VT, int ldT, const StepArgs& s) {
    const int k = kb * TB;
    int kq[TB];
    for (int r = 0; r < TB; r++) kq[r] = std::min(k + r, n0 - 1);
    // Momentum's and Adam's slots are read by this step alone, so they come from L3 or memory: the
    // tile's cache lines of them and of WT are asked for now and arrive while the tile sums (with
    // plain SGD, asking for WT's lines measured no faster at 16 lanes and slower at 8)
    if (KIND >= 1)
        for (int r = 0; r < std::min(TB, n0 - k); r++)
            for (int c = 0; c < BW; c += 16) {  // 16 floats a line
                const size_t off = size_t(k + r) * ldT + j + c;
                __builtin_prefetch(WT + off, 1);
                __builtin_prefetch(MT + off, 1);
                if (KIND == 2) __builtin_prefetch(VT + off, 1);
            }
    vf acc[TB][BS];
    for (auto& row : acc)
        for (auto& a : row) a = zero();
    for (int p = 0; p < m; p++) {
        const float* x = X + size_t(idx[p]) * n0;
        vf c[TB];
        for (int r = 0; r < TB; r++) c[r] = bcast(x[kq[r]]);
        const float* d = dZ + size_t(idx[p]) * ldz + j;
        for (int q = 0; q < BS; q++) {  // a vector of dZ at a time: 12 sums + 3 pixels + 1 fit AVX2 (4 at once spill)
            vf dv = load(d + q * V);
            pin(dv);
            for (int r = 0; r < TB; r++) acc[r][q] = fma(c[r], dv, acc[r][q]);
        }
    }
    step_tile<KIND, BS>(acc, std::min(TB, n0 - k), k, j, ldT, WT, MT, VT, s);
}

// ---------------------------------------------------------------- the step

void prepare(const Net& net, Work& w) {
    const int L = net.layers();
    if (int(w.H.size()) == L + 1) return;
    const size_t rows = size_t(w.cap) + TR;  // + slack: tiles read a few rows and columns past the data
    w.ld.assign(L + 1, 0);
    w.H.assign(L + 1, fbuf());
    w.G.assign(L, fbuf());
    for (int l = 1; l <= L; l++) {
        w.ld[l] = pad(int(net.sizes[l]));
        w.H[l].assign(rows * w.ld[l] + PAD, 0.0f);
        w.G[l - 1].assign(rows * w.ld[l] + PAD, 0.0f);
    }
    size_t ht = 0;  // forward_t's panels: the largest hidden layer after the first
    for (int l = 1; l + 1 < L; l++) ht = std::max(ht, net.sizes[l] * size_t(w.ld[l + 1]));
    w.HT.assign(ht, 0.0f);
    w.loss.assign(w.cap, 0.0);
    w.hit.assign(w.cap, 0);
}

// The sparse path's index lists, at its first use (dense inputs never need them).
void prepare_sparse(const Net& net, Work& w) {
    if (!w.cols.empty()) return;
    const int n0 = int(net.sizes[0]), nblk = 2 * ((n0 + 2 * TB - 1) / (2 * TB));  // listed in pairs
    w.cols.assign(size_t(w.cap) * (n0 + V), 0);
    w.vals.assign(size_t(w.cap + 1) * (n0 + V), 0.0f);  // two rows per pair of samples
    w.cnt.assign((w.cap + 1) / 2, 0);
    w.bcnt.assign(nblk, 0);
    w.bidx.assign(size_t(nblk) * w.cap, 0);
}

// W (n1 x n0) <-> WT (n0 x ldT, zeros in the padding).
void transpose_first(std::vector<float>& W, fbuf& WT, int n1, int n0, int ldT, bool to_t) {
    if (to_t) WT.assign(size_t(n0) * ldT, 0.0f);
    for (int o = 0; o < n1; o++)
        for (int k = 0; k < n0; k++) {
            float& t = WT[size_t(k) * ldT + o];
            float& x = W[size_t(o) * n0 + k];
            if (to_t) t = x;
            else x = t;
        }
}

void move_first(Net& net, Work& w, Optimizer& opt, bool to_t) {
    const int n0 = int(net.sizes[0]), n1 = int(net.sizes[1]), ldT = w.ld[1];
    transpose_first(net.W[0], w.WT, n1, n0, ldT, to_t);
    if (opt.kind >= 1) transpose_first(opt.slot0[0], w.MT, n1, n0, ldT, to_t);
    if (opt.kind == 2) transpose_first(opt.slot1[0], w.VT, n1, n0, ldT, to_t);
    w.transposed = net.w1_lent = opt.w1_lent = to_t;
}

// The share of non-zero values in the first rows of X: picks the first layer's path.
double density(const float* X, int rows, int n0) {
    long n = 0;
    for (size_t k = 0; k < size_t(rows) * n0; k++) n += X[k] != 0.0f;
    return double(n) / double(std::max<size_t>(size_t(rows) * n0, 1));
}

// Phase one of the sparse path: each pair of samples' lit pixels and their first-layer outputs, and
// each pixel block's lit samples (for the weight gradient, two blocks per task). The outputs go chunk
// by chunk of columns over a thread's pairs, so a chunk of WT (n0 x 128 floats with AVX-512) stays in
// L2 while they all read it, where a pair at a time would stream all of WT for each. No barrier before
// the chunks: static schedules over the same pairs give each thread the pairs it listed.
void sparse_first(const Net& net, Work& w, int nb, bool relu) {
    const int n0 = int(net.sizes[0]), n1 = int(net.sizes[1]), ldT = w.ld[1], nh = (n0 + 2 * TB - 1) / (2 * TB);
    const int np = (nb + 1) / 2;
    const float* X = w.A[0].data();
    const float* bias = net.B[0].data();
#pragma omp for schedule(static) nowait
    for (int t = 0; t < np; t++) {
        const int i = 2 * t;
        const float* a = X + size_t(i) * n0;
        const float* b = i + 1 < nb ? a + n0 : nullptr;  // a last odd sample is paired with zeros
        float* va = &w.vals[size_t(i) * (n0 + V)];
        w.cnt[t] = lit_pair(a, b, n0, &w.cols[size_t(t) * (n0 + V)], va, va + (n0 + V));
    }
    for (int c0 = 0; c0 < ldT; c0 += PU * V) {
#pragma omp for schedule(static) nowait
        for (int t = 0; t < np; t++) {
            const int i = 2 * t;
            const int32_t* cols = &w.cols[size_t(t) * (n0 + V)];
            const float* va = &w.vals[size_t(i) * (n0 + V)];
            float* oa = w.H[1].data() + size_t(i) * ldT;
            float* ob = i + 1 < nb ? oa + ldT : nullptr;
            if (ldT - c0 >= PU * V)
                sparse_pair_chunk<PU>(w.cnt[t], cols, va, va + (n0 + V), w.WT.data(), ldT, c0, bias, n1, relu, oa, ob);
            else
                sparse_pair_chunk<PAD / V>(w.cnt[t], cols, va, va + (n0 + V), w.WT.data(), ldT, c0, bias, n1, relu,
                                           oa, ob);
        }
    }
#pragma omp for schedule(static)
    for (int h = 0; h < nh; h++) {
        int32_t* ia = &w.bidx[size_t(2 * h) * w.cap];
        lit_blocks(X, n0, nb, h, ia, ia + w.cap, &w.bcnt[2 * h]);
    }
}

void sparse_first_step(Net& net, Work& w, Optimizer& opt, int nb, const StepArgs& s) {
    const int n0 = int(net.sizes[0]), n1 = int(net.sizes[1]), ldT = w.ld[1], nblk = (n0 + TB - 1) / TB;
    const int jt = ldT / BW, bt = (n1 + V - 1) / V;
    const bool idle = s.kind == 0 && s.wd == 0.0f;  // then a block no sample lit keeps its weights
    float* B = net.B[0].data();
    float* MB = opt.kind >= 1 ? opt.slot0[1].data() : nullptr;
    float* VB = opt.kind == 2 ? opt.slot1[1].data() : nullptr;
    float* MT = opt.kind >= 1 ? w.MT.data() : nullptr;
    float* VT = opt.kind == 2 ? w.VT.data() : nullptr;
    // blocks outermost: each thread works through its own part of the image
#pragma omp for schedule(static) nowait
    for (int t = 0; t < nblk * jt + bt; t++) {
        if (t >= nblk * jt) {
            bias_step(nb, w.G[0].data(), ldT, (t - nblk * jt) * V, n1, B, MB, VB, s);
            continue;
        }
        const int kb = t / jt, j = (t % jt) * BW, m = w.bcnt[kb];
        if (m == 0 && idle) continue;
        auto tile = s.kind == 0 ? sparse_weight_tile<0> : s.kind == 1 ? sparse_weight_tile<1> : sparse_weight_tile<2>;
        tile(m, &w.bidx[size_t(kb) * w.cap], w.A[0].data(), n0, w.G[0].data(), ldT, kb, j, w.WT.data(), MT, VT, ldT,
             s);
    }
}

float* slot(std::vector<std::vector<float>>& v, int i) { return v.empty() ? nullptr : v[i].data(); }

// Softmax cross-entropy of samples i .. i + mr - 1: their losses, hits and dZ_L.
void loss_rows(const Net& net, Work& w, const uint8_t* y, int i, int mr, double scale) {
    const int L = net.layers(), C = int(net.sizes[L]), ld = w.ld[L];
    for (int b = i; b < i + mr; b++) {
        int arg;
        w.loss[b] = xent_row(w.H[L].data() + size_t(b) * ld, C, y[b], scale, w.G[L - 1].data() + size_t(b) * ld, &arg);
        w.hit[b] = arg == y[b];
    }
}

// The last layer, the loss and the gradient at the last layer's input, TR samples per task: a
// sample needs only its own row at each stage, so the three stages share one parallel loop.
void last_layer(const Net& net, Work& w, const uint8_t* y, int nb, double scale) {
    const int L = net.layers(), N = int(net.sizes[L]), K = int(net.sizes[L - 1]);
    const float* A = w.H[L - 1].data();
#pragma omp for schedule(static)
    for (int i = 0; i < nb; i += TR) {
        for (int j = 0; j < N; j += TS)
            dot_task(i, j, nb, N, K, A, w.ld[L - 1], net.W[L - 1].data(), net.B[L - 1].data(), false, w.H[L].data(),
                     w.ld[L]);
        loss_rows(net, w, y, i, std::min(TR, nb - i), scale);
        for (int k0 = 0; k0 < K; k0 += TW)
            input_task(i, k0, nb, N, K, w.G[L - 1].data(), w.ld[L], net.W[L - 1].data(), A, w.ld[L - 1],
                       w.G[L - 2].data());
    }
}

}  // namespace

void sync(Net& net, Work& w, Optimizer& opt) {
    if (w.transposed) move_first(net, w, opt, false);
}

double train_step(Net& net, Work& w, Optimizer& opt, const uint8_t* y, int nb, bool mean, double lr, int* correct) {
    if (nb < 1 || nb > w.cap) throw NNError("internal error: a batch of " + std::to_string(nb) + " in a Work for " +
                                            std::to_string(w.cap));
    prepare(net, w);
    const int L = net.layers(), n0 = int(net.sizes[0]);
    const StepArgs s = opt.begin(lr);
    // MNIST-like batches (few lit pixels) take the sparse first layer; dense inputs the tiles
    const bool sparse = nb < TR || density(w.A[0].data(), std::min(nb, 8), n0) <= 0.4;
    if (sparse) prepare_sparse(net, w);
    if (sparse != w.transposed) move_first(net, w, opt, sparse);
    const double scale = mean ? 1.0 / nb : 1.0;
#pragma omp parallel
    {
        if (sparse) sparse_first(net, w, nb, L > 1);
        else
            forward_dense(nb, int(net.sizes[1]), n0, w.A[0].data(), n0, net.W[0].data(), net.B[0].data(), L > 1,
                          w.H[1].data(), w.ld[1]);
        for (int l = 1; l + 1 < L; l++) {
            const int N = int(net.sizes[l + 1]), K = int(net.sizes[l]);
            if (N >= TW)
                forward_t(nb, N, K, w.H[l].data(), w.ld[l], net.W[l].data(), net.B[l].data(), true,
                          w.H[l + 1].data(), w.ld[l + 1], w.HT.data());
            else
                forward_dense(nb, N, K, w.H[l].data(), w.ld[l], net.W[l].data(), net.B[l].data(), true,
                              w.H[l + 1].data(), w.ld[l + 1]);
        }
        if (L > 1) {
            last_layer(net, w, y, nb, scale);
        } else {
#pragma omp for schedule(static)
            for (int i = 0; i < nb; i += TR) loss_rows(net, w, y, i, std::min(TR, nb - i), scale);
        }
        for (int l = L - 1; l >= 0; l--) {
            const int N = int(net.sizes[l + 1]), K = int(net.sizes[l]);
            if (l > 0 && l < L - 1)  // reads the old W_l, so before its step (last_layer did l = L - 1)
                input_grad(nb, N, K, w.G[l].data(), w.ld[l + 1], net.W[l].data(), w.H[l].data(), w.ld[l],
                           w.G[l - 1].data());
            if (l == 0 && sparse) sparse_first_step(net, w, opt, nb, s);
            else
                weight_step(nb, N, K, w.G[l].data(), w.ld[l + 1], l ? w.H[l].data() : w.A[0].data(),
                            l ? w.ld[l] : n0, net.W[l].data(), net.B[l].data(), slot(opt.slot0, 2 * l),
                            slot(opt.slot1, 2 * l), slot(opt.slot0, 2 * l + 1), slot(opt.slot1, 2 * l + 1), s);
        }
    }
    double loss = 0;
    int hits = 0;
    for (int b = 0; b < nb; b++) {  // in sample order: the same sum for any thread count
        loss += w.loss[b];
        hits += w.hit[b];
    }
    if (correct) *correct = hits;
    return loss;
}
