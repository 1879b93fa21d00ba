// Compiled with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would round differently from
// the Python side in the few products here.
#include "rng.h"

#include <algorithm>
#include <cmath>

uint64_t rng_item(uint64_t seed, uint64_t stream, uint64_t epoch, uint64_t i) {
    uint64_t a = mix64(seed);
    a = mix64(a ^ stream);
    a = mix64(a + epoch);
    return mix64(a + i);
}

uint64_t rng_bits(uint64_t seed, uint64_t stream, uint64_t epoch, uint64_t i, uint64_t k) {
    return rng_item_bits(rng_item(seed, stream, epoch, i), k);
}

double rng_uniform(uint64_t seed, uint64_t stream, uint64_t epoch, uint64_t i, uint64_t k) {
    return rng_draw(rng_item(seed, stream, epoch, i), k);
}

std::vector<uint32_t> rng_perm(uint32_t n, uint64_t seed, uint64_t stream, uint64_t epoch) {
    std::vector<uint32_t> p(n);
    for (uint32_t i = 0; i < n; i++) p[i] = i;
    for (uint32_t i = n > 0 ? n - 1 : 0; i >= 1; i--) {
        auto j = uint32_t(std::floor(rng_uniform(seed, stream, epoch, i, 0) * double(i + 1)));
        std::swap(p[i], p[j]);
    }
    return p;
}

long round_half_up(double x) { return long(std::floor(x + 0.5)); }

void rng_split(uint32_t n, double val_split, uint64_t seed, std::vector<uint32_t>* train, std::vector<uint32_t>* val) {
    std::vector<uint32_t> p = rng_perm(n, seed, STREAM_SPLIT, 0);
    const auto n_val = uint32_t(std::min<long>(round_half_up(double(n) * val_split), long(n)));
    train->assign(p.begin(), p.end() - n_val);
    val->assign(p.end() - n_val, p.end());
    std::sort(train->begin(), train->end());
    std::sort(val->begin(), val->end());
}
