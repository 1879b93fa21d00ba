// nn-cpp: evaluate / predict / train / bench. Every user-facing problem becomes
// one line "nn-cpp: error: FILE: what is wrong" on stderr and exit code 1
// (usage mistakes: exit code 2), never a crash or a stack trace.
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sys/stat.h>
#include <unistd.h>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "augment.h"
#include "checkpoint.h"
#include "config.h"
#include "error.h"
#include "idx.h"
#include "json.h"
#include "bench.h"
#include "mlp.h"
#include "runfolder.h"
#include "train.h"

namespace {

const char* USAGE =
    "usage: nn-cpp COMMAND ...\n"
    "  evaluate CHECKPOINT --data-dir DIR [--json] [--threads T]\n"
    "      test-set accuracy and mean loss\n"
    "  predict CHECKPOINT FILE.pgm... [--json]\n"
    "  predict CHECKPOINT IMAGES.idx[.gz] --index I|A:B[,...] [--index ...] [--json]\n"
    "      digit and probabilities of 28x28 binary PGM files or of IDX images (A:B is half-open)\n"
    "  train [--config FILE.toml] [--resume RUN] [--data-dir DIR] [--out DIR] [--epochs N] [--batch-size B]\n"
    "        [--lr X] [--seed S] [--threads T] [--optimizer sgd|momentum|adam] [--momentum M] [--nesterov]\n"
    "        [--weight-decay W] [--reduction sum|mean] [--schedule constant|cosine|step] [--warmup-epochs E]\n"
    "        [--min-lr X] [--gamma G] [--step-epochs K] [--val-split F] [--no-shuffle] [--sizes 784,250,250,10]\n"
    "        [--shift P] [--rotate D] [--scale F] [--elastic-alpha A] [--elastic-sigma S]\n"
    "        [--init CKPT] [--limit N] [--quiet]\n"
    "      trains per the TOML config (keys and defaults of nn_numba/config.py; flags override it) into\n"
    "      OUT/<timestamp>/ (config.toml, metrics.jsonl, best.ck, last.ck); --resume RUN continues a run of\n"
    "      nn-cpp or nn-numba with the run's own config.toml unless --config is given\n"
    "  augment IMAGES.idx[.gz] [--config FILE] [--shift ..] [--seed S] --index I --epoch E --position Q\n"
    "      one image distorted with the draws of training position Q of epoch E, as JSON\n"
    "  bench [--data-dir DIR] [--batch-size B] [--threads T] [--epochs N] [--optimizer sgd|momentum|adam] [--json]\n"
    "      seconds per training epoch on MNIST's 60,000 training images in DIR (random pixels without it)\n"
    "  --version\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Strict number parsing: "12abc" or "" is a usage error, not 12 or 0.
// The range of each integer option (as in nn_numba's config), checked before a value is narrowed to
// its field: --epochs 4294967297 must not become 1.
struct Range {
    const char* opt;
    long lo, hi;
};
const Range INT_RANGES[] = {{"--epochs", 1, 100000}, {"--batch-size", 1, 60000}, {"--step-epochs", 1, 1000000},
                            {"--threads", 0, MAX_THREADS}, {"--seed", 0, LONG_MAX}, {"--limit", 0, LONG_MAX}};
long to_long(const std::string& opt, const std::string& s) {
    size_t used = 0;
    long v = 0;
    bool huge = false;
    try {
        v = std::stol(s, &used);
    } catch (const std::out_of_range&) {
        huge = true;
    } catch (...) {
        used = 0;
    }
    if (!huge && (used == 0 || used != s.size())) throw UsageError(opt + " expects an integer, got '" + s + "'");
    for (const Range& r : INT_RANGES)
        if (opt == r.opt && (huge || v < r.lo || v > r.hi))
            throw UsageError(opt + " " + s + " is out of range [" + std::to_string(r.lo) + ", " + std::to_string(r.hi) + "]");
    if (huge) throw UsageError(opt + " " + s + " is out of range");
    return v;
}

std::vector<uint32_t> parse_sizes(const std::string& s) {
    std::vector<uint32_t> v;
    size_t p = 0;
    while (p <= s.size()) {
        size_t q = s.find_first_of(",-", p);
        if (q == std::string::npos) q = s.size();
        long n = to_long("--sizes", s.substr(p, q - p));
        if (n < 1 || n > 1000000) throw UsageError("--sizes: each size must be 1..1000000");
        v.push_back(uint32_t(n));
        p = q + 1;
    }
    if (v.size() < 2 || v.size() > 65) throw UsageError("--sizes needs 2 to 65 numbers, e.g. 784,250,250,10");
    return v;
}

// Splits argv into positionals and options; `flags` take no value.
struct Args {
    std::vector<std::string> pos;
    std::vector<std::pair<std::string, std::string>> opts;
    bool has(const std::string& k) const {
        for (auto& o : opts)
            if (o.first == k) return true;
        return false;
    }
    std::string get(const std::string& k, const std::string& def = "") const {
        std::string v = def;
        for (auto& o : opts)
            if (o.first == k) v = o.second;  // last one wins
        return v;
    }
    std::vector<std::string> all(const std::string& k) const {
        std::vector<std::string> v;
        for (auto& o : opts)
            if (o.first == k) v.push_back(o.second);
        return v;
    }
};

Args parse(int argc, char** argv, int start, const std::vector<std::string>& valued,
           const std::vector<std::string>& flags) {
    Args a;
    for (int i = start; i < argc; i++) {
        std::string s = argv[i];
        if (s.size() > 2 && s[0] == '-' && s[1] == '-') {
            std::string key = s, val;
            size_t eq = s.find('=');
            if (eq != std::string::npos) key = s.substr(0, eq), val = s.substr(eq + 1);
            bool is_flag = false, is_val = false;
            for (auto& f : flags) is_flag |= f == key;
            for (auto& f : valued) is_val |= f == key;
            if (is_flag) {
                a.opts.push_back({key, "1"});
            } else if (is_val) {
                if (eq == std::string::npos) {
                    if (i + 1 >= argc) throw UsageError(key + " needs a value");
                    val = argv[++i];
                }
                a.opts.push_back({key, val});
            } else {
                throw UsageError("unknown option " + key);
            }
        } else {
            a.pos.push_back(s);
        }
    }
    return a;
}

void set_threads(const Args& a) {
    if (a.has("--threads")) use_threads(int(to_long("--threads", a.get("--threads"))));
}

int cmd_evaluate(int argc, char** argv) {
    Args a = parse(argc, argv, 2, {"--data-dir", "--threads"}, {"--json"});
    if (a.pos.size() != 1) throw UsageError("evaluate takes one CHECKPOINT");
    if (!a.has("--data-dir")) throw UsageError("evaluate needs --data-dir DIR");
    set_threads(a);
    Checkpoint ck = load_checkpoint(a.pos[0]);
    check_mnist_net(ck.sizes, a.pos[0]);
    Net net = net_from_checkpoint(ck);
    Dataset te = load_mnist(a.get("--data-dir"), false);
    Eval e = evaluate(net, te.images.pixels.data(), te.labels.data(), te.images.n);
    if (a.has("--json"))
        std::printf("{\"checkpoint\":%s,\"accuracy\":%s,\"loss\":%s,\"correct\":%ld,\"n\":%ld,\"sizes\":%s}\n",
                    json_str(a.pos[0]).c_str(), json_num(e.accuracy).c_str(), json_num(e.loss).c_str(),
                    e.correct, e.n, json_str(sizes_str(net.sizes)).c_str());
    else
        std::printf("%s: test accuracy %.2f %% (%ld/%ld), mean loss %.4f\n", a.pos[0].c_str(), 100 * e.accuracy,
                    e.correct, e.n, e.loss);
    return 0;
}

// "5", "0:100" (half-open), "1,2,7:9"
std::vector<uint32_t> parse_indices(const std::vector<std::string>& specs, uint32_t n, const std::string& file) {
    std::vector<uint32_t> v;
    for (const auto& spec : specs) {
        size_t p = 0;
        while (p <= spec.size()) {
            size_t q = spec.find(',', p);
            if (q == std::string::npos) q = spec.size();
            std::string part = spec.substr(p, q - p);
            size_t c = part.find(':');
            long lo, hi;
            if (c == std::string::npos) {
                lo = to_long("--index", part);
                hi = lo + 1;
            } else {
                lo = to_long("--index", part.substr(0, c));
                hi = to_long("--index", part.substr(c + 1));
            }
            if (lo < 0 || hi > long(n) || lo >= hi)
                throw file_error(file, "--index " + part + " is out of range (file has " + std::to_string(n) +
                                           " images, valid indices 0.." + std::to_string(long(n) - 1) + ")");
            for (long i = lo; i < hi; i++) v.push_back(uint32_t(i));
            p = q + 1;
        }
    }
    return v;
}

int cmd_predict(int argc, char** argv) {
    Args a = parse(argc, argv, 2, {"--index", "--threads"}, {"--json"});
    if (a.pos.size() < 2) throw UsageError("predict takes CHECKPOINT FILE...");
    set_threads(a);
    Checkpoint ck = load_checkpoint(a.pos[0]);
    check_mnist_net(ck.sizes, a.pos[0]);
    Net net = net_from_checkpoint(ck);
    const uint32_t C = net.sizes.back();
    std::vector<uint8_t> pixels;
    std::vector<std::string> names;
    std::vector<long> index, label;
    if (a.has("--index")) {
        if (a.pos.size() != 2) throw UsageError("with --index give exactly one IDX image file");
        const std::string& f = a.pos[1];
        std::vector<uint32_t> picked;  // the file's images are streamed: only these are kept
        Images im = read_idx_images(f, [&](uint32_t n) { return picked = parse_indices(a.all("--index"), n, f); });
        pixels = std::move(im.pixels);
        // labels from the sibling file when there is one (train-images-idx3 -> train-labels-idx1)
        std::vector<uint8_t> labels;
        size_t k = f.rfind("images-idx3");
        if (k != std::string::npos) {
            std::string lf = f.substr(0, k) + "labels-idx1" + f.substr(k + 11);
            struct stat st;
            if (::stat(lf.c_str(), &st) == 0) labels = read_idx_labels(lf, im.n);
            if (labels.size() != im.n) labels.clear();
        }
        for (uint32_t i : picked) {
            names.push_back(f);
            index.push_back(i);
            label.push_back(labels.empty() ? -1 : labels[i]);
        }
    } else {
        for (size_t i = 1; i < a.pos.size(); i++) {
            std::vector<uint8_t> px = read_pgm(a.pos[i]);
            pixels.insert(pixels.end(), px.begin(), px.end());
            names.push_back(a.pos[i]);
            index.push_back(-1);
            label.push_back(-1);
        }
    }
    const int n = int(names.size());
    std::vector<float> logits, probs;
    predict(net, pixels.data(), n, &logits, &probs);
    const bool js = a.has("--json");
    if (js) std::printf("{\"checkpoint\":%s,\"predictions\":[", json_str(a.pos[0]).c_str());
    for (int i = 0; i < n; i++) {
        const float* p = probs.data() + size_t(i) * C;
        const float* z = logits.data() + size_t(i) * C;
        int d = 0;
        for (uint32_t c = 1; c < C; c++)
            if (z[c] > z[d]) d = int(c);
        if (js) {
            std::string s = std::string(i ? "," : "") + "{\"file\":" + json_str(names[i]);
            if (index[i] >= 0) s += ",\"index\":" + std::to_string(index[i]);
            if (label[i] >= 0) s += ",\"label\":" + std::to_string(label[i]);
            s += ",\"digit\":" + std::to_string(d) + ",\"probs\":[";
            for (uint32_t c = 0; c < C; c++) s += (c ? "," : "") + json_num(p[c]);
            s += "],\"logits\":[";
            for (uint32_t c = 0; c < C; c++) s += (c ? "," : "") + json_num(z[c]);
            std::printf("%s]}", s.c_str());
        } else {
            std::string where = names[i] + (index[i] >= 0 ? "[" + std::to_string(index[i]) + "]" : "");
            std::printf("%s: digit %d (p = %.4f)", where.c_str(), d, p[d]);
            if (label[i] >= 0) std::printf(" label %ld", label[i]);
            std::printf("  probs");
            for (uint32_t c = 0; c < C; c++) std::printf(" %.4f", p[c]);
            std::printf("\n");
        }
    }
    if (js) std::printf("]}\n");
    return 0;
}

// Flags that set a config key: --epochs 3 is [train] epochs = 3, checked like the file's values.
const char* const FLAG_KEYS[][3] = {
    {"--epochs", "train", "epochs"}, {"--batch-size", "train", "batch_size"}, {"--lr", "optim", "lr"},
    {"--seed", "train", "seed"}, {"--threads", "train", "threads"}, {"--out", "train", "out"},
    {"--optimizer", "optim", "name"}, {"--momentum", "optim", "momentum"},
    {"--weight-decay", "optim", "weight_decay"}, {"--reduction", "optim", "reduction"},
    {"--schedule", "schedule", "name"}, {"--warmup-epochs", "schedule", "warmup_epochs"},
    {"--min-lr", "schedule", "min_lr"}, {"--gamma", "schedule", "gamma"}, {"--step-epochs", "schedule", "step_epochs"},
    {"--val-split", "data", "val_split"}, {"--sizes", "model", "sizes"}, {"--shift", "augment", "shift"},
    {"--rotate", "augment", "rotate"}, {"--scale", "augment", "scale"},
    {"--elastic-alpha", "augment", "elastic_alpha"}, {"--elastic-sigma", "augment", "elastic_sigma"},
};

std::vector<std::string> flag_names(std::vector<std::string> more) {
    for (auto& f : FLAG_KEYS) more.push_back(f[0]);
    return more;
}

// The config file (or the resumed run's own config.toml, or the defaults), then the flags over it.
Config resolve_config(const Args& a) {
    Config c;
    if (a.has("--config")) c = load_config(a.get("--config"));
    else if (a.has("--resume")) {
        const std::string run = a.get("--resume");
        if (::access(run.c_str(), F_OK) != 0)
            throw NNError("cannot resume " + run + ": no such run folder or checkpoint (give a run folder or its last.ck)");
        c = load_config(resume_run_dir(run) + "/config.toml");  // the run's own config
    }
    bool over = false;
    for (auto& f : FLAG_KEYS)
        if (a.has(f[0])) set_config_key(c, f[1], f[2], a.get(f[0])), over = true;
    if (a.has("--nesterov")) c.nesterov = true, over = true;
    if (a.has("--no-shuffle")) c.shuffle = false, over = true;
    if (over) check_config(c, "command line");
    return c;
}

int cmd_train(int argc, char** argv) {
    Args a = parse(argc, argv, 2, flag_names({"--config", "--resume", "--data-dir", "--init", "--limit"}),
                   {"--nesterov", "--no-shuffle", "--quiet"});
    if (!a.pos.empty()) throw UsageError("train takes no positional arguments (got '" + a.pos[0] + "'); give the config as --config FILE");
    Config c = resolve_config(a);
    TrainOptions o;
    o.data_dir = a.get("--data-dir");
    o.resume = a.get("--resume");
    o.init = a.get("--init");
    o.quiet = a.has("--quiet");
    if (a.has("--limit")) o.limit = to_long("--limit", a.get("--limit"));
    if (o.limit < 0) throw UsageError("--limit must be >= 0 (0 = all training images)");
    if (!o.init.empty() && !o.resume.empty()) throw UsageError("--init and --resume exclude each other");
    train(c, o);
    return 0;
}

// The distortion of one image under the draws of (seed, epoch, position), as JSON (tests compare it with
// nn_numba.augment).
int cmd_augment(int argc, char** argv) {
    Args a = parse(argc, argv, 2, flag_names({"--config", "--index", "--epoch", "--position"}), {});
    if (a.pos.size() != 1) throw UsageError("augment takes one IDX image file");
    Config c = resolve_config(a);
    const long i = to_long("--index", a.get("--index", "0")), e = to_long("--epoch", a.get("--epoch", "0")),
               q = to_long("--position", a.get("--position", "0"));
    Images im = read_idx_images(a.pos[0]);
    if (im.rows * im.cols != 784) throw file_error(a.pos[0], "images are not 28x28");
    if (i < 0 || i >= long(im.n) || e < 0 || q < 0) throw UsageError("--index, --epoch, --position out of range");
    Augment aug(c);
    Draws d = augment_draws(aug, uint64_t(c.seed), uint64_t(e), uint64_t(q));
    std::vector<float> out(784);
    augment_one(im.pixels.data() + size_t(i) * 784, aug, d, out.data());
    std::string s = "{\"dx\":" + std::to_string(d.dx) + ",\"dy\":" + std::to_string(d.dy) +
                    ",\"angle\":" + json_num(d.angle) + ",\"scale\":" + json_num(d.scale) + ",\"field\":[";
    for (size_t k = 0; k < d.field.size(); k++) s += (k ? "," : "") + json_num(d.field[k]);
    s += "],\"pixels\":[";
    for (size_t k = 0; k < out.size(); k++) s += (k ? "," : "") + json_num(out[k]);
    std::printf("%s]}\n", s.c_str());
    return 0;
}

int cmd_bench(int argc, char** argv) {
    Args a = parse(argc, argv, 2, {"--batch-size", "--threads", "--epochs", "--sizes", "--optimizer", "--data-dir"},
                   {"--json"});
    if (!a.pos.empty()) throw UsageError("bench takes no positional arguments");
    BenchConfig c;
    c.batch = int(to_long("--batch-size", a.get("--batch-size", "64")));
    c.threads = int(to_long("--threads", a.get("--threads", "0")));
    c.epochs = int(to_long("--epochs", a.get("--epochs", "2")));
    if (c.batch < 1 || c.threads < 0 || c.epochs < 1) throw UsageError("--batch-size, --epochs >= 1, --threads >= 0");
    if (a.has("--sizes")) c.sizes = parse_sizes(a.get("--sizes"));
    c.optimizer = a.get("--optimizer", "adam");
    c.data_dir = a.get("--data-dir", "");
    BenchResult r = bench(c);
    if (a.has("--json"))
        std::printf("{\"producer\":\"nn-cpp 0.1.0\",\"data\":\"%s\",\"samples\":%u,\"optimizer\":\"%s\","
                    "\"sizes\":%s,\"batch_size\":%d,\"threads\":%d,\"epochs\":%d,\"seconds_per_epoch\":%s,"
                    "\"samples_per_s\":%s,\"cpu_seconds_per_epoch\":%s,\"loss\":%s}\n",
                    r.data.c_str(), r.samples, c.optimizer.c_str(), json_str(sizes_str(c.sizes)).c_str(), c.batch,
                    r.threads, c.epochs, json_num(r.seconds_per_epoch, 6).c_str(), json_num(r.samples_per_s, 6).c_str(),
                    json_num(r.cpu_seconds_per_epoch, 6).c_str(), json_num(r.loss, 6).c_str());
    else
        std::printf("nn-cpp bench (%s data, %u samples, %s, %s): batch %d, %d thread(s): "
                    "%.3f s/epoch, %.0f samples/s, %.3f CPU s/epoch (best of %d epochs), loss %.4f\n",
                    r.data.c_str(), r.samples, sizes_str(c.sizes).c_str(), c.optimizer.c_str(), c.batch, r.threads,
                    r.seconds_per_epoch, r.samples_per_s, r.cpu_seconds_per_epoch, c.epochs, r.loss);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef _OPENMP
    // How long a thread spins at a barrier before it sleeps. libgomp's default (300,000 spins) lets a
    // waiting thread keep the one it waits for off the CPU of a busy 2-core machine; sleeping at once
    // (OMP_WAIT_POLICY=passive) costs a wake-up at each of a step's barriers, which small batches feel.
    // A short spin (10,000) catches the barriers of a step that are a few microseconds apart and
    // sleeps through the rest (docs/performance.md has the measurement). libgomp reads the variables
    // when it loads, before main, hence the re-exec; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT
    // is left alone.
    if (!std::getenv("OMP_WAIT_POLICY") && !std::getenv("GOMP_SPINCOUNT") &&
        ::setenv("GOMP_SPINCOUNT", "10000", 1) == 0)
        ::execv("/proc/self/exe", argv);  // returns only on failure: then carry on as we are
#endif
    try {
        if (argc < 2) throw UsageError("no command given");
        std::string cmd = argv[1];
        if (cmd == "--version") return std::printf("nn-cpp 0.1.0\n"), 0;
        if (cmd == "-h" || cmd == "--help" || cmd == "help") return std::fputs(USAGE, stdout), 0;
        if (cmd == "evaluate") return cmd_evaluate(argc, argv);
        if (cmd == "predict") return cmd_predict(argc, argv);
        if (cmd == "train") return cmd_train(argc, argv);
        if (cmd == "bench") return cmd_bench(argc, argv);
        if (cmd == "augment") return cmd_augment(argc, argv);
        throw UsageError("unknown command '" + cmd + "'");
    } catch (const UsageError& e) {
        std::fprintf(stderr, "nn-cpp: error: %s (see nn-cpp --help)\n", e.what());
        return 2;
    } catch (const Interrupted& e) {
        std::fprintf(stderr, "nn-cpp: error: %s\n", e.what());
        return 130;
    } catch (const NNError& e) {
        std::fprintf(stderr, "nn-cpp: error: %s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "nn-cpp: error: out of memory\n");
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "nn-cpp: error: %s\n", e.what());
        return 1;
    }
}
