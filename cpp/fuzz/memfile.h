// The fuzz targets hand their bytes to the readers as a file, through the same path (open, fstat,
// read) a user's file takes: an in-memory file (memfd), named /proc/self/fd/N.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

inline std::string memfile(const uint8_t* data, size_t size) {
    static int fd = memfd_create("fuzz-input", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 0) != 0) std::abort();
    for (size_t done = 0; done < size;) {
        ssize_t n = pwrite(fd, data + done, size - done, off_t(done));
        if (n <= 0) std::abort();
        done += size_t(n);
    }
    return "/proc/self/fd/" + std::to_string(fd);
}
