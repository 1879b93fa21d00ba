#include "train.h"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <unistd.h>

#include <nlohmann/json.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "augment.h"
#include "checkpoint.h"
#include "idx.h"
#include "mlp.h"
#include "rng.h"
#include "runfolder.h"

namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
const char* PRODUCER = "nn-cpp 0.1.0";

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

const char* KIND_NAMES[] = {"sgd", "momentum", "adam"};

std::string now_local() {  // as Python's datetime.now().isoformat(timespec="seconds")
    char b[32];
    std::time_t t = std::time(nullptr);
    std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%S", std::localtime(&t));
    return b;
}

// Where MNIST is: --data-dir, $NN_NUMBA_DATA, the config's data.dir, else the per-user cache.
std::string data_folder(const std::string& flag, const std::string& config) {
    if (!flag.empty()) return flag;
    const char* env = std::getenv("NN_NUMBA_DATA");
    if (env && *env) return env;
    if (!config.empty()) return config;
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    const char* home = std::getenv("HOME");
    std::string base = xdg && xdg[0] == '/' ? xdg : std::string(home ? home : ".") + "/.cache";
    return base + "/nn-numba/mnist";
}

// ---------------------------------------------------------------- resume

// Python's repr of a META value, for messages.
std::string py_repr(const json& v) {
    if (v.is_null()) return "None";
    if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
    if (v.is_string()) return "'" + v.get<std::string>() + "'";
    if (v.is_number_float()) return py_float(v.get<double>());
    if (v.is_array()) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + py_repr(v[i]);
        return s + "]";
    }
    return v.dump();
}

struct Resume {
    Checkpoint ck;
    json meta;
    int64_t epoch = 0, batch = 0, run_correct = 0;
    double run_loss = 0;
};

// Keys a resumed run must share with the checkpoint: others would change the data split, the data order
// or the optimiser state's meaning. epochs, lr, schedule, threads and the like may change.
const char* SAME_ON_RESUME[][2] = {{"model", "sizes"}, {"optim", "name"}, {"data", "val_split"},
                                   {"data", "shuffle"}, {"train", "seed"}};

// The checkpoint's training state, checked as nn_numba.train._check_resume checks it: a damaged or
// foreign run gives an NNError before anything is written.
Resume open_resume(const std::string& arg, const Config& cfg, const std::vector<uint32_t>& sizes, long limit) {
    Resume r;
    const std::string path = resume_checkpoint(arg);
    r.ck = load_checkpoint(path, sizes);
    const NNError damaged("cannot resume " + arg + ": its training state is damaged; use another last.ck or start anew");
    try {
        r.meta = json::parse(r.ck.meta.empty() ? "{}" : r.ck.meta);
    } catch (const json::exception&) {
        throw damaged;
    }
    if (!r.meta.contains("resume") || !r.ck.has_optim)
        throw NNError(path + ": holds no training state to resume from (use a run's last.ck)");
    const json& st = r.meta["resume"];
    if (!st.is_object() || !r.meta.contains("config") || !r.meta["config"].is_object()) throw damaged;
    const json& saved = r.meta["config"];
    const json now = json::parse(config_json(cfg));
    auto check_same = [&](const char* table, const char* key, const char* why) {
        json was = saved.contains(table) && saved[table].is_object() && saved[table].contains(key) ? saved[table][key]
                                                                                                   : json();
        if (was != now[table][key])
            throw NNError("cannot resume " + arg + ": it was trained with [" + table + "] " + key + " = " + py_repr(was) +
                          why + ", the config says " + py_repr(now[table][key]) +
                          "; resume with the run's own config.toml");
    };
    for (auto& k : SAME_ON_RESUME) check_same(k[0], k[1], "");
    const bool mid_epoch = st.contains("batch") && !(st["batch"].is_number() && st["batch"] == 0);
    if (mid_epoch) check_same("train", "batch_size", " (it stopped mid-epoch)");
    auto count = [&](const char* k) { return st.contains(k) && st[k].is_number_integer() && st[k].get<int64_t>() >= 0; };
    auto number = [&](const char* k, bool need) {
        return r.meta.contains(k) ? r.meta[k].is_number() : !need;
    };
    const json hist = r.meta.contains("history") ? r.meta["history"] : json::array();
    bool ok = count("epoch") && count("batch") && count("run_correct") && st.contains("run_loss") &&
              st["run_loss"].is_number() && std::isfinite(st["run_loss"].get<double>()) &&
              number("best_val_acc", false) && number("wall_time", false) && hist.is_array();
    for (const json& row : hist) ok = ok && row.is_object();
    if (!ok) throw damaged;
    if (r.ck.optim.kind > 2 || cfg.optim != KIND_NAMES[r.ck.optim.kind])
        throw NNError("cannot resume: the checkpoint's optimiser state is " + std::string(KIND_NAMES[std::min(r.ck.optim.kind, 2u)]) +
                      ", the config asks for " + cfg.optim);
    const int64_t was = r.meta.contains("limit") && r.meta["limit"].is_number_integer() ? r.meta["limit"].get<int64_t>() : 0;
    if (was != limit)
        throw NNError("cannot resume " + arg + ": it was trained with --limit " + std::to_string(was) + ", this run asks for " +
                      std::to_string(limit) + " (0 = all images); give the same --limit");
    r.epoch = st["epoch"].get<int64_t>();
    r.batch = st["batch"].get<int64_t>();
    r.run_correct = st["run_correct"].get<int64_t>();
    r.run_loss = st["run_loss"].get<double>();
    return r;
}

// ---------------------------------------------------------------- Ctrl-C

volatile std::sig_atomic_t g_stop = 0;

void on_sigint(int) {
    if (g_stop) {  // the second Ctrl-C: stop at once (every file on disk is whole: they are written atomically)
        const char msg[] = "nn-cpp: error: stopped at once; the checkpoints of the run are the last complete ones\n";
        ssize_t n = ::write(2, msg, sizeof msg - 1);
        (void)n;
        ::_exit(130);
    }
    g_stop = 1;
}

// The first Ctrl-C sets g_stop (training saves and stops after the mini-batch); while it lives.
struct SigintGuard {
    void (*old)(int);
    SigintGuard() : old(std::signal(SIGINT, on_sigint)) { g_stop = 0; }
    ~SigintGuard() { std::signal(SIGINT, old); }
};

// ---------------------------------------------------------------- the run

// MNIST, the split (docs/training.md) and the epoch's shape.
struct Data {
    Dataset tr, te;  // tr's pixels live in px
    std::unique_ptr<uint8_t, void (*)(void*)> px{nullptr, std::free};  // the training images (huge_copy)
    std::vector<uint32_t> train_idx, val_idx;
    long B = 0, n_train = 0, spe = 0;  // batch size, training images, steps per epoch
};

Data load_data(const Config& cfg, const TrainOptions& o) {
    Data d;
    const std::string dir = data_folder(o.data_dir, cfg.data_dir);
    d.tr = load_mnist(dir, true);  // the config checked that sizes run from 784 to 10
    d.px = huge_copy(d.tr.images.pixels);
    std::vector<uint8_t>().swap(d.tr.images.pixels);  // one copy of the images in memory
    d.te = load_mnist(dir, false);
    uint32_t N = d.tr.images.n;
    if (o.limit > 0 && o.limit < long(N)) N = uint32_t(o.limit);
    rng_split(N, cfg.val_split, uint64_t(cfg.seed), &d.train_idx, &d.val_idx);
    if (d.train_idx.empty()) throw NNError("[data] val_split leaves no training images");
    d.B = long(cfg.batch_size), d.n_train = long(d.train_idx.size());
    d.spe = (d.n_train + d.B - 1) / d.B;  // the last, smaller batch is kept
    return d;
}

// Epoch `epoch`'s visiting order of the training split.
std::vector<uint32_t> epoch_order(const Config& cfg, const Data& d, int64_t epoch) {
    if (!cfg.shuffle) return d.train_idx;
    std::vector<uint32_t> order(d.train_idx.size());
    std::vector<uint32_t> p = rng_perm(uint32_t(d.n_train), uint64_t(cfg.seed), STREAM_SHUFFLE, uint64_t(epoch));
    for (size_t i = 0; i < p.size(); i++) order[i] = d.train_idx[p[i]];
    return order;
}

Net initial_net(const Config& cfg, const TrainOptions& o, const Resume* res) {
    std::vector<uint32_t> sizes(cfg.sizes.begin(), cfg.sizes.end());
    if (res) return net_from_checkpoint(res->ck);
    if (!o.init.empty()) return net_from_checkpoint(load_checkpoint(o.init, sizes));
    Rng rng(uint64_t(cfg.seed));
    return he_init(sizes, rng);
}

Optimizer make_optimizer(const Config& cfg, const Net& net, const Resume* res) {
    Optimizer opt(optimizer_kind(cfg.optim), net);
    opt.momentum = float(cfg.momentum);
    opt.nesterov = cfg.nesterov;
    opt.wd = float(cfg.weight_decay);
    opt.beta1 = cfg.beta1, opt.beta2 = cfg.beta2, opt.eps = cfg.eps;
    if (res) {
        opt.t = res->ck.optim.step;
        if (opt.kind >= 1) opt.slot0 = res->ck.optim.slots[0];
        if (opt.kind == 2) opt.slot1 = res->ck.optim.slots[1];
    }
    return opt;
}

Schedule make_schedule(const Config& cfg, long spe) {
    Schedule sch;
    sch.kind = cfg.schedule;
    sch.lr = cfg.lr, sch.min_lr = cfg.min_lr, sch.gamma = cfg.gamma;
    sch.step_epochs = int(cfg.step_epochs);
    sch.steps_per_epoch = spe;
    sch.warmup = Schedule::warmup_steps(cfg.warmup_epochs, spe);
    sch.total = spe * long(cfg.plan_epochs ? cfg.plan_epochs : cfg.epochs);  // an extended run keeps its plan
    return sch;
}

// Where training stands, and how it is written to the run folder (as nn_numba/train.py writes it).
struct Run {
    const Config& cfg;
    long limit;
    std::string dir;
    Net net;
    Optimizer opt;
    json history = json::array();
    double best_val = -1.0, elapsed = 0.0, run_loss = 0.0;
    int64_t epoch = 0, batch0 = 0, run_correct = 0;

    Run(const Config& c, long lim, Net n, Optimizer o) : cfg(c), limit(lim), net(std::move(n)), opt(std::move(o)) {}

    void take(const Resume& r) {
        history = r.meta.value("history", json::array());
        best_val = r.meta.value("best_val_acc", -1.0);
        elapsed = r.meta.value("wall_time", 0.0);
        epoch = r.epoch, batch0 = r.batch, run_loss = r.run_loss, run_correct = r.run_correct;
    }
    json meta(const json& extra) const {
        json m = {{"producer", PRODUCER}, {"created", now_local()}, {"config", json::parse(config_json(cfg))},
                  {"history", history}, {"best_val_acc", best_val}, {"step", opt.t}, {"wall_time", elapsed}};
        if (limit > 0) m["limit"] = limit;
        for (auto& [k, v] : extra.items()) m[k] = v;
        return m;
    }
    // NAME.ck in the run folder with META meta(extra) (and OPTM when with_optim); net and opt must be synced.
    void save(const char* name, const json& extra, bool with_optim) const {
        Checkpoint ck;
        ck.sizes = net.sizes, ck.W = net.W, ck.B = net.B, ck.meta = meta(extra).dump();
        ck.has_optim = with_optim;
        if (with_optim) ck.optim = opt.state();
        save_checkpoint(ck, dir + "/" + name);
    }
};

void print_start(const Run& r, const Data& d, const Augment& aug, int threads, bool resuming) {
    const Config& c = r.cfg;
    std::printf("run %s  |  %s  %s lr %g  batch %ld  %ld epochs  %d threads  train %ld / val %zu / test %u\n",
                r.dir.c_str(), sizes_str(r.net.sizes).c_str(), c.optim.c_str(), c.lr, d.B, long(c.epochs), threads,
                d.n_train, d.val_idx.size(), d.te.images.n);
    if (resuming) std::printf("resuming %s at epoch %ld, step %lu\n", r.dir.c_str(), long(r.epoch + 1), (unsigned long)r.opt.t);
    if (resuming && r.epoch >= c.epochs)
        std::printf("note: the run already has %ld epochs, the config asks for %ld: nothing to do (pass --epochs to "
                    "train longer)\n", long(r.epoch), long(c.epochs));
    if (aug.enabled())
        std::printf("augment shift %d  rotate %g  scale %g  elastic_alpha %g  elastic_sigma %g\n", aug.shift, aug.rotate,
                    aug.scale, aug.elastic_alpha, aug.elastic_sigma);
    std::fflush(stdout);
}

// The batches of r.epoch from r.batch0 on. Returns the last learning rate; on Ctrl-C saves last.ck
// mid-epoch and throws Interrupted.
double train_batches(Run& r, const Data& d, const Augment& aug, const Schedule& sch, Work& w, Clock::time_point t0) {
    const Config& c = r.cfg;
    const std::vector<uint32_t> order = epoch_order(c, d, r.epoch);
    const uint8_t* px = d.px.get();
    std::vector<uint8_t> y(size_t(std::min(d.B, d.n_train)));
    double lr = c.lr;
    for (long bi = r.batch0; bi < d.spe; bi++) {
        const long q0 = bi * d.B;
        const int nb = int(std::min(d.B, d.n_train - q0));
        if (aug.enabled()) augment_batch(px, order.data() + q0, nb, aug, uint64_t(c.seed), uint64_t(r.epoch), uint64_t(q0), w.A[0].data());
        else load_batch(w, px, int(r.net.sizes[0]), order.data() + q0, nb);
        for (int b = 0; b < nb; b++) y[b] = d.tr.labels[order[q0 + b]];
        lr = sch.at(long(r.opt.t));
        int hits = 0;
        const double loss = train_step(r.net, w, r.opt, y.data(), nb, c.reduction == "mean", lr, &hits);
        if (!std::isfinite(loss))
            throw NNError("training diverged at epoch " + std::to_string(r.epoch + 1) + ", step " + std::to_string(bi + 1) +
                          ": the loss is " + py_float(loss) + " (learning rate " + py_float(lr) +
                          "); try a smaller --lr. Checkpoints in " + r.dir + " are the last good ones");
        r.run_loss += loss;
        r.run_correct += hits;
        if (g_stop && bi + 1 < d.spe) {  // mid-epoch: save where we are and stop
            sync(r.net, w, r.opt);
            r.elapsed += since(t0);
            const json st = {{"epoch", r.epoch}, {"batch", bi + 1}, {"run_loss", r.run_loss}, {"run_correct", r.run_correct}};
            r.save("last.ck", {{"epoch", r.epoch}, {"resume", st}}, true);
            throw Interrupted("interrupted at epoch " + std::to_string(r.epoch + 1) + ", step " + std::to_string(bi + 1) +
                              "; saved " + r.dir + "/last.ck. Resume with: nn-cpp train --resume " + r.dir);
        }
    }
    return lr;
}

// metrics.jsonl's row of the epoch just trained (validation and test evaluated now).
json epoch_row(const Run& r, const Data& d, double lr, double seconds) {
    json row = {{"epoch", r.epoch + 1}, {"step", r.opt.t}, {"lr", lr}, {"train_loss", r.run_loss / double(d.n_train)},
                {"train_acc", double(r.run_correct) / double(d.n_train)}};
    if (!d.val_idx.empty()) {
        Eval v = evaluate(r.net, d.px.get(), d.tr.labels.data(), d.tr.images.n, d.val_idx);
        row["val_loss"] = v.loss, row["val_acc"] = v.accuracy;
    }
    Eval t = evaluate(r.net, d.te.images.pixels.data(), d.te.labels.data(), d.te.images.n);
    row["test_loss"] = t.loss, row["test_acc"] = t.accuracy;
    row["seconds"] = seconds;
    row["samples_per_s"] = seconds > 0 ? double(d.n_train - r.batch0 * d.B) / seconds : 0.0;
    return row;
}

// After an epoch: the history, best.ck (best validation accuracy, never test; without validation the
// last epoch), last.ck with the resume state of the next epoch's start, metrics.jsonl.
void end_epoch(Run& r, const json& row) {
    r.history.push_back(row);
    r.epoch += 1, r.batch0 = 0, r.run_loss = 0.0, r.run_correct = 0;
    json summary;
    for (auto& [k, v] : row.items())
        if (k.size() > 4 && (k.compare(k.size() - 4, 4, "_acc") == 0 || k.compare(k.size() - 5, 5, "_loss") == 0))
            summary[k] = v;
    summary["epoch"] = r.epoch;
    const bool has_val = row.contains("val_acc");
    const double score = has_val ? row["val_acc"].get<double>() : -1.0;
    if (score > r.best_val || !has_val) {
        r.best_val = score;
        r.save("best.ck", summary, false);
    }
    json last = summary;
    last["resume"] = {{"epoch", r.epoch}, {"batch", 0}, {"run_loss", 0.0}, {"run_correct", 0}};
    r.save("last.ck", last, true);
    std::string lines;
    for (const json& h : r.history) lines += h.dump() + "\n";
    write_text_atomic(r.dir + "/metrics.jsonl", lines);
}

void print_epoch(const json& row) {
    auto num = [&](const char* k) { return row[k].is_number() ? row[k].get<double>() : NAN; };
    char val[64] = "";
    if (row.contains("val_acc")) std::snprintf(val, sizeof val, "val %.4f / %.2f%%  ", num("val_loss"), 100 * num("val_acc"));
    std::printf("epoch %3ld  train %.4f / %.2f%%  %stest %.4f / %.2f%%  %.0f img/s  lr %.3g\n", long(row["epoch"]),
                num("train_loss"), 100 * num("train_acc"), val, num("test_loss"), 100 * num("test_acc"),
                num("samples_per_s"), num("lr"));
    std::fflush(stdout);
}

// The first best epoch, as nn-numba train reports it.
void print_done(const json& history, const std::string& dir) {
    if (history.empty()) return;
    auto score = [](const json& r) {
        const json& s = r.contains("val_acc") ? r["val_acc"] : r["train_acc"];
        return s.is_number() ? s.get<double>() : -1.0;
    };
    const json* best = &history[0];
    for (const json& r : history)
        if (score(r) > score(*best)) best = &r;
    auto pct = [&](const char* k) { return best->contains(k) && (*best)[k].is_number() ? 100 * (*best)[k].get<double>() : NAN; };
    std::printf("done: best epoch %s (validation %.2f%%, test %.2f%%) saved in %s/best.ck\n",
                best->value("epoch", json()).dump().c_str(), pct("val_acc"), pct("test_acc"), dir.c_str());
}

}  // namespace

int use_threads(int requested) {
    if (requested < 0 || requested > MAX_THREADS)
        throw NNError("--threads " + std::to_string(requested) + " is out of range [0, " + std::to_string(MAX_THREADS) + "]");
#ifdef _OPENMP
    const int cores = omp_get_num_procs();
    if (requested > cores) {
        std::fprintf(stderr, "note: --threads %d is more than the %d cores available; using %d\n", requested, cores, cores);
        requested = cores;
    }
    if (requested > 0) omp_set_num_threads(requested);
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int optimizer_kind(const std::string& s) {
    if (s == "sgd") return 0;
    if (s == "momentum") return 1;
    if (s == "adam") return 2;
    throw NNError("unknown optimizer '" + s + "' (use sgd, momentum or adam)");
}

std::string train(const Config& cfg, const TrainOptions& o) {
    std::unique_ptr<Resume> res;
    if (!o.resume.empty())
        res = std::make_unique<Resume>(open_resume(o.resume, cfg, {cfg.sizes.begin(), cfg.sizes.end()}, o.limit));
    Net net = initial_net(cfg, o, res.get());
    const int threads = use_threads(int(cfg.threads));  // [0, 1024] already checked with the config
    const Data d = load_data(cfg, o);
    if (res && res->batch >= d.spe)
        throw NNError("cannot resume " + o.resume + ": its training state is damaged (batch " + std::to_string(res->batch) +
                      " of an epoch of " + std::to_string(d.spe) + "); use another last.ck or start anew");
    Run r(cfg, o.limit, net, make_optimizer(cfg, net, res.get()));
    if (res) r.take(*res);

    // Everything is checked: only now is anything written.
    r.dir = res ? resume_run_dir(o.resume) : new_run_dir(cfg.out);
    write_text_atomic(r.dir + "/config.toml", config_toml(cfg));
    point_latest(r.dir);
    check_space(r.dir, r.net.n_params(), r.opt.kind);

    const Schedule sch = make_schedule(cfg, d.spe);
    const Augment aug(cfg);
    Work w(r.net, int(std::min(d.B, d.n_train)));  // a batch is never larger
    SigintGuard ctrl_c;  // before the first line: a caller may react to it
    if (!o.quiet) print_start(r, d, aug, threads, res != nullptr);
    while (r.epoch < cfg.epochs) {
        const auto t0 = Clock::now();
        const double lr = train_batches(r, d, aug, sch, w, t0);
        const double seconds = since(t0);
        r.elapsed += seconds;
        sync(r.net, w, r.opt);  // W1 and its optimiser slots back from train_step: evaluation and checkpoints read them
        const json row = epoch_row(r, d, lr, seconds);
        end_epoch(r, row);
        if (!o.quiet) print_epoch(row);
        if (g_stop)
            throw Interrupted("interrupted after epoch " + std::to_string(r.epoch) + "; saved " + r.dir +
                              "/last.ck. Resume with: nn-cpp train --resume " + r.dir);
    }
    if (!o.quiet) print_done(r.history, r.dir);
    return r.dir;
}
