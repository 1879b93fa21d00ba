// The MLP of docs/training.md: Z_l = A_{l-1} W_l^T + B_l, ReLU between layers,
// softmax cross-entropy on the logits, backward pass, optimisers and LR schedule.
//
// Layout: every matrix is row-major. Activations are batch x features. W_l is
// out x in exactly as in the checkpoint file, so a checkpoint loads with a copy.
// The forward product A W^T is a register-tiled dot-product kernel (gemm_nt) over rows
// of A and W as stored; the two backward products (dZ^T A and dZ W) go through a
// register-tiled C = A B kernel (gemm). Each output element is summed by one thread
// in a fixed order, so results are bit-identical for any thread count.
#pragma once
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "checkpoint.h"

struct Net {
    std::vector<uint32_t> sizes;        // n0 ... nL
    std::vector<std::vector<float>> W;  // W[l]: n_{l+1} x n_l
    std::vector<std::vector<float>> B;  // B[l]: n_{l+1}
    bool w1_lent = false;               // W[0] is stale: train_step holds W1 in its Work (see sync)
    int layers() const { return int(sizes.size()) - 1; }
    size_t n_params() const;
};

Net net_from_checkpoint(const Checkpoint& ck);

// Small, fast, portable PRNG (xoshiro256**) so runs are reproducible on any
// compiler: std::normal_distribution and friends are implementation-defined.
struct Rng {
    uint64_t s[4];
    explicit Rng(uint64_t seed);
    uint64_t next();
    double uniform();                 // [0, 1)
    uint64_t below(uint64_t n);       // uniform in [0, n), unbiased
    double normal();                  // N(0, 1), Box-Muller
    void shuffle(std::vector<uint32_t>& v);
};

// He normal: W ~ N(0, 2 / n_in), B = 0.
Net he_init(const std::vector<uint32_t>& sizes, Rng& rng);

// C[M x N] = A[M x K] * Bm[K x N]; lda/ldb/ldc are row strides. Parallel over tiles of C.
void gemm(int M, int N, int K, const float* A, int lda, const float* Bm, int ldb, float* C, int ldc);
// C[M x N] = A[M x K] * Bt[N x K]^T (dot products of rows), same conventions.
void gemm_nt(int M, int N, int K, const float* A, int lda, const float* Bt, int ldb, float* C, int ldc);

// std::vector storage that starts on a 64-byte boundary (a cache line): vector loads of an
// aligned row never straddle two lines.
template <class T>
struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U>
    Aligned64(const Aligned64<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const Aligned64<U>&) const { return true; }
    template <class U>
    bool operator!=(const Aligned64<U>&) const { return false; }
};
using fbuf = std::vector<float, Aligned64<float>>;

// Buffers for one batch, allocated once for the largest batch and reused.
struct Work {
    int cap = 0;
    std::vector<std::vector<float>> A;   // A[0] = inputs, A[l] = layer l output (post-ReLU; A[L] = logits)
    std::vector<std::vector<float>> dZ;  // dZ[l] = dLoss/dZ_{l+1}, batch x n_{l+1}
    std::vector<std::vector<float>> dW, dB;
    std::vector<float> T;                // scratch for dZ^T
    Work(const Net& net, int cap);

    // train_step's own buffers, allocated at its first call (step.cpp). Rows are padded to
    // ld[l] = n_l rounded up to 64 floats, with zeros in the padding.
    std::vector<int> ld;
    std::vector<fbuf> H;   // H[l]: layer l's output for l = 1..L (H[L]: logits)
    std::vector<fbuf> G;   // G[l]: dLoss/dZ_{l+1}
    std::vector<double> loss;
    std::vector<uint8_t> hit;
    fbuf HT;  // W^T of a hidden layer after the first, made by the forward product each step
    // The sparse first layer: W1, and its optimiser slots, transposed (n0 x ld[1]) while
    // `transposed`; the pixels lit in each pair of samples (cnt of them: cols, and both samples'
    // values in vals) and, per block of 3 pixels, the samples that light it (bcnt, bidx; 2 ceil(n0 / 6)
    // blocks, as they are listed in pairs).
    bool transposed = false;
    fbuf WT, MT, VT;
    std::vector<int32_t> cols, cnt, bcnt, bidx;
    fbuf vals;
};

// X (nb x n0) must already be in w.A[0]. Fills w.A[1..L].
void forward(const Net& net, Work& w, int nb);
// Softmax cross-entropy on w.A[L]; writes dZ_L into w.dZ[L-1] (divided by nb when mean).
// Returns the summed per-sample loss; *correct gets the number of argmax hits.
double loss_grad(Work& w, const Net& net, const uint8_t* y, int nb, bool mean, int* correct);
// Softmax cross-entropy of one row of C logits z with label y: writes d = scale * (softmax - onehot),
// returns the loss; *arg gets the first argmax.
double xent_row(const float* z, int C, int y, double scale, float* d, int* arg);
// Fills w.dW, w.dB from w.dZ[L-1] and the stored activations.
void backward(const Net& net, Work& w, int nb);

// Converts u8 pixels of the listed samples into w.A[0] as x = u8 / 255.
void load_batch(Work& w, const uint8_t* pixels, int n_in, const uint32_t* idx, int nb);

// The optimiser's constants for one step (Optimizer::begin), as the update rule (update.h) reads them.
struct StepArgs {
    int kind;  // 0 sgd, 1 momentum, 2 adam
    bool nesterov;
    float lr, wd, mu;
    float b1, b2, one_minus_b1, one_minus_b2;  // Adam: beta1, beta2, 1 - beta1, 1 - beta2
    float lr_inv_bias1, inv_bias2, eps;  // lr / (1 - beta1^t), 1 / (1 - beta2^t), as nn_numba names them
};

struct Optimizer {
    int kind = 0;  // 0 sgd, 1 momentum, 2 adam (the OPTM codes)
    float momentum = 0.9f, wd = 0.0f;
    bool nesterov = false;
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    uint64_t t = 0;                                   // steps taken
    std::vector<std::vector<float>> slot0, slot1;     // velocity, or Adam m and v; per parameter W1 B1 W2 ...
    bool w1_lent = false;                             // slot0[0], slot1[0] are stale (see sync)
    Optimizer(int kind, const Net& net);
    // One update of every parameter with learning rate lr, using w.dW / w.dB.
    void step(Net& net, const Work& w, double lr);
    // Counts a step (t++) and returns its constants at learning rate lr.
    StepArgs begin(double lr);
    OptimState state() const;
};

// One optimiser step on the batch already in w.A[0] (nb rows of n0 floats): forward, loss, backward, update.
// Returns the summed per-sample loss; *correct gets the number of argmax hits.
//
// The fast path of training (step.cpp): the first layer skips the zero pixels of its input unless
// the batch is dense, and each weight-gradient kernel applies the optimiser to its tile at once.
// It keeps its activations in w.H / w.G: w.A[1..L], w.dZ, w.dW and w.dB are left alone.
// The rule for net.W[0] and the optimiser's slots of W1: on the sparse path train_step keeps them
// transposed inside w (w.transposed), so between train_step calls net.W[0], opt.slot0[0],
// opt.slot1[0] and opt.state() are stale (net.w1_lent and opt.w1_lent say so, and forward,
// evaluate, predict, Optimizer::step and state() throw NNError rather than read them). Call
// sync(net, w, opt) before reading or writing any of them (evaluate, predict, a checkpoint,
// loading a resumed state); the next train_step picks the change up. net.B, the other layers
// and opt.t are always current.
double train_step(Net& net, Work& w, Optimizer& opt, const uint8_t* y, int nb, bool mean, double lr, int* correct);
// Makes net.W[0] and opt's W1 slots current (see train_step). Cheap when they already are.
void sync(Net& net, Work& w, Optimizer& opt);

// The learning rate of docs/training.md (nn_numba.train.lr_at): linear warm-up over `warmup` steps,
// then constant, step (times gamma every step_epochs epochs) or cosine (to min_lr at `total`).
struct Schedule {
    std::string kind = "constant";  // constant | cosine | step
    double lr = 1e-3, min_lr = 0.0, gamma = 0.1;
    int step_epochs = 10;
    long steps_per_epoch = 1, warmup = 0, total = 1;  // in optimiser steps
    double at(long s) const;  // the rate of step s, counted from 0
    // Wu = floor(warmup_epochs * steps_per_epoch + 0.5): round half up (docs/training.md)
    static long warmup_steps(double warmup_epochs, long steps_per_epoch);
};

struct Eval {
    double accuracy = 0, loss = 0;
    long correct = 0, n = 0;
};
// Accuracy and mean loss over the listed samples (all samples if idx is empty).
Eval evaluate(const Net& net, const uint8_t* pixels, const uint8_t* labels, uint32_t n_total,
              const std::vector<uint32_t>& idx = {});
// Softmax probabilities and logits of one image each (rows x n_classes).
void predict(const Net& net, const uint8_t* pixels, int n, std::vector<float>* logits, std::vector<float>* probs);
