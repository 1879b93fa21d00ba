#!/usr/bin/env bash
# Fuzz the checkpoint and IDX readers with libFuzzer under ASan + UBSan, NN_FUZZ_SECONDS (default 30)
# per target, from the seed corpus that make_seeds writes. Needs clang and its libFuzzer runtime
# (Debian: apt-get install clang libclang-rt-dev).
# A crash, leak, timeout or allocation over 64 MB fails, and its input is left in
# cpp/build-fuzz/artifacts/: fix the bug, then copy the input into cpp/fuzz/regressions/TARGET/ so
# ctest (fuzz_TARGET, normal and sanitizer builds) runs it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${NN_FUZZ_SECONDS:-30}"
jobs="${NN_JOBS:-2}"
targets=(fuzz_checkpoint fuzz_idx fuzz_idx_gz)

CXX=clang++ cmake -S . -B build-fuzz -DNN_FUZZ=ON -DCMAKE_BUILD_TYPE=Debug -DNN_NATIVE=OFF -DNN_OPENMP=OFF >/dev/null
cmake --build build-fuzz -j"$jobs" --target make_seeds "${targets[@]}" >/dev/null
rm -rf build-fuzz/corpus build-fuzz/artifacts
mkdir -p build-fuzz/artifacts
build-fuzz/make_seeds build-fuzz/corpus ../tests/data/tiny.ck

status=0
for t in "${targets[@]}"; do
    dirs=(build-fuzz/corpus/"$t")  # new inputs go into the first folder: the build's copy
    [ -d fuzz/regressions/"$t" ] && dirs+=(fuzz/regressions/"$t")
    log=build-fuzz/"$t".log
    if ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 build-fuzz/"$t" \
        -max_total_time="$secs" -max_len=8192 -timeout=10 -malloc_limit_mb=64 -rss_limit_mb=1024 \
        -print_final_stats=1 -artifact_prefix=build-fuzz/artifacts/"$t"- "${dirs[@]}" >"$log" 2>&1; then
        echo "$t: $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$') inputs in ${secs} s, no crash"
    else
        status=1
        echo "$t: FAILED (input in cpp/build-fuzz/artifacts/); end of $log:"
        tail -n 40 "$log"
    fi
done
exit $status
