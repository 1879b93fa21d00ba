#!/usr/bin/env bash
# Build and test the C++ port twice: optimised (cpp/build) and with address + undefined-behaviour
# sanitizers (cpp/build-asan), so a reader that overreads a corrupt file fails CI instead of passing;
# then fuzz the checkpoint and IDX readers with libFuzzer for a bounded time (cpp/build-fuzz).
# Needs cmake >= 3.16, a C++17 compiler, zlib, toml++ and nlohmann/json headers and clang with libFuzzer
# (Debian: apt-get install cmake g++ zlib1g-dev libtomlplusplus-dev nlohmann-json3-dev clang libclang-rt-dev).
set -euo pipefail
cd "$(dirname "$0")"
jobs="${NN_JOBS:-2}"

echo "== cpp: release build + ctest"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure)

echo "== cpp: sanitizer build (-fsanitize=address,undefined) + ctest"
# no -march=native here: the sanitizer build checks memory safety, not speed
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DNN_SANITIZE=ON -DNN_NATIVE=OFF >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --output-on-failure)

# libFuzzer on the checkpoint and IDX readers for a bounded time (fuzz/run.sh; NN_FUZZ_SECONDS=0 skips)
if [ "${NN_FUZZ_SECONDS:-30}" != 0 ]; then
    echo "== cpp: fuzz the checkpoint and IDX readers (libFuzzer + ASan/UBSan, ${NN_FUZZ_SECONDS:-30} s per target)"
    bash fuzz/run.sh
fi
