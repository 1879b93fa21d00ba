#!/usr/bin/env bash
# Build and test the C++ port optimised (cpp/build) and with address + undefined-behaviour sanitizers,
# so a reader that overreads a corrupt file or a kernel that reads past an array fails CI instead of
# passing: at this CPU's vector width with every test (cpp/build-asan), and at the portable 4 lanes with
# the tests of the width-dependent kernels (cpp/build-asan-portable); then fuzz the checkpoint and IDX
# readers with libFuzzer for a bounded time (cpp/build-fuzz).
# Needs cmake >= 3.16, a C++17 compiler, zlib, toml++ and nlohmann/json headers and clang with libFuzzer
# (Debian: apt-get install cmake g++ zlib1g-dev libtomlplusplus-dev nlohmann-json3-dev clang libclang-rt-dev).
set -euo pipefail
cd "$(dirname "$0")"
jobs="${NN_JOBS:-2}"

echo "== cpp: release build + ctest"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure)

san() { ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 "$@"; }

echo "== cpp: sanitizer build (-fsanitize=address,undefined) at this CPU's vector width + ctest"
# -march=native, as the release build: the kernels' tiles and loads follow the vector width (16 lanes
# with AVX-512, 8 with AVX2), and a load that stays inside an array at one width can pass its end at another
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DNN_SANITIZE=ON -DNN_NATIVE=ON >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && san ctest --output-on-failure)

echo "== cpp: sanitizer build at 4 portable lanes (NN_NATIVE=OFF) + the kernels' tests"
# simd.h's portable branch (4-lane tiles, element loops for the masked loads), as a build without AVX
# runs it: only the tests that run the width-dependent code (step.cpp, mlp.cpp, augment.cpp); the rest is
# checked above
cmake -S . -B build-asan-portable -DCMAKE_BUILD_TYPE=Debug -DNN_SANITIZE=ON -DNN_NATIVE=OFF >/dev/null
cmake --build build-asan-portable -j"$jobs" --target test_mlp test_augment nn-cpp
(cd build-asan-portable && san ctest --output-on-failure -R '^(test_mlp|step_ragged_widths|test_augment|cli_bench|cli_threads_clamped)$')

echo "== cpp: clang build at this CPU's vector width + the kernels' tests"
# the README builds with g++ or clang++: the width-dependent code and its tests compile with both
CXX=clang++ cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build-clang -j"$jobs" --target test_mlp test_augment
(cd build-clang && ctest --output-on-failure -R '^(test_mlp|step_ragged_widths|test_augment)$')

# libFuzzer on the checkpoint and IDX readers for a bounded time (fuzz/run.sh; NN_FUZZ_SECONDS=0 skips)
if [ "${NN_FUZZ_SECONDS:-30}" != 0 ]; then
    echo "== cpp: fuzz the checkpoint and IDX readers (libFuzzer + ASan/UBSan, ${NN_FUZZ_SECONDS:-30} s per target)"
    bash fuzz/run.sh
fi
