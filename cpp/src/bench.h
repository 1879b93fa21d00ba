// `nn-cpp bench`: seconds per training epoch, on MNIST's training images or on random pixels.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct BenchConfig {
    int batch = 64, threads = 0, epochs = 2;  // threads 0: the OpenMP default
    std::vector<uint32_t> sizes = {784, 250, 250, 10};
    std::string optimizer = "adam";
    std::string data_dir;  // MNIST's folder; empty: 60,000 random images (every pixel non-zero)
};

struct BenchResult {
    double seconds_per_epoch, samples_per_s;  // wall clock, fastest epoch
    double cpu_seconds_per_epoch;              // summed over threads, fastest epoch
    double loss;                               // mean training loss of the last epoch
    int threads;
    uint32_t samples;
    std::string data;  // "mnist" or "random"
};

// Times cfg.epochs epochs of train_step (mean loss, a constant learning rate of 0.01, 0.001 for
// Adam) after an untimed warm-up of 6,000 samples.
BenchResult bench(const BenchConfig& cfg);
