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
#include <string>
#include <vector>

#include "checkpoint.h"

struct Net {
    std::vector<uint32_t> sizes;        // n0 ... nL
    std::vector<std::vector<float>> W;  // W[l]: n_{l+1} x n_l
    std::vector<std::vector<float>> B;  // B[l]: n_{l+1}
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

// Buffers for one batch, allocated once for the largest batch and reused.
struct Work {
    int cap = 0;
    std::vector<std::vector<float>> A;   // A[0] = inputs, A[l] = layer l output (post-ReLU; A[L] = logits)
    std::vector<std::vector<float>> dZ;  // dZ[l] = dLoss/dZ_{l+1}, batch x n_{l+1}
    std::vector<std::vector<float>> dW, dB;
    std::vector<float> T;                // scratch for dZ^T
    Work(const Net& net, int cap);
};

// X (nb x n0) must already be in w.A[0]. Fills w.A[1..L].
void forward(const Net& net, Work& w, int nb);
// Softmax cross-entropy on w.A[L]; writes dZ_L into w.dZ[L-1] (divided by nb when mean).
// Returns the summed per-sample loss; *correct gets the number of argmax hits.
double loss_grad(Work& w, const Net& net, const uint8_t* y, int nb, bool mean, int* correct);
// Fills w.dW, w.dB from w.dZ[L-1] and the stored activations.
void backward(const Net& net, Work& w, int nb);

// Converts u8 pixels of the listed samples into w.A[0] as x = u8 / 255.
void load_batch(Work& w, const uint8_t* pixels, int n_in, const uint32_t* idx, int nb);

struct Optimizer {
    int kind = 0;  // 0 sgd, 1 momentum, 2 adam (the OPTM codes)
    float momentum = 0.9f, wd = 0.0f;
    bool nesterov = false;
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    uint64_t t = 0;                                   // steps taken
    std::vector<std::vector<float>> slot0, slot1;     // velocity, or Adam m and v; per parameter W1 B1 W2 ...
    Optimizer(int kind, const Net& net);
    // One update of every parameter with learning rate lr, using w.dW / w.dB.
    void step(Net& net, const Work& w, double lr);
    OptimState state() const;
};

struct Schedule {
    std::string kind = "constant";  // constant | cosine | step
    double lr = 1e-3, min_lr = 0.0, gamma = 0.1;
    int step_epochs = 10;
    long warmup = 0, total = 1;  // in optimiser steps
    double at(long s, int epoch) const;
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
