// The optimiser rule of docs/training.md on one vector of parameters: the only place it is
// written. Optimizer::step runs it over whole arrays, the training kernels (step.cpp) run it on
// a gradient tile still in registers.
#pragma once
#include "mlp.h"
#include "simd.h"

// p: up to V parameters, g: their gradient; m, v point at the optimiser's slots for the same
// parameters (read and written, first n lanes; unused by the kinds that have no such slot).
// decay: weight decay applies (weights yes, biases no). Returns the updated parameters.
// Explicit FMAs, so every build rounds each line once. KIND is s.kind, fixed at compile time
// for the kernels' inner loops; update() picks it at run time.
template <int KIND>
inline simd::vf update_k(const StepArgs& s, simd::vf p, simd::vf g, float* m, float* v, int n, bool decay) {
    using namespace simd;
    if (decay) g = fma(bcast(s.wd), p, g);
    if (KIND == 0) return fma(bcast(-s.lr), g, p);
    if (KIND == 1) {
        vf mk = fma(bcast(s.mu), ld(m, n), g);
        st(m, mk, n);
        return fma(bcast(-s.lr), s.nesterov ? fma(bcast(s.mu), mk, g) : mk, p);
    }
    vf mk = fma(bcast(s.b1), ld(m, n), mul(bcast(s.one_minus_b1), g));
    vf vk = fma(bcast(s.b2), ld(v, n), mul(mul(bcast(s.one_minus_b2), g), g));
    st(m, mk, n);
    st(v, vk, n);
    return sub(p, div(mul(bcast(s.lr_inv_bias1), mk), add(sqrt(mul(vk, bcast(s.inv_bias2))), bcast(s.eps))));
}

inline simd::vf update(const StepArgs& s, simd::vf p, simd::vf g, float* m, float* v, int n, bool decay) {
    if (s.kind == 0) return update_k<0>(s, p, g, m, v, n, decay);
    if (s.kind == 1) return update_k<1>(s, p, g, m, v, n, decay);
    return update_k<2>(s, p, g, m, v, n, decay);
}
