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

#include "checkpoint.h"
#include "error.h"
#include "idx.h"
#include "json.h"
#include "mlp.h"
#include "train.h"

namespace {

const char* USAGE =
    "usage: nn-cpp COMMAND ...\n"
    "  evaluate CHECKPOINT --data-dir DIR [--json] [--threads T]\n"
    "      test-set accuracy and mean loss\n"
    "  predict CHECKPOINT FILE.pgm... [--json]\n"
    "  predict CHECKPOINT IMAGES.idx[.gz] --index I|A:B[,...] [--index ...] [--json]\n"
    "      digit and probabilities of 28x28 binary PGM files or of IDX images (A:B is half-open)\n"
    "  train --data-dir DIR --out FILE.ck [--epochs N] [--batch-size B] [--lr X]\n"
    "        [--optimizer sgd|momentum|adam] [--momentum M] [--nesterov] [--weight-decay W]\n"
    "        [--reduction sum|mean] [--schedule constant|cosine|step] [--warmup-epochs E]\n"
    "        [--min-lr X] [--gamma G] [--step-epochs K] [--val-split F] [--seed S] [--threads T]\n"
    "        [--sizes 784,250,250,10] [--init CKPT] [--limit N] [--no-shuffle] [--quiet] [--force]\n"
    "      defaults: 10 epochs, batch 128, adam, lr 1e-3, mean, cosine, val-split 0.1, seed 0\n"
    "  bench [--batch-size B] [--threads T] [--epochs N] [--optimizer sgd|momentum|adam] [--json]\n"
    "      seconds per training epoch on 60,000 random samples (random data, not MNIST)\n"
    "  --version\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Strict number parsing: "12abc", "" or "nan" is a usage error, not 12, 0 or NaN.
double to_double(const std::string& opt, const std::string& s) {
    size_t used = 0;
    double v = 0;
    try {
        v = std::stod(s, &used);
    } catch (...) {
        used = 0;
    }
    if (used == 0 || used != s.size()) throw UsageError(opt + " expects a number, got '" + s + "'");
    if (!std::isfinite(v)) throw UsageError(opt + " expects a finite number, got '" + s + "'");
    return v;
}
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

int cmd_train(int argc, char** argv) {
    Args a = parse(argc, argv, 2,
                   {"--data-dir", "--out", "--epochs", "--batch-size", "--lr", "--optimizer", "--momentum",
                    "--weight-decay", "--reduction", "--schedule", "--warmup-epochs", "--min-lr", "--gamma",
                    "--step-epochs", "--val-split", "--seed", "--threads", "--sizes", "--init", "--limit"},
                   {"--nesterov", "--no-shuffle", "--quiet", "--force"});
    if (!a.pos.empty()) throw UsageError("train takes no positional arguments (got '" + a.pos[0] + "')");
    TrainConfig c;
    if (!a.has("--data-dir") || !a.has("--out")) throw UsageError("train needs --data-dir DIR and --out FILE.ck");
    c.data_dir = a.get("--data-dir");
    c.out = a.get("--out");
    c.init = a.get("--init");
    if (a.has("--epochs")) c.epochs = int(to_long("--epochs", a.get("--epochs")));
    if (a.has("--batch-size")) c.batch = int(to_long("--batch-size", a.get("--batch-size")));
    if (a.has("--lr")) c.lr = to_double("--lr", a.get("--lr"));
    c.optimizer = a.get("--optimizer", c.optimizer);
    if (a.has("--momentum")) c.momentum = to_double("--momentum", a.get("--momentum"));
    c.nesterov = a.has("--nesterov");
    if (a.has("--weight-decay")) c.weight_decay = to_double("--weight-decay", a.get("--weight-decay"));
    c.reduction = a.get("--reduction", c.reduction);
    c.schedule = a.get("--schedule", c.schedule);
    if (a.has("--warmup-epochs")) c.warmup_epochs = to_double("--warmup-epochs", a.get("--warmup-epochs"));
    if (a.has("--min-lr")) c.min_lr = to_double("--min-lr", a.get("--min-lr"));
    if (a.has("--gamma")) c.gamma = to_double("--gamma", a.get("--gamma"));
    if (a.has("--step-epochs")) c.step_epochs = int(to_long("--step-epochs", a.get("--step-epochs")));
    if (a.has("--val-split")) c.val_split = to_double("--val-split", a.get("--val-split"));
    if (a.has("--seed")) c.seed = uint64_t(to_long("--seed", a.get("--seed")));
    if (a.has("--threads")) c.threads = int(to_long("--threads", a.get("--threads")));
    if (a.has("--sizes")) c.sizes = parse_sizes(a.get("--sizes")), c.sizes_given = true;
    if (a.has("--limit")) c.limit = to_long("--limit", a.get("--limit"));
    c.shuffle = !a.has("--no-shuffle");
    c.quiet = a.has("--quiet");
    c.force = a.has("--force");
    if (c.nesterov && c.optimizer != "momentum") throw UsageError("--nesterov needs --optimizer momentum");
    if (c.threads < 0 || c.limit < 0 || c.step_epochs < 1 || c.warmup_epochs < 0 || !(c.lr > 0))
        throw UsageError("--threads, --limit, --warmup-epochs must be >= 0, --step-epochs >= 1, --lr > 0");
    train(c);
    return 0;
}

int cmd_bench(int argc, char** argv) {
    Args a = parse(argc, argv, 2, {"--batch-size", "--threads", "--epochs", "--sizes", "--optimizer"}, {"--json"});
    if (!a.pos.empty()) throw UsageError("bench takes no positional arguments");
    int batch = int(to_long("--batch-size", a.get("--batch-size", "64")));
    int threads = int(to_long("--threads", a.get("--threads", "0")));
    int epochs = int(to_long("--epochs", a.get("--epochs", "2")));
    if (batch < 1 || threads < 0 || epochs < 1) throw UsageError("--batch-size, --epochs >= 1, --threads >= 0");
    std::vector<uint32_t> sizes = a.has("--sizes") ? parse_sizes(a.get("--sizes")) : std::vector<uint32_t>{784, 250, 250, 10};
    std::string optim = a.get("--optimizer", "adam");
    BenchResult r = bench(batch, threads, epochs, sizes, optim);
    if (a.has("--json"))
        std::printf("{\"producer\":\"nn-cpp 0.1.0\",\"data\":\"random\",\"samples\":60000,\"optimizer\":\"%s\","
                    "\"sizes\":%s,\"batch_size\":%d,\"threads\":%d,\"epochs\":%d,\"seconds_per_epoch\":%s,"
                    "\"samples_per_s\":%s,\"cpu_seconds_per_epoch\":%s}\n",
                    optim.c_str(), json_str(sizes_str(sizes)).c_str(), batch, r.threads, epochs, json_num(r.seconds_per_epoch, 6).c_str(),
                    json_num(r.samples_per_s, 6).c_str(), json_num(r.cpu_seconds_per_epoch, 6).c_str());
    else
        std::printf("nn-cpp bench (random data, 60000 samples, %s, %s): batch %d, %d thread(s): "
                    "%.3f s/epoch, %.0f samples/s, %.3f CPU s/epoch (best of %d epochs)\n",
                    sizes_str(sizes).c_str(), optim.c_str(), batch, r.threads, r.seconds_per_epoch, r.samples_per_s,
                    r.cpu_seconds_per_epoch, epochs);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef _OPENMP
    // libgomp's default is to spin ~ms at every barrier. A training step has ~10 barriers, and on a
    // 2-core machine shared with other programs a spinning thread keeps the one it waits for off the
    // CPU: measured 4x slower than single-threaded. Sleeping waits cost ~0.1 s/epoch when idle.
    // libgomp reads the variable when it loads, before main, hence the re-exec; an explicit
    // OMP_WAIT_POLICY (e.g. active, on a dedicated machine) is left alone.
    if (!std::getenv("OMP_WAIT_POLICY") && ::setenv("OMP_WAIT_POLICY", "passive", 1) == 0)
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
        throw UsageError("unknown command '" + cmd + "'");
    } catch (const UsageError& e) {
        std::fprintf(stderr, "nn-cpp: error: %s (see nn-cpp --help)\n", e.what());
        return 2;
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
