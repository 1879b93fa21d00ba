// The shared binary checkpoint format, version 1 (docs/checkpoint-format.md).
// Reader and writer are strict in the same ways as nn_numba.checkpoint.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// Optimizer state for resume (the OPTM section): kind 0 = sgd, 1 = momentum, 2 = adam.
// slots[s][p] is slot s (velocity, or m then v) for parameter p in file order W1 B1 W2 B2 ...
struct OptimState {
    uint32_t kind = 0;
    uint64_t step = 0;
    std::vector<std::vector<std::vector<float>>> slots;
};

struct Checkpoint {
    std::vector<uint32_t> sizes;          // n0 n1 ... nL
    std::vector<std::vector<float>> W;    // W[l] is n_{l+1} x n_l, row-major (out x in)
    std::vector<std::vector<float>> B;    // B[l] has n_{l+1} floats
    std::string meta;                     // META JSON text, "" when absent
    bool has_optim = false;
    OptimState optim;
};

constexpr uint32_t CK_VERSION = 1;

// Loads and validates PATH. If `expect` is non-empty the sizes must equal it.
// Throws NNError("PATH: what is wrong") on any problem; never reads past the buffer.
// Only a regular file is read: the header first, then at most its size as fstat gives it.
Checkpoint load_checkpoint(const std::string& path, const std::vector<uint32_t>& expect = {});
// Same checks on an in-memory file image (the tests use it for corrupt variants).
Checkpoint parse_checkpoint(const std::vector<uint8_t>& buf, const std::string& name,
                            const std::vector<uint32_t>& expect = {});

std::vector<uint8_t> serialize_checkpoint(const Checkpoint& ck);
// Atomic: NAME.tmp-PID in the same folder, fsync, rename over NAME, fsync the folder.
void save_checkpoint(const Checkpoint& ck, const std::string& path);
// The same for any bytes (run folders' text files): PATH is always either the old or the new content.
void write_file_atomic(const std::string& path, const uint8_t* data, size_t size);
// "784-250-250-10"
std::string sizes_str(const std::vector<uint32_t>& sizes);
