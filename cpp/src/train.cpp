#include "train.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <sys/resource.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "checkpoint.h"
#include "error.h"
#include "idx.h"
#include "json.h"
#include "mlp.h"

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
// CPU seconds of the whole process (all threads): on a shared machine wall time also counts
// the time other programs hold the cores, CPU time does not.
double cpu_seconds() {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

int optimizer_kind(const std::string& s) {
    if (s == "sgd") return 0;
    if (s == "momentum") return 1;
    if (s == "adam") return 2;
    throw NNError("unknown optimizer '" + s + "' (use sgd, momentum or adam)");
}

std::string now_iso() {
    char b[32];
    std::time_t t = std::time(nullptr);
    std::strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
    return b;
}

std::string config_json(const TrainConfig& c) {
    std::string sz = "[";
    for (size_t i = 0; i < c.sizes.size(); i++) sz += (i ? "," : "") + std::to_string(c.sizes[i]);
    sz += "]";
    return "{\"epochs\":" + std::to_string(c.epochs) + ",\"batch_size\":" + std::to_string(c.batch) +
           ",\"lr\":" + json_num(c.lr) + ",\"optimizer\":" + json_str(c.optimizer) +
           ",\"momentum\":" + json_num(c.momentum) + ",\"nesterov\":" + (c.nesterov ? "true" : "false") +
           ",\"weight_decay\":" + json_num(c.weight_decay) + ",\"reduction\":" + json_str(c.reduction) +
           ",\"schedule\":" + json_str(c.schedule) + ",\"warmup_epochs\":" + json_num(c.warmup_epochs) +
           ",\"min_lr\":" + json_num(c.min_lr) + ",\"gamma\":" + json_num(c.gamma) +
           ",\"step_epochs\":" + std::to_string(c.step_epochs) + ",\"val_split\":" + json_num(c.val_split) +
           ",\"seed\":" + std::to_string(c.seed) + ",\"sizes\":" + sz + ",\"limit\":" + std::to_string(c.limit) +
           ",\"shuffle\":" + (c.shuffle ? "true" : "false") + ",\"init\":" + json_str(c.init) +
           ",\"data_dir\":" + json_str(c.data_dir) + "}";
}

// One epoch over `order` in mini-batches (the last, smaller batch is kept).
// Returns the summed loss; *hits gets the number of correct training predictions.
double run_epoch(Net& net, Work& w, Optimizer& opt, const Schedule& sch, long* step, int epoch,
                 const uint8_t* pixels, const uint8_t* labels, const std::vector<uint32_t>& order, int batch,
                 bool mean, long* hits, double* last_lr) {
    std::vector<uint8_t> y(std::min<size_t>(size_t(batch), order.size()));
    double loss = 0;
    const int n_in = int(net.sizes[0]);
    for (size_t s = 0; s < order.size(); s += batch) {
        int nb = int(std::min<size_t>(batch, order.size() - s));
        load_batch(w, pixels, n_in, order.data() + s, nb);
        for (int b = 0; b < nb; b++) y[b] = labels[order[s + b]];
        forward(net, w, nb);
        int h;
        loss += loss_grad(w, net, y.data(), nb, mean, &h);
        *hits += h;
        backward(net, w, nb);
        *last_lr = sch.at(*step, epoch);
        opt.step(net, w, *last_lr);
        ++*step;
    }
    return loss;
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

double train(const TrainConfig& cfg) {
    use_threads(cfg.threads);
    const int kind = optimizer_kind(cfg.optimizer);
    if (cfg.reduction != "sum" && cfg.reduction != "mean")
        throw NNError("unknown reduction '" + cfg.reduction + "' (use sum or mean)");
    if (cfg.schedule != "constant" && cfg.schedule != "cosine" && cfg.schedule != "step")
        throw NNError("unknown schedule '" + cfg.schedule + "' (use constant, cosine or step)");
    if (cfg.epochs < 1 || cfg.batch < 1) throw NNError("--epochs and --batch-size must be at least 1");
    if (!(cfg.val_split >= 0 && cfg.val_split < 1)) throw NNError("--val-split must be in [0, 1)");
    if (cfg.out.empty()) throw NNError("--out FILE.ck is required");
    // Fail now rather than after the first epoch, and never replace a checkpoint by accident.
    struct stat st;
    if (::stat(cfg.out.c_str(), &st) == 0 && !cfg.force)
        throw file_error(cfg.out, "already exists; choose another --out or pass --force to overwrite it");
    std::string dir = cfg.out.find('/') == std::string::npos ? "." : cfg.out.substr(0, cfg.out.rfind('/'));
    if (dir.empty()) dir = "/";
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw file_error(cfg.out, "its folder " + dir + " does not exist; create it first");

    Rng rng(cfg.seed);
    Net net;
    if (!cfg.init.empty()) {
        net = net_from_checkpoint(load_checkpoint(cfg.init, cfg.sizes_given ? cfg.sizes : std::vector<uint32_t>{}));
    } else {
        net = he_init(cfg.sizes, rng);
    }
    TrainConfig conf = cfg;
    conf.sizes = net.sizes;
    check_mnist_net(net.sizes, cfg.init.empty() ? "--sizes" : cfg.init);
    Dataset tr = load_mnist(cfg.data_dir, true);
    Dataset te = load_mnist(cfg.data_dir, false);

    // The validation split: the last val_split * N samples of a permutation fixed by the seed.
    uint32_t N = tr.images.n;
    if (cfg.limit > 0 && cfg.limit < long(N)) N = uint32_t(cfg.limit);
    std::vector<uint32_t> all(N);
    for (uint32_t i = 0; i < N; i++) all[i] = i;
    if (cfg.shuffle) rng.shuffle(all);
    const uint32_t n_val = uint32_t(std::llround(cfg.val_split * N));
    if (n_val >= N) throw NNError("--val-split leaves no training samples");
    std::vector<uint32_t> train_idx(all.begin(), all.end() - n_val), val_idx(all.end() - n_val, all.end());

    const long steps_per_epoch = (long(train_idx.size()) + cfg.batch - 1) / cfg.batch;
    Schedule sch;
    sch.kind = cfg.schedule;
    sch.lr = cfg.lr;
    sch.min_lr = cfg.min_lr;
    sch.gamma = cfg.gamma;
    sch.step_epochs = cfg.step_epochs;
    sch.warmup = Schedule::warmup_steps(cfg.warmup_epochs, steps_per_epoch);
    sch.total = steps_per_epoch * cfg.epochs;

    Optimizer opt(kind, net);
    opt.momentum = float(cfg.momentum);
    opt.nesterov = cfg.nesterov;
    opt.wd = float(cfg.weight_decay);
    Work w(net, int(std::min<size_t>(size_t(cfg.batch), train_idx.size())));  // a batch is never larger

    if (!cfg.quiet)
        std::printf("nn-cpp train: %s, %zu train / %zu val / %u test, %s lr %g, batch %d, %d epochs\n",
                    sizes_str(net.sizes).c_str(), train_idx.size(), val_idx.size(), te.images.n,
                    cfg.optimizer.c_str(), cfg.lr, cfg.batch, cfg.epochs);
    long step = 0;
    double best_val = -1, best_test = 0;
    std::string history;
    for (int epoch = 0; epoch < cfg.epochs; epoch++) {
        auto t0 = Clock::now();
        if (cfg.shuffle) rng.shuffle(train_idx);  // a fresh order every epoch
        long hits = 0;
        double lr_now = cfg.lr;
        double tl = run_epoch(net, w, opt, sch, &step, epoch, tr.images.pixels.data(), tr.labels.data(), train_idx,
                              cfg.batch, cfg.reduction == "mean", &hits, &lr_now);
        double secs = since(t0);
        Eval val;
        bool has_val = !val_idx.empty();
        if (has_val) val = evaluate(net, tr.images.pixels.data(), tr.labels.data(), tr.images.n, val_idx);
        Eval test = evaluate(net, te.images.pixels.data(), te.labels.data(), te.images.n);
        double train_loss = tl / double(train_idx.size()), train_acc = double(hits) / double(train_idx.size());
        std::string rec = "{\"epoch\":" + std::to_string(epoch + 1) + ",\"step\":" + std::to_string(step) +
                          ",\"lr\":" + json_num(lr_now) + ",\"train_loss\":" + json_num(train_loss) +
                          ",\"train_acc\":" + json_num(train_acc) +
                          ",\"val_loss\":" + (has_val ? json_num(val.loss) : "null") +
                          ",\"val_acc\":" + (has_val ? json_num(val.accuracy) : "null") +
                          ",\"test_loss\":" + json_num(test.loss) + ",\"test_acc\":" + json_num(test.accuracy) +
                          ",\"seconds\":" + json_num(secs, 4) + "}";
        history += (history.empty() ? "" : ",") + rec;
        if (!cfg.quiet) {
            char vs[64] = "-";
            if (has_val) std::snprintf(vs, sizeof vs, "loss %.4f acc %.4f", val.loss, val.accuracy);
            std::printf("epoch %2d  train loss %.4f acc %.4f  val %s  test loss %.4f acc %.4f  %.2fs\n", epoch + 1,
                        train_loss, train_acc, vs, test.loss, test.accuracy, secs);
        }
        // best on validation accuracy, never on test; without validation keep the latest
        if (!has_val || val.accuracy > best_val) {
            best_val = has_val ? val.accuracy : best_val;
            best_test = test.accuracy;
            Checkpoint ck;
            ck.sizes = net.sizes;
            ck.W = net.W;
            ck.B = net.B;
            ck.has_optim = true;
            ck.optim = opt.state();
            ck.meta = "{\"producer\":\"nn-cpp 0.1.0\",\"created\":" + json_str(now_iso()) +
                      ",\"epoch\":" + std::to_string(epoch + 1) + ",\"step\":" + std::to_string(step) +
                      ",\"val_acc\":" + (has_val ? json_num(val.accuracy) : "null") +
                      ",\"val_loss\":" + (has_val ? json_num(val.loss) : "null") +
                      ",\"test_acc\":" + json_num(test.accuracy) + ",\"test_loss\":" + json_num(test.loss) +
                      ",\"best_val_acc\":" + (has_val ? json_num(best_val) : "null") +
                      ",\"config\":" + config_json(conf) + ",\"history\":[" + history + "]}";
            save_checkpoint(ck, cfg.out);
            if (!cfg.quiet) std::printf("          saved %s\n", cfg.out.c_str());
        }
        std::fflush(stdout);
    }
    return best_test;
}

BenchResult bench(int batch, int threads, int epochs, const std::vector<uint32_t>& sizes, const std::string& optimizer) {
    const int used = use_threads(threads);
    // Random pixels and labels: timing does not depend on the values (no sparsity
    // tricks), and the benchmark then needs no dataset.
    const uint32_t N = 60000;
    Rng rng(1234);
    std::vector<uint8_t> px(size_t(N) * sizes[0]), y(N);
    for (size_t i = 0; i < px.size(); i += 8) {  // eight random bytes per draw
        uint64_t r = rng.next();
        for (size_t k = i; k < std::min(px.size(), i + 8); k++, r >>= 8) px[k] = uint8_t(r);
    }
    for (auto& l : y) l = uint8_t(rng.below(sizes.back()));
    Net net = he_init(sizes, rng);
    Optimizer opt(optimizer_kind(optimizer), net);
    Work w(net, batch);
    Schedule sch;
    sch.total = long(epochs) * ((N + batch - 1) / batch);
    std::vector<uint32_t> order(N);
    for (uint32_t i = 0; i < N; i++) order[i] = i;
    long step = 0, hits = 0;
    double lr, best = 1e30, best_cpu = 1e30;
    for (int e = 0; e < epochs; e++) {
        rng.shuffle(order);
        auto t0 = Clock::now();
        double c0 = cpu_seconds();
        run_epoch(net, w, opt, sch, &step, e, px.data(), y.data(), order, batch, true, &hits, &lr);
        best = std::min(best, since(t0));  // fastest epoch: least disturbed by other load
        best_cpu = std::min(best_cpu, cpu_seconds() - c0);
    }
    return {best, N / best, best_cpu, used};
}
