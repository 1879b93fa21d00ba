// One exception type for every user-facing problem. main() prints
// "nn-cpp: error: " + what() on one line and exits with 1, so messages start
// with the file they are about and say what is wrong.
#pragma once
#include <stdexcept>
#include <string>

struct NNError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// "FILE: what is wrong"
inline NNError file_error(const std::string& path, const std::string& what) {
    return NNError(path + ": " + what);
}
