#include "train.h"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
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

int set_threads(int64_t threads, bool quiet) {
#ifdef _OPENMP
    const int cores = omp_get_num_procs();
    int n = threads == 0 ? cores : int(threads);
    if (n > cores) {
        if (!quiet) std::printf("note: --threads %d is more than the %d cores available; using %d\n", n, cores, cores);
        n = cores;
    }
    omp_set_num_threads(n);
    return n;
#else
    (void)threads, (void)quiet;
    return 1;
#endif
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

}  // namespace

int optimizer_kind(const std::string& s) {
    if (s == "sgd") return 0;
    if (s == "momentum") return 1;
    if (s == "adam") return 2;
    throw NNError("unknown optimizer '" + s + "' (use sgd, momentum or adam)");
}

std::string train(const Config& cfg, const TrainOptions& o) {
    std::vector<uint32_t> sizes(cfg.sizes.begin(), cfg.sizes.end());
    Resume res;
    const bool resuming = !o.resume.empty();
    if (resuming) res = open_resume(o.resume, cfg, sizes, o.limit);
    const int threads = set_threads(cfg.threads, o.quiet);
    const std::string dir = data_folder(o.data_dir, cfg.data_dir);
    Dataset tr = load_mnist(dir, true, sizes[0], sizes.back());
    Dataset te = load_mnist(dir, false, sizes[0], sizes.back());

    uint32_t N = tr.images.n;
    if (o.limit > 0 && o.limit < long(N)) N = uint32_t(o.limit);
    std::vector<uint32_t> train_idx, val_idx;
    rng_split(N, cfg.val_split, uint64_t(cfg.seed), &train_idx, &val_idx);
    if (train_idx.empty()) throw NNError("[data] val_split leaves no training images");
    const long B = long(cfg.batch_size), n_train = long(train_idx.size());
    const long spe = (n_train + B - 1) / B;  // steps per epoch; the last, smaller batch is kept
    if (resuming && res.batch >= spe)
        throw NNError("cannot resume " + o.resume + ": its training state is damaged (batch " + std::to_string(res.batch) +
                      " of an epoch of " + std::to_string(spe) + "); use another last.ck or start anew");

    Net net;
    if (resuming) net = net_from_checkpoint(res.ck);
    else if (!o.init.empty()) net = net_from_checkpoint(load_checkpoint(o.init, sizes));
    else {
        Rng rng(uint64_t(cfg.seed));
        net = he_init(sizes, rng);
    }
    Optimizer opt(optimizer_kind(cfg.optim), net);
    opt.momentum = float(cfg.momentum);
    opt.nesterov = cfg.nesterov;
    opt.wd = float(cfg.weight_decay);
    opt.beta1 = cfg.beta1, opt.beta2 = cfg.beta2, opt.eps = cfg.eps;
    if (resuming) {
        opt.t = res.ck.optim.step;
        if (opt.kind >= 1) opt.slot0 = res.ck.optim.slots[0];
        if (opt.kind == 2) opt.slot1 = res.ck.optim.slots[1];
    }

    // Everything is checked: only now is anything written.
    const std::string run = resuming ? resume_run_dir(o.resume) : new_run_dir(cfg.out);
    write_text_atomic(run + "/config.toml", config_toml(cfg));
    point_latest(run);
    check_space(run, net.n_params(), opt.kind);

    Schedule sch;
    sch.kind = cfg.schedule;
    sch.lr = cfg.lr, sch.min_lr = cfg.min_lr, sch.gamma = cfg.gamma;
    sch.step_epochs = int(cfg.step_epochs);
    sch.steps_per_epoch = spe;
    sch.warmup = Schedule::warmup_steps(cfg.warmup_epochs, spe);
    sch.total = spe * long(cfg.epochs);
    const Augment aug(cfg);
    const bool mean = cfg.reduction == "mean";
    Work w(net, int(std::min(B, n_train)));  // a batch is never larger

    json history = json::array();
    double best_val = -1.0, elapsed = 0.0, run_loss = 0.0;
    int64_t epoch = 0, batch0 = 0, run_correct = 0;
    if (resuming) {
        history = res.meta.value("history", json::array());
        best_val = res.meta.value("best_val_acc", -1.0);
        elapsed = res.meta.value("wall_time", 0.0);
        epoch = res.epoch, batch0 = res.batch, run_loss = res.run_loss, run_correct = res.run_correct;
    }
    auto meta = [&](const json& extra) {
        json m = {{"producer", PRODUCER}, {"created", now_local()}, {"config", json::parse(config_json(cfg))},
                  {"history", history}, {"best_val_acc", best_val}, {"step", opt.t}, {"wall_time", elapsed}};
        if (o.limit > 0) m["limit"] = o.limit;
        for (auto& [k, v] : extra.items()) m[k] = v;
        return m;
    };
    auto checkpoint = [&](const json& m, bool with_optim) {
        Checkpoint ck;
        ck.sizes = net.sizes, ck.W = net.W, ck.B = net.B, ck.meta = m.dump();
        ck.has_optim = with_optim;
        if (with_optim) ck.optim = opt.state();
        return ck;
    };
    g_stop = 0;
    auto old_handler = std::signal(SIGINT, on_sigint);  // before the first line: a caller may react to it
    if (!o.quiet) {
        std::printf("run %s  |  %s  %s lr %g  batch %ld  %ld epochs  %d threads  train %ld / val %zu / test %u\n",
                    run.c_str(), sizes_str(net.sizes).c_str(), cfg.optim.c_str(), cfg.lr, B, long(cfg.epochs), threads,
                    n_train, val_idx.size(), te.images.n);
        if (resuming) std::printf("resuming %s at epoch %ld, step %lu\n", run.c_str(), long(epoch + 1), (unsigned long)opt.t);
        if (resuming && epoch >= cfg.epochs)
            std::printf("note: the run already has %ld epochs, the config asks for %ld: nothing to do (pass --epochs to "
                        "train longer)\n", long(epoch), long(cfg.epochs));
        if (aug.enabled())
            std::printf("augment shift %d  rotate %g  scale %g  elastic_alpha %g  elastic_sigma %g\n", aug.shift,
                        aug.rotate, aug.scale, aug.elastic_alpha, aug.elastic_sigma);
        std::fflush(stdout);
    }

    std::vector<uint8_t> y(size_t(std::min(B, n_train)));
    const uint8_t* px = tr.images.pixels.data();
    const int n_in = int(sizes[0]);
    for (; epoch < cfg.epochs; epoch++) {
        std::vector<uint32_t> order = train_idx;
        if (cfg.shuffle) {
            std::vector<uint32_t> p = rng_perm(uint32_t(n_train), uint64_t(cfg.seed), STREAM_SHUFFLE, uint64_t(epoch));
            for (long i = 0; i < n_train; i++) order[i] = train_idx[p[i]];
        }
        auto t0 = Clock::now();
        double lr = cfg.lr;
        for (long bi = batch0; bi < spe; bi++) {
            const long q0 = bi * B;
            const int nb = int(std::min(B, n_train - q0));
            if (aug.enabled()) augment_batch(px, order.data() + q0, nb, aug, uint64_t(cfg.seed), uint64_t(epoch), uint64_t(q0), w.A[0].data());
            else load_batch(w, px, n_in, order.data() + q0, nb);
            for (int b = 0; b < nb; b++) y[b] = tr.labels[order[q0 + b]];
            lr = sch.at(long(opt.t));
            int hits = 0;
            double loss = train_step(net, w, opt, y.data(), nb, mean, lr, &hits);
            if (!std::isfinite(loss))
                throw NNError("training diverged at epoch " + std::to_string(epoch + 1) + ", step " + std::to_string(bi + 1) +
                              ": the loss is " + py_float(loss) + " (learning rate " + py_float(lr) +
                              "); try a smaller --lr. Checkpoints in " + run + " are the last good ones");
            run_loss += loss;
            run_correct += hits;
            if (g_stop && bi + 1 < spe) {  // mid-epoch: save where we are and stop
                sync(net, w, opt);
                elapsed += since(t0);
                json st = {{"epoch", epoch}, {"batch", bi + 1}, {"run_loss", run_loss}, {"run_correct", run_correct}};
                save_checkpoint(checkpoint(meta({{"epoch", epoch}, {"resume", st}}), true), run + "/last.ck");
                std::signal(SIGINT, old_handler);
                throw Interrupted("interrupted at epoch " + std::to_string(epoch + 1) + ", step " + std::to_string(bi + 1) +
                                  "; saved " + run + "/last.ck. Resume with: nn-cpp train --resume " + run);
            }
        }
        const double seconds = since(t0);
        elapsed += seconds;
        sync(net, w, opt);  // W1 and its optimiser slots back from train_step: evaluation and checkpoints read them
        json row = {{"epoch", epoch + 1}, {"step", opt.t}, {"lr", lr}, {"train_loss", run_loss / double(n_train)},
                    {"train_acc", double(run_correct) / double(n_train)}};
        if (!val_idx.empty()) {
            Eval v = evaluate(net, px, tr.labels.data(), tr.images.n, val_idx);
            row["val_loss"] = v.loss, row["val_acc"] = v.accuracy;
        }
        Eval t = evaluate(net, te.images.pixels.data(), te.labels.data(), te.images.n);
        row["test_loss"] = t.loss, row["test_acc"] = t.accuracy;
        row["seconds"] = seconds;
        row["samples_per_s"] = seconds > 0 ? double(n_train - batch0 * B) / seconds : 0.0;
        history.push_back(row);
        const int64_t done = epoch + 1;
        batch0 = 0, run_loss = 0.0, run_correct = 0;
        const bool has_val = row.contains("val_acc");
        const double score = has_val ? row["val_acc"].get<double>() : -1.0;
        json summary;
        for (auto& [k, v] : row.items())
            if (k.size() > 4 && (k.compare(k.size() - 4, 4, "_acc") == 0 || k.compare(k.size() - 5, 5, "_loss") == 0))
                summary[k] = v;
        summary["epoch"] = done;
        if (score > best_val || !has_val) {  // best on validation, never on test; without validation: the last
            best_val = score;
            save_checkpoint(checkpoint(meta(summary), false), run + "/best.ck");
        }
        json last = summary;
        last["resume"] = {{"epoch", done}, {"batch", 0}, {"run_loss", 0.0}, {"run_correct", 0}};
        save_checkpoint(checkpoint(meta(last), true), run + "/last.ck");
        std::string lines;
        for (const json& r : history) lines += r.dump() + "\n";
        write_text_atomic(run + "/metrics.jsonl", lines);
        if (!o.quiet) {
            char val[64] = "";
            if (row.contains("val_acc"))
                std::snprintf(val, sizeof val, "val %.4f / %.2f%%  ", row["val_loss"].get<double>(), 100 * row["val_acc"].get<double>());
            std::printf("epoch %3ld  train %.4f / %.2f%%  %stest %.4f / %.2f%%  %.0f img/s  lr %.3g\n", long(done),
                        row["train_loss"].get<double>(), 100 * row["train_acc"].get<double>(), val, t.loss,
                        100 * t.accuracy, row["samples_per_s"].get<double>(), lr);
            std::fflush(stdout);
        }
        if (g_stop) {
            std::signal(SIGINT, old_handler);
            throw Interrupted("interrupted after epoch " + std::to_string(done) + "; saved " + run +
                              "/last.ck. Resume with: nn-cpp train --resume " + run);
        }
    }
    std::signal(SIGINT, old_handler);
    if (!o.quiet && !history.empty()) {  // the first best, as nn-numba train reports it
        const json* best = &history[0];
        auto score = [](const json& r) { return r.contains("val_acc") ? r["val_acc"] : r["train_acc"]; };
        for (const json& r : history)
            if (score(r).is_number() && (!score(*best).is_number() || score(r).get<double>() > score(*best).get<double>()))
                best = &r;
        auto pct = [&](const char* k) { return best->contains(k) && (*best)[k].is_number() ? 100 * (*best)[k].get<double>() : NAN; };
        std::printf("done: best epoch %s (validation %.2f%%, test %.2f%%) saved in %s/best.ck\n", best->value("epoch", json()).dump().c_str(),
                    pct("val_acc"), pct("test_acc"), run.c_str());
    }
    return run;
}
