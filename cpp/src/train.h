// The training loop of docs/training.md and the synthetic-data benchmark.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct TrainConfig {
    std::string data_dir, out, init;
    int epochs = 10, batch = 128;
    double lr = 1e-3;
    std::string optimizer = "adam";  // sgd | momentum | adam
    double momentum = 0.9;
    bool nesterov = false;
    double weight_decay = 0.0;
    std::string reduction = "mean";   // sum | mean
    std::string schedule = "cosine";  // constant | cosine | step
    double warmup_epochs = 0.0, min_lr = 0.0, gamma = 0.1;
    int step_epochs = 10;
    double val_split = 0.1;
    uint64_t seed = 0;
    int threads = 0;  // 0 = OpenMP default
    std::vector<uint32_t> sizes = {784, 250, 250, 10};
    bool sizes_given = false;
    long limit = 0;  // 0 = all training images
    bool shuffle = true;
    bool quiet = false;
    bool force = false;  // overwrite an existing --out
};

// Trains and writes the best-on-validation checkpoint (the last one with --val-split 0)
// to cfg.out after every improving epoch. Returns the test accuracy of that checkpoint.
double train(const TrainConfig& cfg);

// --threads above this is refused (as in nn_numba's config); OpenMP cannot start 100,000 threads.
constexpr int MAX_THREADS = 1024;
// Sets the OpenMP thread count and returns it: 0 keeps the default (every core); more than the
// cores is clamped to them, with a note on stderr. NNError outside 0..MAX_THREADS.
int use_threads(int requested);

struct BenchResult {
    double seconds_per_epoch, samples_per_s;  // wall clock, fastest epoch
    double cpu_seconds_per_epoch;              // summed over threads, fastest epoch
    int threads;
};
// Times `epochs` training epochs (adam, mean) of the default net on 60,000 random samples.
BenchResult bench(int batch, int threads, int epochs, const std::vector<uint32_t>& sizes, const std::string& optimizer);
