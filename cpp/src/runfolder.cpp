#include "runfolder.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "checkpoint.h"
#include "error.h"

namespace {

bool is_dir(const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// mkdir -p of the parents of `path`; the caller creates `path` itself.
void make_parents(const std::string& path) {
    for (size_t i = 1; i < path.size(); i++)
        if (path[i] == '/') {
            std::string p = path.substr(0, i);
            if (::mkdir(p.c_str(), 0777) != 0 && errno != EEXIST) return;  // the final mkdir reports it
        }
}

}  // namespace

std::string folder_of(const std::string& path) {
    size_t k = path.rfind('/');
    if (k == std::string::npos) return ".";
    return k == 0 ? "/" : path.substr(0, k);
}

std::string new_run_dir(const std::string& out) {
    char stamp[32];
    std::time_t t = std::time(nullptr);
    std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&t));
    const std::string root = out.empty() ? "." : out;
    for (int n = 0; n < 100; n++) {
        std::string run = root + "/" + stamp + (n ? "-" + std::to_string(n) : "");
        make_parents(run);
        if (::mkdir(run.c_str(), 0777) == 0) return run;
        if (errno == EEXIST && is_dir(run)) continue;  // another run started this second
        const std::string why = errno == EEXIST ? "a file is in the way" : std::strerror(errno);
        throw NNError("cannot create the run folder " + run + ": " + why + " (choose another with --out)");
    }
    throw NNError("cannot create a new run folder in " + root + ": too many runs started this second");
}

void point_latest(const std::string& run) {
    const std::string parent = folder_of(run), name = run.substr(run.rfind('/') + 1);
    const std::string link = parent + "/latest", tmp = parent + "/.latest.tmp-" + std::to_string(::getpid());
    ::unlink(tmp.c_str());
    if (::symlink(name.c_str(), tmp.c_str()) == 0 && ::rename(tmp.c_str(), link.c_str()) == 0) return;
    ::unlink(tmp.c_str());
    struct stat st;
    if (::lstat(link.c_str(), &st) == 0 && (S_ISLNK(st.st_mode) || S_ISDIR(st.st_mode))) return;
    try {  // no symlinks here: a text file naming the run
        write_text_atomic(link, name + "\n");
    } catch (const NNError&) {
    }
}

void write_text_atomic(const std::string& path, const std::string& text) {
    write_file_atomic(path, reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

void check_space(const std::string& folder, size_t n_params, int slots) {
    const double need = 4.0 * double(n_params) * (1 + 2 * (1 + slots)) + (1 << 20);
    struct statvfs s;
    if (::statvfs(folder.c_str(), &s) != 0) return;  // unknown: the saves will tell
    const double free = double(s.f_bavail) * double(s.f_frsize);
    if (free < need) {
        char b[200];
        std::snprintf(b, sizeof b, "not enough free space in %s: checkpoints need about %.1f MB, %.1f MB free "
                      "(free some space or choose another --out)", folder.c_str(), need / 1e6, free / 1e6);
        throw NNError(b);
    }
}

std::string resume_checkpoint(const std::string& arg) { return is_dir(arg) ? arg + "/last.ck" : arg; }

std::string resume_run_dir(const std::string& arg) {
    const std::string dir = folder_of(resume_checkpoint(arg));
    char* real = ::realpath(dir.c_str(), nullptr);  // runs/latest is a link: name the run itself
    if (!real) return dir;
    std::string out = real;
    std::free(real);
    return out;
}
