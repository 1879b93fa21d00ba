#include "file.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "error.h"

namespace {

const char* kind_of(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "a special file";
}

}  // namespace

InFile::InFile(const std::string& p, const std::string& what) : path(p) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
    fd_ = ::open(p.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd_ < 0) throw file_error(p, std::string("cannot open: ") + std::strerror(errno));
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
        int e = errno;
        ::close(fd_);
        throw file_error(p, std::string("cannot open: ") + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd_);
        throw file_error(p, std::string("is ") + kind_of(st.st_mode) + ", not " + what);
    }
    ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL) & ~O_NONBLOCK);
    size = uint64_t(st.st_size);
}

InFile::~InFile() { ::close(fd_); }

size_t InFile::read(uint8_t* dst, size_t n) {
    if (n > size - pos) n = size_t(size - pos);
    size_t got = 0;
    while (got < n) {
        ssize_t r = ::read(fd_, dst + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) throw file_error(path, std::string("cannot read: ") + std::strerror(errno));
        if (r == 0) break;  // the file shrank since fstat
        got += size_t(r);
    }
    pos += got;
    return got;
}

size_t InFile::peek(uint8_t* dst, size_t n) {
    ssize_t r;
    do r = ::pread(fd_, dst, std::min<uint64_t>(n, size), 0);
    while (r < 0 && errno == EINTR);
    if (r < 0) throw file_error(path, std::string("cannot read: ") + std::strerror(errno));
    return size_t(r);
}

void InFile::read_exact(uint8_t* dst, size_t n) {
    if (read(dst, n) != n)
        throw file_error(path, "changed while being read (now shorter than its " + std::to_string(size) + " bytes)");
}

std::vector<uint8_t> read_file(const std::string& path, const std::string& what) {
    InFile f(path, what);
    std::vector<uint8_t> b(f.size);
    f.read_exact(b.data(), b.size());
    return b;
}
