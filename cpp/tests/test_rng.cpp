// The shared random-number contract (docs/training.md) against values computed independently with
// Python's big integers (a dozen lines, in tests/test_cpp.py::counter_rng): bits, uniform, permutation,
// split, and the round-half-up rule of the warm-up and validation sizes.
#include <algorithm>
#include <numeric>

#include "check.h"
#include "rng.h"

int main() {
    CHECK(rng_bits(0, 1, 0, 0, 0) == 0x1a2a69903431e5b4ull);
    CHECK(rng_bits(12345, 3, 7, 1000, 41) == 0xb416cafe3421a17full);
    CHECK(rng_bits(9223372036854775807ull, 2, 99999, 59999, 0) == 0x1e504a9f249a0f46ull);
    CHECK(rng_uniform(0, 3, 0, 5, 2) == 0.2164955446331417);

    CHECK((rng_perm(10, 0, 1, 0) == std::vector<uint32_t>{4, 9, 1, 0, 8, 7, 6, 5, 2, 3}));
    CHECK((rng_perm(10, 42, 2, 3) == std::vector<uint32_t>{2, 4, 5, 6, 0, 9, 7, 1, 8, 3}));
    CHECK(rng_perm(0, 1, 2, 3).empty() && rng_perm(1, 1, 2, 3) == std::vector<uint32_t>{0});
    std::vector<uint32_t> p = rng_perm(60000, 5, 2, 1), sorted = p;
    std::sort(sorted.begin(), sorted.end());
    std::vector<uint32_t> iota(60000);
    std::iota(iota.begin(), iota.end(), 0u);
    CHECK(sorted == iota && p != iota);

    std::vector<uint32_t> tr, va;
    rng_split(100, 0.15, 7, &tr, &va);
    CHECK((va == std::vector<uint32_t>{1, 4, 11, 28, 32, 40, 41, 43, 44, 55, 57, 66, 75, 80, 85}));
    CHECK(tr.size() == 85 && std::is_sorted(tr.begin(), tr.end()));
    rng_split(60000, 0.1, 0, &tr, &va);
    CHECK(tr.size() == 54000 && va.size() == 6000);
    rng_split(10, 0.25, 0, &tr, &va);  // 2.5 rounds half up to 3 (Python's round() would give 2)
    CHECK(va.size() == 3);
    rng_split(10, 0.0, 0, &tr, &va);
    CHECK(va.empty() && tr.size() == 10);

    CHECK(round_half_up(0.5) == 1 && round_half_up(1.5) == 2 && round_half_up(2.5) == 3 && round_half_up(2.4999) == 2);
    CHECK(round_half_up(0.5 * 422) == 211 && round_half_up(0.5 * 423) == 212);
    return finish("test_rng");
}
