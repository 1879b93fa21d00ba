// The maths: gemm against a naive double loop (edge tiles, thread-count independence),
// backward against central finite differences, optimiser and schedule formulas.
#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "check.h"
#include "checkpoint.h"
#include "mlp.h"

// Both kernels against a double loop, on shapes that hit every edge case of the tiling.
static void test_gemm(bool nt) {
    Rng rng(1);
    for (const auto& shape : {std::array<int, 3>{1, 1, 1}, {4, 16, 8}, {7, 37, 13}, {64, 250, 784}, {10, 250, 3},
                              {250, 10, 64}, {5, 2, 17}}) {
        const int M = shape[0], N = shape[1], K = shape[2];  // plain names: lambdas cannot capture bindings (clang, C++17)
        // nt: B is stored N x K (rows are dotted with rows of A); else K x N
        std::vector<float> A(size_t(M) * K), B(size_t(K) * N), C(size_t(M) * N), C2(size_t(M) * N);
        for (auto& x : A) x = float(rng.normal());
        for (auto& x : B) x = float(rng.normal());
        auto b_at = [&](int k, int j) { return nt ? B[size_t(j) * K + k] : B[size_t(k) * N + j]; };
        auto run = [&](float* out) {
            if (nt) gemm_nt(M, N, K, A.data(), K, B.data(), K, out, N);
            else gemm(M, N, K, A.data(), K, B.data(), N, out, N);
        };
        run(C.data());
        double worst = 0;
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                double s = 0, mag = 0;
                for (int k = 0; k < K; k++) {
                    s += double(A[size_t(i) * K + k]) * b_at(k, j);
                    mag += std::abs(double(A[size_t(i) * K + k]) * b_at(k, j));
                }
                worst = std::max(worst, std::abs(C[size_t(i) * N + j] - s) / (mag + 1e-30));
            }
        CHECK(worst < 1e-5);  // float32 sums of K terms, relative to the sum of magnitudes
#ifdef _OPENMP
        // the same bits whatever the number of threads
        int before = omp_get_max_threads();
        omp_set_num_threads(1);
        run(C2.data());
        omp_set_num_threads(2);
        std::vector<float> C3(C.size());
        run(C3.data());
        omp_set_num_threads(before);
        CHECK(C2 == C && C3 == C);
#endif
    }
}

// Loss summed over the batch for the net as it is now.
static double batch_loss(const Net& net, Work& w, const std::vector<float>& X, const std::vector<uint8_t>& y) {
    int nb = int(y.size());
    std::copy(X.begin(), X.end(), w.A[0].begin());
    forward(net, w, nb);
    return loss_grad(w, net, y.data(), nb, false, nullptr);
}

static void test_gradients(bool mean) {
    Rng rng(3);
    Net net = he_init({6, 5, 4, 3}, rng);
    for (auto& b : net.B)
        for (auto& x : b) x = float(0.1 * rng.normal());  // non-zero biases exercise dB too
    const int nb = 4;
    std::vector<float> X(nb * 6);
    for (auto& x : X) x = float(rng.uniform());
    std::vector<uint8_t> y = {0, 2, 1, 2};
    Work w(net, nb);
    std::copy(X.begin(), X.end(), w.A[0].begin());
    forward(net, w, nb);
    loss_grad(w, net, y.data(), nb, mean, nullptr);
    backward(net, w, nb);
    const double scale = mean ? 1.0 / nb : 1.0, h = 1e-3;
    int bad = 0, n = 0;
    for (int l = 0; l < net.layers(); l++)
        for (int isw = 0; isw < 2; isw++) {
            std::vector<float>& P = isw ? net.W[l] : net.B[l];
            const std::vector<float>& G = isw ? w.dW[l] : w.dB[l];
            for (size_t k = 0; k < P.size(); k++) {
                float keep = P[k];
                P[k] = keep + float(h);
                double up = batch_loss(net, w, X, y);
                P[k] = keep - float(h);
                double down = batch_loss(net, w, X, y);
                P[k] = keep;
                double fd = (up - down) / (2 * h) * scale;
                n++;
                if (std::abs(fd - G[k]) > 2e-3 * scale + 2e-2 * std::abs(fd)) {
                    bad++;
                    std::fprintf(stderr, "grad %s%d[%zu]: analytic %.6g, finite difference %.6g\n", isw ? "W" : "B",
                                 l + 1, k, double(G[k]), fd);
                }
            }
        }
    CHECK(n == int(net.n_params()));
    CHECK(bad == 0);
}

static void test_optimizers() {
    // one parameter tensor each of W and B; gradient fixed at g, weight decay on W only
    Rng rng(5);
    Net net = he_init({2, 1}, rng);
    net.W[0] = {0.5f, -1.0f};
    net.B[0] = {0.25f};
    Work w(net, 1);
    w.dW[0] = {0.2f, -0.4f};
    w.dB[0] = {0.1f};
    const double lr = 0.1, wd = 0.01;
    // adam, two steps, against the formula in double
    Net a = net;
    Optimizer adam(2, a);
    adam.wd = float(wd);
    double th = 0.5, m = 0, v = 0;
    for (int t = 1; t <= 2; t++) {
        adam.step(a, w, lr);
        double g = 0.2 + wd * th;
        m = 0.9 * m + 0.1 * g;
        v = 0.999 * v + 0.001 * g * g;
        th -= lr * (m / (1 - std::pow(0.9, t))) / (std::sqrt(v / (1 - std::pow(0.999, t))) + 1e-8);
    }
    CHECK_NEAR(a.W[0][0], th, 1e-6);
    // nesterov momentum, two steps; the bias gets no weight decay
    Net b = net;
    Optimizer mom(1, b);
    mom.nesterov = true;
    mom.momentum = 0.9f;
    mom.wd = float(wd);
    double tb = 0.25, vb = 0;
    for (int t = 0; t < 2; t++) {
        mom.step(b, w, lr);
        vb = 0.9 * vb + 0.1;
        tb -= lr * (0.1 + 0.9 * vb);
    }
    CHECK_NEAR(b.B[0][0], tb, 1e-6);
    // sgd
    Net c = net;
    Optimizer sgd(0, c);
    sgd.step(c, w, lr);
    CHECK_NEAR(c.W[0][1], -1.0 - lr * -0.4, 1e-7);
    CHECK(sgd.state().slots.empty() && mom.state().slots.size() == 1 && adam.state().slots.size() == 2);
}


// ---- train_step against a float64 reference: forward, loss, backward and the optimiser step

struct RefOpt {
    int kind;
    double lr, wd = 0, mu = 0.9;
    bool nesterov = false;
};

// One step in double on params P (W1 B1 W2 B2 ...) with slots S0, S1 at step t; returns the summed loss.
static double ref_step(const std::vector<uint32_t>& sz, std::vector<std::vector<double>>& P,
                       std::vector<std::vector<double>>& S0, std::vector<std::vector<double>>& S1, long t,
                       const std::vector<double>& X, const std::vector<uint8_t>& y, bool mean, const RefOpt& o) {
    const int L = int(sz.size()) - 1, nb = int(y.size());
    std::vector<std::vector<double>> A(L + 1);
    A[0] = X;
    for (int l = 0; l < L; l++) {
        const int in = int(sz[l]), out = int(sz[l + 1]);
        A[l + 1].assign(size_t(nb) * out, 0.0);
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < out; j++) {
                double z = P[2 * l + 1][j];
                for (int k = 0; k < in; k++) z += A[l][size_t(b) * in + k] * P[2 * l][size_t(j) * in + k];
                A[l + 1][size_t(b) * out + j] = l + 1 < L ? std::max(z, 0.0) : z;
            }
    }
    const int C = int(sz[L]);
    double loss = 0;
    std::vector<double> dZ(size_t(nb) * C);
    for (int b = 0; b < nb; b++) {
        const double* z = &A[L][size_t(b) * C];
        double m = *std::max_element(z, z + C), s = 0;
        for (int c = 0; c < C; c++) s += std::exp(z[c] - m);
        loss += std::log(s) - (z[y[b]] - m);
        for (int c = 0; c < C; c++) dZ[size_t(b) * C + c] = (std::exp(z[c] - m) / s - (c == y[b])) * (mean ? 1.0 / nb : 1.0);
    }
    for (int l = L - 1; l >= 0; l--) {
        const int in = int(sz[l]), out = int(sz[l + 1]);
        std::vector<double> gW(size_t(out) * in, 0.0), gB(out, 0.0), dA(size_t(nb) * in, 0.0);
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < out; j++) {
                const double d = dZ[size_t(b) * out + j];
                gB[j] += d;
                for (int k = 0; k < in; k++) {
                    gW[size_t(j) * in + k] += d * A[l][size_t(b) * in + k];
                    dA[size_t(b) * in + k] += d * P[2 * l][size_t(j) * in + k];
                }
            }
        for (int isw = 1; isw >= 0; isw--) {
            const int pi = 2 * l + (isw ? 0 : 1);
            const std::vector<double>& G = isw ? gW : gB;
            for (size_t k = 0; k < G.size(); k++) {
                double& p = P[pi][k];
                const double g = G[k] + (isw ? o.wd * p : 0.0);
                if (o.kind == 0) {
                    p -= o.lr * g;
                } else if (o.kind == 1) {
                    double& m = S0[pi][k];
                    m = o.mu * m + g;
                    p -= o.lr * (o.nesterov ? g + o.mu * m : m);
                } else {
                    double& m = S0[pi][k];
                    double& v = S1[pi][k];
                    m = 0.9 * m + 0.1 * g;
                    v = 0.999 * v + 0.001 * g * g;
                    p -= o.lr * (m / (1 - std::pow(0.9, double(t)))) / (std::sqrt(v / (1 - std::pow(0.999, double(t)))) + 1e-8);
                }
            }
        }
        for (size_t k = 0; k < dA.size(); k++) dA[k] = A[l][k] > 0 ? dA[k] : 0.0;
        dZ = dA;
    }
    return loss;
}

// max |a - b| over a tensor, relative to the largest |b| in it
static double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
    double worst = 0, mag = 1e-12;
    for (size_t k = 0; k < b.size(); k++) {
        worst = std::max(worst, std::abs(double(a[k]) - b[k]));
        mag = std::max(mag, std::abs(b[k]));
    }
    return worst / mag;
}

// A batch of nb samples: `lit` of the pixels non-zero (1 for a dense batch), values in (0, 1].
static std::vector<float> batch_of(Rng& rng, int nb, int n0, double lit) {
    std::vector<float> X(size_t(nb) * n0);
    for (auto& x : X) x = rng.uniform() < lit ? float(1.0 - rng.uniform()) : 0.0f;
    return X;
}

// Three train_steps (a sparse batch, a dense one, a small sparse one, so both paths of the first
// layer and both moves of its layout run) against the reference; then the same with 2 and 3
// threads gives the same bits as with 1 (with 3, the weight steps' bands of rows are unequal where
// a layer's row blocks do not divide by 3, and the static schedule's shares cut into a band).
static void test_train_step(const std::vector<uint32_t>& sz, const RefOpt& o, bool mean) {
    Rng rng(7);
    Net net0 = he_init(sz, rng);
    for (auto& b : net0.B)
        for (auto& x : b) x = float(0.1 * rng.normal());
    const int n0 = int(sz[0]), C = int(sz.back());
    struct Batch {
        std::vector<float> X;
        std::vector<uint8_t> y;
    };
    std::vector<Batch> batches;
    for (auto [nb, lit] : {std::pair<int, double>{13, 0.2}, {13, 1.0}, {3, 0.2}}) {
        Batch b{batch_of(rng, nb, n0, lit), {}};
        for (int i = 0; i < nb; i++) b.y.push_back(uint8_t(rng.below(C)));
        batches.push_back(b);
    }
    auto run = [&](int threads, Net& net, Optimizer& opt, std::vector<double>* losses) {
#ifdef _OPENMP
        int before = omp_get_max_threads();
        omp_set_num_threads(threads);
#else
        (void)threads;
#endif
        opt.momentum = float(o.mu);
        opt.nesterov = o.nesterov;
        opt.wd = float(o.wd);
        Work w(net, 13);
        for (const Batch& b : batches) {
            std::copy(b.X.begin(), b.X.end(), w.A[0].begin());
            int hits = -1;
            losses->push_back(train_step(net, w, opt, b.y.data(), int(b.y.size()), mean, o.lr, &hits));
            CHECK(hits >= 0 && hits <= int(b.y.size()));
            for (int l = 1; l <= net.layers(); l++)  // the kernels read whole vectors: the padding stays zero
                for (size_t r = 0; r < b.y.size(); r++)
                    for (int k = int(net.sizes[l]); k < w.ld[l]; k++) CHECK(w.H[l][r * w.ld[l] + k] == 0.0f);
        }
        sync(net, w, opt);
#ifdef _OPENMP
        omp_set_num_threads(before);
#endif
    };
    Net net = net0;
    Optimizer opt(o.kind, net);
    std::vector<double> losses;
    run(1, net, opt, &losses);

    std::vector<std::vector<double>> P, S0, S1;
    for (int l = 0; l < net0.layers(); l++)
        for (const auto* p : {&net0.W[l], &net0.B[l]}) {
            P.emplace_back(p->begin(), p->end());
            S0.emplace_back(p->size(), 0.0);
            S1.emplace_back(p->size(), 0.0);
        }
    for (size_t i = 0; i < batches.size(); i++) {
        std::vector<double> X(batches[i].X.begin(), batches[i].X.end());
        double want = ref_step(sz, P, S0, S1, long(i + 1), X, batches[i].y, mean, o);
        CHECK_NEAR(losses[i], want, 1e-5 * std::abs(want) + 1e-6);
    }
    double worst = 0;
    for (int l = 0; l < net.layers(); l++) {
        worst = std::max({worst, rel_err(net.W[l], P[2 * l]), rel_err(net.B[l], P[2 * l + 1])});
        if (o.kind >= 1) worst = std::max({worst, rel_err(opt.slot0[2 * l], S0[2 * l]), rel_err(opt.slot0[2 * l + 1], S0[2 * l + 1])});
        if (o.kind == 2) worst = std::max({worst, rel_err(opt.slot1[2 * l], S1[2 * l]), rel_err(opt.slot1[2 * l + 1], S1[2 * l + 1])});
    }
    if (!(worst < 1e-4))
        std::fprintf(stderr, "train_step %s kind %d wd %g nesterov %d mean %d: error %.3g\n", sizes_str(sz).c_str(), o.kind,
                     o.wd, int(o.nesterov), int(mean), worst);
    CHECK(worst < 1e-4);
    CHECK(opt.t == 3);

    for (int threads : {2, 3}) {
        Net net2 = net0;
        Optimizer opt2(o.kind, net2);
        std::vector<double> losses2;
        run(threads, net2, opt2, &losses2);
        CHECK(losses2 == losses);
        CHECK(net2.W == net.W && net2.B == net.B);
        CHECK(opt2.state().slots == opt.state().slots);
    }
}

// load_batch: the chosen rows as u8 / 255 (numpy's float32 bits), every byte value, rows whose width is
// not a multiple of the vector width, and enough rows that the threads share them.
static void test_load_batch() {
    Rng rng(11);
#ifdef _OPENMP
    const int before = omp_get_max_threads();
#endif
    for (uint32_t n_in : {300u, 784u}) {
        Net net = he_init({n_in, 5, 3}, rng);
        const int rows = 70, nb = 40;
        std::vector<uint8_t> px(size_t(rows) * n_in);
        for (size_t i = 0; i < px.size(); i++) px[i] = uint8_t(i < 256 ? i : rng.below(256));  // row 0: 0 .. 255
        std::vector<uint32_t> idx(nb);
        for (int b = 0; b < nb; b++) idx[b] = b == 0 ? 0u : uint32_t(rng.below(rows));
        for (int threads : {1, 2}) {
#ifdef _OPENMP
            omp_set_num_threads(threads);
#else
            (void)threads;
#endif
            Work w(net, nb);
            load_batch(w, px.data(), int(n_in), idx.data(), nb);
            int bad = 0;
            for (int b = 0; b < nb; b++)
                for (uint32_t k = 0; k < n_in; k++)
                    bad += w.A[0][size_t(b) * n_in + k] != float(px[size_t(idx[b]) * n_in + k]) / 255.0f;
            CHECK(bad == 0);
        }
    }
#ifdef _OPENMP
    omp_set_num_threads(before);
#endif
}

// While train_step holds W1 transposed, whatever reads net.W[0] or the W1 slots refuses to;
// after sync they read what train_step trained.
static void test_sync_rule() {
    Rng rng(9);
    Net net = he_init({20, 5, 3}, rng);
    Optimizer opt(2, net);
    Work w(net, 6);
    std::vector<uint8_t> px(6 * 20, 0), y = {0, 1, 2, 0, 1, 2};
    for (int i = 0; i < 6; i++) px[i * 20 + i] = 200;  // one lit pixel each: the sparse path
    std::vector<uint32_t> idx = {0, 1, 2, 3, 4, 5};
    load_batch(w, px.data(), 20, idx.data(), 6);
    const std::vector<float> before = net.W[0];
    train_step(net, w, opt, y.data(), 6, true, 0.1, nullptr);
    CHECK(net.w1_lent && opt.w1_lent);
    expect_error("evaluate before sync", [&] { evaluate(net, px.data(), y.data(), 6); }, "call sync");
    expect_error("state before sync", [&] { opt.state(); }, "call sync");
    sync(net, w, opt);
    CHECK(!net.w1_lent && !opt.w1_lent && net.W[0] != before);
    CHECK(evaluate(net, px.data(), y.data(), 6).n == 6 && opt.state().slots.size() == 2);
}

static void test_schedule() {
    Schedule s;
    s.kind = "cosine";
    s.lr = 1.0;
    s.min_lr = 0.1;
    s.warmup = 10;
    s.total = 110;
    CHECK_NEAR(s.at(0), 0.1, 1e-12);  // (s + 1) / Wu
    CHECK_NEAR(s.at(9), 1.0, 1e-12);
    CHECK_NEAR(s.at(10), 1.0, 1e-12);
    CHECK_NEAR(s.at(60), 0.55, 1e-12);
    CHECK_NEAR(s.at(110), 0.1, 1e-12);
    CHECK_NEAR(s.at(500), 0.1, 1e-12);  // past the end (a resumed run trained longer): stays at min_lr
    s.kind = "step";
    s.warmup = 0;
    s.gamma = 0.5;
    s.step_epochs = 2;
    s.steps_per_epoch = 10;
    CHECK_NEAR(s.at(19), 1.0, 1e-12);  // epoch 1
    CHECK_NEAR(s.at(20), 0.5, 1e-12);  // epoch 2
    CHECK_NEAR(s.at(55), 0.25, 1e-12);  // epoch 5
    s.kind = "constant";
    CHECK_NEAR(s.at(1000), 1.0, 1e-12);
}

static void test_rng() {
    Rng r(11);
    std::vector<uint32_t> v(1000);
    std::iota(v.begin(), v.end(), 0u);
    r.shuffle(v);
    std::vector<uint32_t> s = v;
    std::sort(s.begin(), s.end());
    bool moved = false;
    for (uint32_t i = 0; i < 1000; i++) {
        CHECK(s[i] == i);
        moved |= v[i] != i;
    }
    CHECK(moved);
    double sum = 0, sq = 0;
    for (int i = 0; i < 100000; i++) {
        double x = r.normal();
        sum += x;
        sq += x * x;
    }
    CHECK_NEAR(sum / 1e5, 0.0, 0.02);
    CHECK_NEAR(sq / 1e5, 1.0, 0.02);
    Rng a(5), b(5);
    CHECK(a.next() == b.next());
}

// Layers narrower than a tile, and just wider than a vector or half a tile at each width (4, 8 and
// 16 lanes: tiles of 8, 16 and 64 columns): the input gradient's ragged column block must read only
// inside W (a sanitizer build at that width sees a read past it) and sum what the reference sums. The
// hidden width h is the input of the last layer (10 outputs), then of a middle layer (h x 9 -> 2).
static void test_ragged_widths() {
    for (uint32_t h : {1u, 2u, 3u, 4u, 5u, 7u, 8u, 9u, 15u, 16u, 17u, 31u, 32u, 33u, 63u, 65u})
        for (const auto& sz : {std::vector<uint32_t>{21, h, 10}, {21, 9, h, 2}})
            for (RefOpt o : {RefOpt{0, 0.05}, RefOpt{2, 1e-3, 0.01}}) test_train_step(sz, o, true);
}

// `test_mlp ragged` runs test_ragged_widths alone (ctest: step_ragged_widths); no argument, the rest.
int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "ragged") {
        test_ragged_widths();
        return finish("test_mlp ragged");
    }
    test_gemm(false);
    test_gemm(true);
    test_gradients(false);
    test_gradients(true);
    test_optimizers();
    // {60, 130, 40, 10}: 22 and 7 row blocks of W, bands of 8, 8, 6 and 3, 3, 1 at 3 threads
    for (const auto& sz : {std::vector<uint32_t>{40, 70, 19, 10}, {100, 250, 70, 10}, {60, 130, 40, 10}, {30, 7}})
        for (RefOpt o : {RefOpt{0, 0.05}, RefOpt{0, 0.05, 0.01}, RefOpt{1, 0.05}, RefOpt{1, 0.05, 0.01, 0.9, true},
                         RefOpt{2, 1e-3}, RefOpt{2, 1e-3, 0.01}})
            for (bool mean : {true, false}) test_train_step(sz, o, mean);
    test_load_batch();
    test_sync_rule();
    test_schedule();
    test_rng();
    return finish("test_mlp");
}
