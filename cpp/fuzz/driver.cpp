// Runs a fuzz target without libFuzzer over files, or every file in folders: the normal and sanitizer
// builds run the seed corpus and every input a fuzzer found (fuzz/regressions/) under ctest.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

static void run(const std::filesystem::path& p, long* count) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(b.data()), b.size());
    ++*count;
}

int main(int argc, char** argv) {
    long count = 0;
    for (int i = 1; i < argc; i++) {
        std::filesystem::path p = argv[i];
        if (std::filesystem::is_directory(p)) {
            for (const auto& e : std::filesystem::directory_iterator(p))
                if (e.is_regular_file()) run(e.path(), &count);
        } else if (std::filesystem::is_regular_file(p)) {
            run(p, &count);
        } else {
            std::printf("%s: not there, skipped\n", argv[i]);
        }
    }
    std::printf("%s: %ld inputs, 0 crashes\n", argv[0], count);
    return count > 0 ? 0 : 1;
}
