// The shared random-number contract of docs/training.md: every random choice of training except the
// initial weights is a pure function of (seed, stream, epoch, i, k), so both trainers see the same split,
// batches and distortions, and a resume needs only (epoch, batch), no generator state.
#pragma once
#include <cstdint>
#include <vector>

enum : uint64_t { STREAM_SPLIT = 1, STREAM_SHUFFLE = 2, STREAM_AUGMENT = 3 };

// SplitMix64's finaliser. Inline, as rng_item_bits and rng_draw: a caller's loop over many k of one item
// (the elastic nodes of augment.cpp) then vectorises.
inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// 64 random bits for draw k of item i of `epoch` in `stream`.
uint64_t rng_bits(uint64_t seed, uint64_t stream, uint64_t epoch, uint64_t i, uint64_t k);
// The same as a double in [0, 1): the top 53 bits times 2^-53.
double rng_uniform(uint64_t seed, uint64_t stream, uint64_t epoch, uint64_t i, uint64_t k);
// The part of the hash shared by all draws of item i (rng_bits without k), and draw k from it: for a
// caller that draws many k of one item.
uint64_t rng_item(uint64_t seed, uint64_t stream, uint64_t epoch, uint64_t i);
inline uint64_t rng_item_bits(uint64_t item, uint64_t k) { return mix64(item + 0x9E3779B97F4A7C15ull * (k + 1)); }
// exact: a 53-bit integer as a double, times a power of two
inline double rng_draw(uint64_t item, uint64_t k) { return double(rng_item_bits(item, k) >> 11) * 0x1.0p-53; }
// Fisher-Yates from the top: for i = n-1 .. 1 swap p[i] and p[floor(uniform(.., i, 0) * (i + 1))].
std::vector<uint32_t> rng_perm(uint32_t n, uint64_t seed, uint64_t stream, uint64_t epoch);
// Training and validation indices, each sorted: the last round-half-up(n * val_split) of perm(n, seed, 1, 0)
// are the validation set.
void rng_split(uint32_t n, double val_split, uint64_t seed, std::vector<uint32_t>* train, std::vector<uint32_t>* val);
// floor(x + 0.5) with no fused multiply-add: the warm-up step count and the validation size use it.
long round_half_up(double x);
