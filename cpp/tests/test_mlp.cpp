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
#include "mlp.h"

// Both kernels against a double loop, on shapes that hit every edge case of the tiling.
static void test_gemm(bool nt) {
    Rng rng(1);
    for (auto [M, N, K] : {std::array<int, 3>{1, 1, 1}, {4, 16, 8}, {7, 37, 13}, {64, 250, 784}, {10, 250, 3},
                           {250, 10, 64}, {5, 2, 17}}) {
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

int main() {
    test_gemm(false);
    test_gemm(true);
    test_gradients(false);
    test_gradients(true);
    test_optimizers();
    test_schedule();
    test_rng();
    return finish("test_mlp");
}
