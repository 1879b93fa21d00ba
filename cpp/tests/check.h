// A test framework in 40 lines: CHECK counts failures, main returns non-zero if any,
// expect_error runs a callable that must throw NNError containing a phrase.
#pragma once
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "error.h"

#if defined(__SANITIZE_ADDRESS__)
#define NN_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NN_ASAN 1
#endif
#endif

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

// A field of /proc/self/status in kB (VmRSS, VmHWM), 0 if absent.
inline long status_kb(const char* key) {
    FILE* f = std::fopen("/proc/self/status", "r");
    char line[256];
    long v = 0;
    while (f && std::fgets(line, sizeof line, f))
        if (std::strncmp(line, key, std::strlen(key)) == 0) v = std::atol(line + std::strlen(key) + 1);
    if (f) std::fclose(f);
    return v;
}

// fn() runs in a forked child with an alarm of `seconds`: it must throw NNError containing `phrase`,
// in time, growing the child's resident memory by at most max_mb (its peak, reset at the start,
// minus what it held then). This is how the tests see that a reader refused a hostile file early
// instead of reading, blocking on or allocating for what it claims.
template <class F>
void expect_bounded(const char* label, F fn, const std::string& phrase, long max_mb, unsigned seconds = 20) {
    g_checks++;
    std::fflush(nullptr);
    int fds[2];
    if (pipe(fds) != 0) std::abort();
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        alarm(seconds);
#ifndef NN_ASAN  // ASan reserves terabytes of address space: no address-space limit there
        // a reader that does grow without bound gets bad_alloc at 1 GB more, not the whole machine
        struct rlimit lim = {rlim_t(max_mb + 1024) << 20, rlim_t(max_mb + 1024) << 20};
        setrlimit(RLIMIT_AS, &lim);
#endif
        if (FILE* f = std::fopen("/proc/self/clear_refs", "w")) {  // "5": reset the peak (VmHWM)
            std::fputs("5", f);
            std::fclose(f);
        }
        const long base_kb = status_kb("VmRSS:");
        int code = 3;
        std::string m;
        try {
            fn();
        } catch (const NNError& e) {
            code = 0;
            m = e.what();
        } catch (const std::exception& e) {
            code = 5;
            m = std::string("not an NNError: ") + e.what();
        }
        m = std::to_string((status_kb("VmHWM:") - base_kb) / 1024) + "\n" + m;
        if (write(fds[1], m.data(), m.size()) < 0) code = 4;
        _exit(code);
    }
    close(fds[1]);
    std::string msg;
    char buf[512];
    for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) msg.append(buf, size_t(n));
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const long grew_mb = std::atol(msg.c_str());
    msg = msg.substr(std::min(msg.size(), msg.find('\n') + 1));
    std::string why;
    if (WIFSIGNALED(status))
        why = WTERMSIG(status) == SIGALRM ? "did not finish in " + std::to_string(seconds) + " s"
                                          : "killed by signal " + std::to_string(WTERMSIG(status));
    else if (WEXITSTATUS(status) == 3)
        why = "no error";
    else if (WEXITSTATUS(status) != 0 || msg.find(phrase) == std::string::npos)
        why = "error '" + msg + "'";
    else if (grew_mb > max_mb)
        why = "memory grew by " + std::to_string(grew_mb) + " MB > " + std::to_string(max_mb) + " MB";
    if (!why.empty()) {
        g_failures++;
        std::fprintf(stderr, "%s: %s, expected an error mentioning '%s'\n", label, why.c_str(), phrase.c_str());
    }
}

inline int finish(const char* name) {
    std::printf("%s: %d checks, %d failed\n", name, g_checks, g_failures);
    return g_failures == 0 && g_checks > 0 ? 0 : 1;
}
