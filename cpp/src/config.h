// The training config: the TOML tables and keys of nn_numba/config.py with the same defaults, ranges
// and messages, read with toml++. Anything unknown in a file is an error, so a typo never silently
// falls back to a default.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct Config {
    // [model]
    std::vector<int64_t> sizes = {784, 250, 250, 10};
    // [data]
    std::string data_dir;  // used after --data-dir and $NN_NUMBA_DATA; empty: the per-user cache
    double val_split = 0.1;
    bool shuffle = true;
    // [optim]
    std::string optim = "adam";  // sgd | momentum | adam
    double lr = 1e-3, momentum = 0.9;
    bool nesterov = false;
    double weight_decay = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    std::string reduction = "mean";  // mean | sum
    // [schedule]
    std::string schedule = "constant";  // constant | step | cosine
    double warmup_epochs = 0.0;
    int64_t step_epochs = 10;
    double gamma = 0.1, min_lr = 0.0;
    int64_t plan_epochs = 0;  // the epochs the schedule is laid out over; 0: [train] epochs (docs/training.md)
    // [augment]
    int64_t shift = 0;
    double rotate = 0.0, scale = 0.0, elastic_alpha = 0.0, elastic_sigma = 4.0;
    // [train]
    int64_t epochs = 10, batch_size = 64, seed = 0, threads = 0;
    std::string out = "runs";
};

// Reads and checks PATH; every problem is an NNError "PATH: ..." naming the key.
Config load_config(const std::string& path);
// The same from TOML text; `source` starts every message.
Config parse_config(const std::string& text, const std::string& source);
// Impossible values: an NNError "SOURCE: [table] key ...". Also used after command-line overrides.
void check_config(const Config& c, const std::string& source);
// Sets [table] key from command-line text (the value of a flag), typed like the key; unknown keys and
// unparsable values are NNErrors "command line: ...". check_config afterwards checks the ranges.
void set_config_key(Config& c, const std::string& table, const std::string& key, const std::string& text);
// The resolved config as TOML (as nn_numba's Config.to_toml) and as a JSON object (Config.to_dict).
std::string config_toml(const Config& c);
std::string config_json(const Config& c);
// Python's repr() of a float: the shortest text that reads back the same, "0.001", "4.0", "1e-08".
std::string py_float(double x);
