// The training loop of docs/training.md: the same recipe, run folders and resume as nn_numba/train.py.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config.h"
#include "error.h"

struct TrainOptions {
    std::string data_dir;  // --data-dir; empty: $NN_NUMBA_DATA, the config's data.dir, the per-user cache
    std::string resume;    // a run folder or its last.ck: continue that run
    std::string init;      // start from these weights instead of random ones (not with resume)
    long limit = 0;        // train on the first `limit` training images only (tests); 0 = all
    bool quiet = false;
};

// Ctrl-C: the run saved its state and stops; main exits with 130.
struct Interrupted : NNError {
    using NNError::NNError;
};

// Trains per `cfg` into a new run folder (or the resumed one), which it returns.
std::string train(const Config& cfg, const TrainOptions& opt);

// --threads above this is refused (as in nn_numba's config); OpenMP cannot start 100,000 threads.
constexpr int MAX_THREADS = 1024;
// Sets the OpenMP thread count and returns it: 0 keeps the default (every core); more than the
// cores is clamped to them, with a note on stderr. NNError outside 0..MAX_THREADS.
int use_threads(int requested);

// The OPTM code of an optimiser name: 0 sgd, 1 momentum, 2 adam; NNError for any other name.
int optimizer_kind(const std::string& name);
