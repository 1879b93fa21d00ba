// The shared test vectors (tests/vectors/vectors.json, written from the float64 reference tests/reference.py
// and also checked by tests/test_vectors.py): a change of the maths on one side that the other does not
// follow fails here or there. One function per section of the file: network, schedule, rng, augment.
#include <array>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "augment.h"
#include "check.h"
#include "file.h"
#include "minijson.h"
#include "mlp.h"
#include "rng.h"

static bool has(const JVal& o, const std::string& k) { return o.obj.count(k) > 0; }

static std::vector<float> floats(const JVal& a) {  // float32 inputs, written exactly as doubles
    std::vector<float> v;
    for (const JVal& x : a.arr) v.push_back(float(x.num));
    return v;
}

// Largest error relative to the largest reference value.
static double rel(const std::vector<float>& got, const JVal& want) {
    double err = 0, mag = 1e-30;
    for (size_t i = 0; i < want.arr.size(); i++) {
        err = std::max(err, std::abs(double(got.at(i)) - want.arr[i].num));
        mag = std::max(mag, std::abs(want.arr[i].num));
    }
    return err / mag;
}

struct Fixture {
    Net net;
    std::vector<float> X;
    std::vector<uint8_t> y;
    int nb;
};

static Fixture fixture(const JVal& v) {
    Fixture f;
    for (const JVal& s : v["sizes"].arr) f.net.sizes.push_back(uint32_t(s.num));
    for (int l = 0; l < f.net.layers(); l++) {
        f.net.W.push_back(floats(v["W"][l]));
        f.net.B.push_back(floats(v["b"][l]));
    }
    f.X = floats(v["X"]);
    for (const JVal& c : v["y"].arr) f.y.push_back(uint8_t(c.num));
    f.nb = int(v["batch"].num);
    return f;
}

// Forward, loss and backward of one batch in w; returns the mean per-sample loss.
static double pass(const Fixture& f, const Net& net, Work& w, bool mean) {
    std::copy(f.X.begin(), f.X.end(), w.A[0].begin());
    forward(net, w, f.nb);
    int correct = 0;
    double loss = loss_grad(w, net, f.y.data(), f.nb, mean, &correct);
    backward(net, w, f.nb);
    return loss / f.nb;
}

static void test_network(const JVal& v) {
    const Fixture f = fixture(v);
    for (bool mean : {false, true}) {
        Work w(f.net, f.nb);
        CHECK_NEAR(pass(f, f.net, w, mean), v["loss"].num, 1e-6 * v["loss"].num);
        for (int l = 0; l < f.net.layers(); l++) CHECK(rel(w.A[l + 1], v["acts"][l]) < 1e-5);
        const JVal& g = v[mean ? "grad_mean" : "grad_sum"];
        for (int l = 0; l < f.net.layers(); l++) {
            CHECK(rel(w.dW[l], g["W"][l]) < 1e-5);
            CHECK(rel(w.dB[l], g["b"][l]) < 1e-5);
        }
    }
    // two steps of every optimiser, with and without weight decay and Nesterov, for both reductions
    for (const JVal& c : v["steps"].arr) {
        const std::string name = c["optim"].str;
        Net net = f.net;
        Optimizer opt(name == "sgd" ? 0 : name == "momentum" ? 1 : 2, net);
        opt.wd = float(c["weight_decay"].num);
        if (has(c, "momentum")) opt.momentum = float(c["momentum"].num);
        if (has(c, "nesterov")) opt.nesterov = c["nesterov"].num != 0;
        if (has(c, "beta1")) opt.beta1 = c["beta1"].num;
        if (has(c, "beta2")) opt.beta2 = c["beta2"].num;
        if (has(c, "eps")) opt.eps = c["eps"].num;
        Work w(net, f.nb);
        for (const JVal& want : c["after"].arr) {
            pass(f, net, w, c["reduction"].str == "mean");
            opt.step(net, w, c["lr"].num);
            for (int l = 0; l < net.layers(); l++) {
                double eW = rel(net.W[l], want["W"][l]), eB = rel(net.B[l], want["b"][l]);
                CHECK(eW < 1e-5 && eB < 1e-5);
                if (!(eW < 1e-5 && eB < 1e-5))
                    std::fprintf(stderr, "  %s %s wd %g layer %d: W %.3g b %.3g\n", name.c_str(),
                                 c["reduction"].str.c_str(), opt.wd, l, eW, eB);
            }
        }
    }
}

// A key the case leaves out takes the Schedule default, which must be the contract's.
static void test_schedule(const JVal& cases) {
    for (const JVal& c : cases.arr) {
        const long spe = long(c["steps_per_epoch"].num);
        Schedule s;
        s.kind = c["name"].str;
        s.lr = c["lr"].num;
        if (has(c, "gamma")) s.gamma = c["gamma"].num;
        if (has(c, "min_lr")) s.min_lr = c["min_lr"].num;
        if (has(c, "step_epochs")) s.step_epochs = int(c["step_epochs"].num);
        s.warmup = Schedule::warmup_steps(c["warmup_epochs"].num, spe);
        s.steps_per_epoch = spe;
        s.total = long(c["epochs"].num) * spe;
        CHECK(s.warmup == long(c["warmup_steps"].num));
        for (const JVal& at : c["at"].arr) {
            const long step = long(at[0].num);
            CHECK_NEAR(s.at(step), at[1].num, 1e-12 * at[1].num);
        }
    }
}

static uint64_t hex(const JVal& x) { return std::strtoull(x.str.c_str(), nullptr, 16); }

// The counter-based generator: mix, bits and uniform, permutations, the split.
static void test_rng(const JVal& v) {
    for (const JVal& m : v["mix"].arr) CHECK(mix64(hex(m[0])) == hex(m[1]));
    for (const JVal& c : v["uniform"].arr) {
        const auto args = std::array<uint64_t, 5>{uint64_t(c["seed"].num), uint64_t(c["stream"].num),
                                                  uint64_t(c["epoch"].num), uint64_t(c["i"].num), uint64_t(c["k"].num)};
        CHECK(rng_bits(args[0], args[1], args[2], args[3], args[4]) == hex(c["bits"]));
        CHECK(rng_uniform(args[0], args[1], args[2], args[3], args[4]) == c["u"].num);  // exact
    }
    const uint64_t seed = uint64_t(v["seed"].num);
    for (const JVal& c : v["perm"].arr) {
        std::vector<uint32_t> want;
        for (const JVal& x : c["p"].arr) want.push_back(uint32_t(x.num));
        CHECK(rng_perm(uint32_t(c["n"].num), seed, uint64_t(c["stream"].num), uint64_t(c["epoch"].num)) == want);
    }
    std::vector<uint32_t> tr, va, want_tr, want_va;
    rng_split(uint32_t(v["split"]["n"].num), v["split"]["val_split"].num, seed, &tr, &va);
    for (const JVal& x : v["split"]["train"].arr) want_tr.push_back(uint32_t(x.num));
    for (const JVal& x : v["split"]["val"].arr) want_va.push_back(uint32_t(x.num));
    CHECK(tr == want_tr && va == want_va);
}

static Augment augment_of(const JVal& a) {
    Augment g;
    auto get = [&](const char* k, double d) { return has(a, k) ? a[k].num : d; };
    g.shift = int(get("shift", 0)), g.rotate = get("rotate", 0), g.scale = get("scale", 0);
    g.elastic_alpha = get("alpha", 0), g.elastic_sigma = get("sigma", 4);
    return g;
}

// The draws of given (epoch, position) and the image those draws make: exact draws, pixels to 1e-5.
static void test_augment(const JVal& v) {
    const uint64_t seed = uint64_t(v["seed"].num);
    for (const JVal& c : v["draws"].arr) {
        const Augment g = augment_of(v["augs"][c["aug"].str]);
        const Draws d = augment_draws(g, seed, uint64_t(c["epoch"].num), uint64_t(c["q"].num));
        CHECK(d.dx == int(c["dx"].num) && d.dy == int(c["dy"].num));
        CHECK(d.angle == c["angle"].num && d.scale == c["scale"].num);
        CHECK(d.field == floats(c["field"]) && (c["G"].num == 0 || g.grid() == int(c["G"].num)));
    }
    std::vector<uint8_t> image;
    for (const JVal& x : v["image"].arr) image.push_back(uint8_t(x.num));
    for (const JVal& c : v["images"].arr) {
        const Augment g = augment_of(v["augs"][c["aug"].str]);
        const JVal& dj = c["draws"];
        Draws d;
        d.dx = int(dj["dx"].num), d.dy = int(dj["dy"].num), d.angle = dj["angle"].num, d.scale = dj["scale"].num;
        d.field = floats(dj["field"]);
        std::vector<float> out(784);
        augment_one(image.data(), g, d, out.data());
        double err = 0;
        for (size_t i = 0; i < out.size(); i++) err = std::max(err, std::abs(double(out[i]) - c["out"][i].num));
        CHECK(err <= 1e-5);
        if (!(err <= 1e-5)) std::fprintf(stderr, "  augment %s: max error %.3g\n", c["aug"].str.c_str(), err);
    }
}

int main() {
    try {
        const std::vector<uint8_t> bytes = read_file(NN_TEST_VECTORS);
        const std::string text(bytes.begin(), bytes.end());
        const char* p = text.c_str();
        const JVal v = jparse(p);
        test_network(v["network"]);
        test_schedule(v["schedule"]);
        test_rng(v["rng"]);
        test_augment(v["augment"]);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 1;
    }
    return finish("test_vectors");
}
