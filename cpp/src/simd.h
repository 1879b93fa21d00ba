// One float vector type and the few operations the training kernels (step.cpp), the batch load (mlp.cpp)
// and the augmentation (augment.cpp) need.
//
// The width follows what the compiler targets: 16 lanes with AVX-512 (-march=native on a
// Zen 4 or a recent Xeon), 8 with AVX2 + FMA (Zen 3), and 4 lanes of plain GCC vectors in a
// portable build (NN_NATIVE=OFF: SSE2 on x86-64, whatever the target has elsewhere).
// loadn/storen touch only the first n lanes (n may be <= 0 or >= V): masked loads and stores
// with AVX-512/AVX2, element loops otherwise, so row tails never read past an array.
// gather2 reads two neighbouring floats at each lane's index (the augmentation's bilinear taps):
// gathers of 8-byte pairs with AVX-512/AVX2, element loads otherwise.
// Every reduction has a fixed order, so a kernel's result depends on the build, never on the run.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the unused source of their unmasked
// forms, which -Wuninitialized reports wherever they are inlined
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)  // a GCC-only warning: clang would warn that it does not know it
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace simd {

#if defined(__SANITIZE_ADDRESS__)  // GCC
#define NN_SIMD_ASAN 1
#elif defined(__has_feature)  // clang
#if __has_feature(address_sanitizer)
#define NN_SIMD_ASAN 1
#endif
#endif

// The floats at base[i] and base[i + 1] for each 32-bit index i of the integer vector ix, read one at a
// time as plain loads, in a build with AddressSanitizer only: it does not see the addresses a gather
// instruction reads, but it checks these (gather2 calls this first; the values are discarded).
template <class I>
inline void check_pairs(const float* base, I ix) {
#ifdef NN_SIMD_ASAN
    int32_t i[sizeof(I) / 4];
    std::memcpy(i, &ix, sizeof ix);
    for (int32_t k : i) {
        volatile float t = base[k];
        t = base[k + 1];
        (void)t;
    }
#else
    (void)base, (void)ix;
#endif
}

#if defined(__AVX512F__)

constexpr int V = 16;
typedef __m512 vf;
inline __mmask16 lanes(int n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
typedef __mmask16 lmask;  // the first n lanes, made once for many loads (loadm)
inline lmask mask_of(int n) { return lanes(n); }
inline vf loadm(const float* p, lmask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void storen(float* p, vf x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
inline vf bcast(float x) { return _mm512_set1_ps(x); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf sqrt(vf a) { return _mm512_sqrt_ps(a); }
inline vf relu(vf a) { return _mm512_max_ps(a, zero()); }
// x where a > 0, else 0: the ReLU's derivative applied to a gradient
inline vf where_pos(vf x, vf a) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, zero(), _CMP_GT_OQ), x); }
inline unsigned nonzero_lanes(vf x) { return _mm512_cmp_ps_mask(x, zero(), _CMP_NEQ_UQ); }
inline vf iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline vf clamp(vf x, vf lo, vf hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, x)); }
inline vf trunc(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
// a[l] = base[q[l]] and b[l] = base[q[l] + 1] (q: integers as floats, exact): the pairs as 8-byte elements by
// two gathers of 8 (the indices reordered by 64-bit pairs first: lanes 0 1 4 5 8 9 12 13 to the first gather,
// 2 3 6 7 .. to the second), split by two in-lane shuffles. Unchecked: callers keep every q + 1 inside the array.
inline void gather2(const float* base, vf q, vf& a, vf& b) {
    const __m512i i = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), _mm512_cvttps_epi32(q));
    check_pairs(base, i);
    const vf lo = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_castsi512_si256(i), base, 4));
    const vf hi = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_extracti64x4_epi64(i, 1), base, 4));
    a = _mm512_shuffle_ps(lo, hi, 0x88), b = _mm512_shuffle_ps(lo, hi, 0xDD);
}
inline unsigned inside(vf x, vf lo, vf hi) {
    return _mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, hi, _CMP_LT_OQ);
}
// r[0..15] transposed in registers: four rounds of two-source permutes, each swapping blocks of b lanes
// between rows b apart (b = 8, 4, 2, 1).
template <int b>
inline void transpose_round(vf* r) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 upper = __mmask16(b == 8 ? 0xFF00 : b == 4 ? 0xF0F0 : b == 2 ? 0xCCCC : 0xAAAA);  // (l & b) != 0
    // lo[l] = l, or 16 + l - b in the upper lanes; hi[l] = l + b, or 16 + l in the upper lanes
    const __m512i lo = _mm512_mask_add_epi32(lane, upper, lane, _mm512_set1_epi32(16 - b));
    const __m512i hi = _mm512_mask_add_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(b)), upper, lane, _mm512_set1_epi32(16));
    for (int i = 0; i < 16; i++)
        if ((i & b) == 0) {
            const vf a = r[i], c = r[i + b];
            r[i] = _mm512_permutex2var_ps(a, lo, c);
            r[i + b] = _mm512_permutex2var_ps(a, hi, c);
        }
}
inline void transpose(vf* r) {
    transpose_round<8>(r);
    transpose_round<4>(r);
    transpose_round<2>(r);
    transpose_round<1>(r);
}
inline __m256 half_sum(vf x) {  // the low plus the high 8 lanes
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_castps512_ps256(_mm512_shuffle_f32x4(x, x, 0xEE)));
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int V = 8;
typedef __m256 vf;
inline __m256i lanes(int n) {
    alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    n = n < 0 ? 0 : n > 8 ? 8 : n;
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}
inline vf zero() { return _mm256_setzero_ps(); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf loadn(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
typedef __m256i lmask;
inline lmask mask_of(int n) { return lanes(n); }
inline vf loadm(const float* p, lmask m) { return _mm256_maskload_ps(p, m); }
inline void storen(float* p, vf x, int n) { _mm256_maskstore_ps(p, lanes(n), x); }
inline vf bcast(float x) { return _mm256_set1_ps(x); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf sqrt(vf a) { return _mm256_sqrt_ps(a); }
inline vf relu(vf a) { return _mm256_max_ps(a, zero()); }
inline vf where_pos(vf x, vf a) { return _mm256_and_ps(x, _mm256_cmp_ps(a, zero(), _CMP_GT_OQ)); }
inline unsigned nonzero_lanes(vf x) { return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(x, zero(), _CMP_NEQ_UQ))); }
inline vf iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
inline vf clamp(vf x, vf lo, vf hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, x)); }
inline vf trunc(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
// a[l] = base[q[l]] and b[l] = base[q[l] + 1] (q: integers as floats, exact): the pairs as 8-byte elements by
// two gathers of 4 (lanes 0 1 4 5 to the first, 2 3 6 7 to the second), split by two in-lane shuffles.
// Unchecked: callers keep every q + 1 inside the array.
inline void gather2(const float* base, vf q, vf& a, vf& b) {
    const __m256i i = _mm256_permute4x64_epi64(_mm256_cvttps_epi32(q), 0xD8);
    check_pairs(base, i);
    const long long* p = reinterpret_cast<const long long*>(base);
    const vf lo = _mm256_castsi256_ps(_mm256_i32gather_epi64(p, _mm256_castsi256_si128(i), 4));
    const vf hi = _mm256_castsi256_ps(_mm256_i32gather_epi64(p, _mm256_extracti128_si256(i, 1), 4));
    a = _mm256_shuffle_ps(lo, hi, 0x88), b = _mm256_shuffle_ps(lo, hi, 0xDD);
}
inline unsigned inside(vf x, vf lo, vf hi) {
    return unsigned(_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GT_OQ), _mm256_cmp_ps(x, hi, _CMP_LT_OQ))));
}
// r[0..7] transposed in registers: pairs interleaved, then quads, then the 128-bit halves swapped.
inline void transpose(vf* r) {
    vf t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++)
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}
inline __m256 half_sum(vf x) { return x; }

#else

constexpr int V = 4;
typedef float vf __attribute__((vector_size(16)));
inline vf zero() { return vf{0, 0, 0, 0}; }
inline vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vf loadn(const float* p, int n) {
    vf v = zero();
    for (int q = 0; q < n && q < V; q++) v[q] = p[q];
    return v;
}
inline void storen(float* p, vf x, int n) {
    for (int q = 0; q < n && q < V; q++) p[q] = x[q];
}
typedef int lmask;
inline lmask mask_of(int n) { return n; }
inline vf loadm(const float* p, lmask n) { return loadn(p, n); }
inline vf bcast(float x) { return vf{x, x, x, x}; }
inline vf fma(vf a, vf b, vf c) { return a * b + c; }
inline vf add(vf a, vf b) { return a + b; }
inline vf sub(vf a, vf b) { return a - b; }
inline vf mul(vf a, vf b) { return a * b; }
inline vf div(vf a, vf b) { return a / b; }
inline vf sqrt(vf a) {
    for (int q = 0; q < V; q++) a[q] = std::sqrt(a[q]);
    return a;
}
inline vf relu(vf a) {
    for (int q = 0; q < V; q++) a[q] = a[q] > 0.0f ? a[q] : 0.0f;
    return a;
}
inline vf where_pos(vf x, vf a) {
    for (int q = 0; q < V; q++) x[q] = a[q] > 0.0f ? x[q] : 0.0f;
    return x;
}
inline unsigned nonzero_lanes(vf x) {
    unsigned m = 0;
    for (int q = 0; q < V; q++) m |= unsigned(x[q] != 0.0f) << q;
    return m;
}
inline vf iota() { return vf{0, 1, 2, 3}; }
inline vf clamp(vf x, vf lo, vf hi) {
    for (int q = 0; q < V; q++) x[q] = std::min(std::max(x[q], lo[q]), hi[q]);
    return x;
}
inline vf trunc(vf x) {
    for (int q = 0; q < V; q++) x[q] = std::trunc(x[q]);
    return x;
}
// a[l] = base[q[l]] and b[l] = base[q[l] + 1] (q: integers as floats, exact), element by element
inline void gather2(const float* base, vf q, vf& a, vf& b) {
    vf x = zero(), y = zero();
    for (int l = 0; l < V; l++) {
        const float* p = base + int(q[l]);
        x[l] = p[0], y[l] = p[1];
    }
    a = x, b = y;
}
inline unsigned inside(vf x, vf lo, vf hi) {
    unsigned m = 0;
    for (int q = 0; q < V; q++) m |= unsigned(x[q] > lo[q] && x[q] < hi[q]) << q;
    return m;
}
inline void transpose(vf* r) {  // r[0..3]
    for (int i = 0; i < V; i++)
        for (int q = i + 1; q < V; q++) {
            const float t = r[i][q];  // vector elements are not lvalues std::swap can take (clang)
            r[i][q] = r[q][i];
            r[q][i] = t;
        }
}

#endif

// Pins x to a register: the compiler then loads a vector once for all its uses instead of
// folding a fresh load into each FMA (which makes a tile load-bound).
inline void pin(vf& x) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    asm("" : "+v"(x));
#else
    (void)x;
#endif
}

inline vf ld(const float* p, int n) { return n >= V ? load(p) : loadn(p, n); }
inline void st(float* p, vf x, int n) {
    if (n >= V) store(p, x);
    else storen(p, x, n);
}

// The bits of the first n lanes (0 <= n), to mask what nonzero_lanes or inside return.
inline unsigned first_lanes(int n) { return n >= 32 ? ~0u : (1u << n) - 1u; }

// V bytes from p as floats (0 .. 255).
inline vf bytes(const uint8_t* p) {
#if defined(__AVX512F__)
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__) && defined(__FMA__)
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    return vf{float(p[0]), float(p[1]), float(p[2]), float(p[3])};
#endif
}

// The sum of the lanes of each of a[0..3] into out[0..3]: one shuffle tree for all four.
inline void sum4(const vf* a, float* out) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    __m256 h01 = _mm256_hadd_ps(half_sum(a[0]), half_sum(a[1]));
    __m256 h23 = _mm256_hadd_ps(half_sum(a[2]), half_sum(a[3]));
    __m256 h = _mm256_hadd_ps(h01, h23);  // [s0 s1 s2 s3] of the low and of the high 128 bits
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
    for (int i = 0; i < 4; i++) out[i] = (a[i][0] + a[i][2]) + (a[i][1] + a[i][3]);
#endif
}

inline float sum(vf x) {
    vf a[4] = {x, zero(), zero(), zero()};
    float out[4];
    sum4(a, out);
    return out[0];
}

}  // namespace simd
