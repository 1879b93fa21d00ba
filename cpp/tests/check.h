// A test framework in 40 lines: CHECK counts failures, main returns non-zero if any,
// expect_error runs a callable that must throw NNError containing a phrase.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>

#include "error.h"

static int g_failures = 0, g_checks = 0;

#define CHECK(cond)                                                               \
    do {                                                                          \
        g_checks++;                                                               \
        if (!(cond)) {                                                            \
            g_failures++;                                                         \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                         \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                      \
    do {                                                                                           \
        g_checks++;                                                                                \
        double a_ = (a), b_ = (b);                                                                 \
        if (!(std::abs(a_ - b_) <= (tol))) {                                                       \
            g_failures++;                                                                          \
            std::fprintf(stderr, "%s:%d: %s = %.9g vs %s = %.9g (tol %g)\n", __FILE__, __LINE__, #a, a_, \
                         #b, b_, double(tol));                                                     \
        }                                                                                          \
    } while (0)

// fn() must throw NNError whose message contains `phrase`.
template <class F>
void expect_error(const char* label, F fn, const std::string& phrase) {
    g_checks++;
    try {
        fn();
    } catch (const NNError& e) {
        if (std::string(e.what()).find(phrase) == std::string::npos) {
            g_failures++;
            std::fprintf(stderr, "%s: error '%s' does not mention '%s'\n", label, e.what(), phrase.c_str());
        }
        return;
    }
    g_failures++;
    std::fprintf(stderr, "%s: no error, expected one mentioning '%s'\n", label, phrase.c_str());
}

inline int finish(const char* name) {
    std::printf("%s: %d checks, %d failed\n", name, g_checks, g_failures);
    return g_failures == 0 && g_checks > 0 ? 0 : 1;
}
