// Opening files whose kind or content may be hostile. Only regular files are read, sized by fstat
// before the first byte, so /dev/zero, a FIFO or a header that lies cannot make a reader block or
// allocate beyond the file's real size.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

struct InFile {
    // `what` names what a file is expected to be, for the error: "a checkpoint file".
    InFile(const std::string& path, const std::string& what);
    ~InFile();
    InFile(const InFile&) = delete;
    InFile& operator=(const InFile&) = delete;
    // Up to n bytes from the current position, never past `size`; fewer only at the end.
    size_t read(uint8_t* dst, size_t n);
    // Up to n bytes from the start of the file, without moving the position.
    size_t peek(uint8_t* dst, size_t n);
    // Exactly n bytes, else NNError "PATH: changed while being read".
    void read_exact(uint8_t* dst, size_t n);

    std::string path;
    uint64_t size = 0;  // st_size when opened
    uint64_t pos = 0;

  private:
    int fd_ = -1;
};

// The whole of a regular file (st_size bytes, one allocation); NNError if it cannot be read.
std::vector<uint8_t> read_file(const std::string& path, const std::string& what = "a regular file");
