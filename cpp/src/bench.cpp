#include "bench.h"

#include <algorithm>
#include <chrono>
#include <sys/resource.h>

#include "idx.h"
#include "mlp.h"
#include "train.h"

namespace {

using Clock = std::chrono::steady_clock;

// CPU seconds of the whole process (all threads): on a shared machine wall time also counts
// the time other programs hold the cores, CPU time does not.
double cpu_seconds() {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// 60,000 random images whose pixels are all non-zero (the dense path) and random labels.
Dataset random_images(const std::vector<uint32_t>& sizes, Rng& rng) {
    Dataset d;
    d.images.n = 60000;
    d.images.pixels.resize(size_t(d.images.n) * sizes[0]);
    auto& px = d.images.pixels;
    for (size_t i = 0; i < px.size(); i += 8) {  // eight pixels per draw, each 1 + a byte mod 255
        uint64_t r = rng.next();
        for (size_t k = i; k < std::min(px.size(), i + 8); k++, r >>= 8) px[k] = uint8_t(1 + (r & 0xff) % 255);
    }
    d.labels.resize(d.images.n);
    for (auto& l : d.labels) l = uint8_t(rng.below(sizes.back()));
    return d;
}

// One pass over `order` in mini-batches, as the trainer runs it: gather, then train_step.
double epoch(Net& net, Work& w, Optimizer& opt, const uint8_t* px, const std::vector<uint8_t>& labels,
             const std::vector<uint32_t>& order, int batch, double lr) {
    std::vector<uint8_t> y(batch);
    const int n_in = int(net.sizes[0]);
    double loss = 0;
    for (size_t s = 0; s < order.size(); s += batch) {
        const int nb = int(std::min<size_t>(batch, order.size() - s));
        load_batch(w, px, n_in, order.data() + s, nb);
        for (int b = 0; b < nb; b++) y[b] = labels[order[s + b]];
        loss += train_step(net, w, opt, y.data(), nb, true, lr, nullptr);
    }
    return loss / double(order.size());
}

}  // namespace

BenchResult bench(const BenchConfig& cfg) {
    const int used = use_threads(cfg.threads);
    const int kind = optimizer_kind(cfg.optimizer);
    Rng rng(1234);
    if (!cfg.data_dir.empty()) check_mnist_net(cfg.sizes, "--sizes");
    const Dataset d = cfg.data_dir.empty() ? random_images(cfg.sizes, rng) : load_mnist(cfg.data_dir, true);
    const uint32_t N = d.images.n;
    const auto px = huge_copy(d.images.pixels);  // as nn-cpp train keeps them
    Net net = he_init(cfg.sizes, rng);
    Optimizer opt(kind, net);
    Work w(net, cfg.batch);
    const double lr = kind == 2 ? 1e-3 : 1e-2;
    std::vector<uint32_t> order(N);
    for (uint32_t i = 0; i < N; i++) order[i] = i;
    rng.shuffle(order);
    epoch(net, w, opt, px.get(), d.labels,
          std::vector<uint32_t>(order.begin(), order.begin() + std::min<uint32_t>(N, 6000)), cfg.batch, lr);  // warm-up: caches, page faults, the first layer's layout
    BenchResult r{1e30, 0, 1e30, 0, used, N, cfg.data_dir.empty() ? "random" : "mnist"};
    for (int e = 0; e < cfg.epochs; e++) {
        rng.shuffle(order);
        const auto t0 = Clock::now();
        const double c0 = cpu_seconds();
        r.loss = epoch(net, w, opt, px.get(), d.labels, order, cfg.batch, lr);
        // the fastest epoch: the one least disturbed by other load
        r.seconds_per_epoch = std::min(r.seconds_per_epoch, std::chrono::duration<double>(Clock::now() - t0).count());
        r.cpu_seconds_per_epoch = std::min(r.cpu_seconds_per_epoch, cpu_seconds() - c0);
    }
    r.samples_per_s = N / r.seconds_per_epoch;
    return r;
}
