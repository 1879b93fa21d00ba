// The training loop of docs/training.md (the same recipe, run folders and resume as nn_numba/train.py)
// and the synthetic-data benchmark.
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

struct BenchResult {
    double seconds_per_epoch, samples_per_s;  // wall clock, fastest epoch
    double cpu_seconds_per_epoch;              // summed over threads, fastest epoch
    int threads;
};
// Times `epochs` training epochs (adam, mean) of the default net on 60,000 random samples.
BenchResult bench(int batch, int threads, int epochs, const std::vector<uint32_t>& sizes, const std::string& optimizer);
