// The vector kernels of gated_mlp_cpu.cpp, written once for any vector width. No include
// guard on purpose: gated_mlp_cpu.cpp includes this file twice, inside its AVX2 region
// (namespace avx2_path, W = 8) and inside its AVX-512 region (namespace avx512_path, W = 16),
// after that namespace has defined the primitives used here:
//   V, M, W                  a vector of W floats, its lane mask, W
//   bcast(f)                 every lane f
//   fmadd(a, b, c)           a * b + c, one rounding;  fnmadd(a, b, c): c - a * b
//   vmin(a, b), vmax(a, b)   b when either is NaN (the x86 rule)
//   vabs(a)
//   less(a, b)               lanes with a < b (false when either is NaN)
//   select(m, a, b)          m ? a : b per lane
//   exp_v(x)                 e^x within a few ulp for x <= 0 (the only arguments here): 0
//                            where it underflows (denormal results may flush to 0), NaN for NaN
//   recip(d)                 1 / d within 2 ulp for d in [1, 2]
//   load(p) / loadn(p, n)    W (or the first n < W) elements of float, BFloat16 or Half as
//                            floats, the other lanes 0
//   store(p, v) / storen(p, v, n)  the same, rounded to the storage type (round to nearest
//                            even, as c10 rounds; NaN -> 0x7FC0 for bfloat16)
// Templates defined here take the target of the region they are included in (GCC), so each
// inclusion compiles them for its instruction set.
//
// The math is gated_mlp.h's. Both sigmoid-gated activations are g * sigmoid(z):
//   silu       z = g
//   gelu_tanh  z = 2 k0 (g + k1 g^3)
// since (1 + tanh(u)) / 2 = sigmoid(2 u) (no 1 + tanh cancellation for g < 0). With
// s = sigmoid(z): act = g s, and act' = s + act (1 - s) z' (gated_mlp.h); s and 1 - s come
// from exp(-|z|) (sigmoid_v), so neither cancels and no exp overflows.

// Phi(g) = (1 + erf(x)) / 2, x = g / sqrt(2), a = |x|, in three ranges:
//   a < 0.921875   erf(x) = x + x P(x^2)                  Phi = 1/2 + erf(x) / 2
//   a < 4          erfc(a) = exp(-(a + a Q(a)))           Phi = erfc(a) / 2 (x < 0),
//                                                         1 - erfc(a) / 2 (x > 0)
//   a >= 4         Phi = 0 (x < 0) or 1 (erfc(4) / 2 = 7.7e-9; NaN x lands here, and g * Phi
//                  is NaN all the same)
// P and Q are least-squares fits on Chebyshev nodes (relative error of erf, absolute error of
// the exponent). Measured in float arithmetic: erf within 1.4 ulp, Phi within 8e-8 absolute,
// and in the negative tail within 3e-6 relative (the rounding of an exponent up to 17): the
// small values of gelu(g) for g < 0 keep their relative accuracy, which 1 + erf(x) would
// cancel away.
FASTLLM_INLINE V normal_cdf_v(V g) {
  const V x = g * bcast(0.70710678118654752f);
  const V a = vabs(x);
  const V x2 = x * x;
  V p = bcast(-6.0246360953897238e-4f);
  p = fmadd(p, x2, bcast(5.0009014084935188e-3f));
  p = fmadd(p, x2, bcast(-2.6772961020469666e-2f));
  p = fmadd(p, x2, bcast(1.1282039433717728e-1f));
  p = fmadd(p, x2, bcast(-3.7612524628639221e-1f));
  p = fmadd(p, x2, bcast(1.2837916612625122e-1f));
  const V erf_small = fmadd(p, x, x);
  V q = bcast(1.5815308870514855e-5f);
  q = fmadd(q, a, bcast(-3.6173354601487517e-4f));
  q = fmadd(q, a, bcast(3.7603883538395166e-3f));
  q = fmadd(q, a, bcast(-2.3895064368844032e-2f));
  q = fmadd(q, a, bcast(1.0621546208858490e-1f));
  q = fmadd(q, a, bcast(6.3529568910598755e-1f));
  q = fmadd(q, a, bcast(1.2857511639595032e-1f));
  const V half_erfc = bcast(0.5f) * exp_v(-fmadd(q, a, a));
  const V zero = bcast(0.0f);
  const V one = bcast(1.0f);
  const V tail = select(less(x, zero), half_erfc, one - half_erfc);
  const V saturated = select(less(zero, x), one, zero);
  return select(less(a, bcast(0.921875f)), fmadd(bcast(0.5f), erf_small, bcast(0.5f)),
                select(less(a, bcast(4.0f)), tail, saturated));
}

// z of a sigmoid-gated activation (header comment).
template <Activation A>
FASTLLM_INLINE V gate_arg(V g) {
  if constexpr (A == Activation::kSilu) {
    return g;
  } else {
    return (g + bcast(kGeluTanhK1) * (g * g * g)) * bcast(2.0 * kGeluTanhK0);
  }
}

// s = sigmoid(z) and 1 - s, each without cancellation: with t = exp(-|z|) in [0, 1] and
// r = 1 / (1 + t), s = r and 1 - s = t r for z >= 0, s = t r and 1 - s = r for z < 0. The
// reciprocal's argument stays in [1, 2] (no overflow, no division: recip); z = +-inf gives
// s = 1 or 0 exactly, NaN gives NaN.
FASTLLM_INLINE void sigmoid_v(V z, V& s, V& one_minus_s) {
  const V t = exp_v(-vabs(z));
  const V r = recip(bcast(1.0f) + t);
  const V tr = t * r;
  const auto negative = less(z, bcast(0.0f));
  s = select(negative, tr, r);
  one_minus_s = select(negative, r, tr);
}

// act(g).
template <Activation A>
FASTLLM_INLINE V act_v(V g) {
  if constexpr (A == Activation::kGelu) {
    return g * normal_cdf_v(g);
  } else {
    V s, one_minus_s;
    sigmoid_v(gate_arg<A>(g), s, one_minus_s);
    return g * s;
  }
}

// act(g) and act'(g).
template <Activation A>
FASTLLM_INLINE void act_and_grad_v(V g, V& act, V& grad) {
  if constexpr (A == Activation::kGelu) {
    const V cdf = normal_cdf_v(g);
    act = g * cdf;
    const V pdf = exp_v(bcast(-0.5f) * g * g) * bcast(kInvSqrt2Pi);
    grad = fmadd(g, pdf, cdf);
  } else {
    V s, one_minus_s;
    sigmoid_v(gate_arg<A>(g), s, one_minus_s);
    act = g * s;
    V dz = bcast(1.0f);
    if constexpr (A == Activation::kGeluTanh) {
      const V gc = vmax(bcast(-kGeluTanhClamp), vmin(bcast(kGeluTanhClamp), g));
      dz = fmadd(bcast(6.0 * kGeluTanhK0 * kGeluTanhK1), gc * gc, bcast(2.0 * kGeluTanhK0));
    }
    grad = fmadd(act * one_minus_s, dz, s);
  }
}

// Calls body(j, m) on [0, n) in chunks of m = W elements, then one chunk of m = n % W < W.
template <class Body>
FASTLLM_INLINE void for_each_vector(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + W <= n; j += W) body(j, W);
  if (j < n) body(j, static_cast<int>(n - j));
}

// Loads / stores of a chunk of m elements (m == W: a full vector).
template <class T>
FASTLLM_INLINE V load_chunk(const T* p, int m) {
  return m == W ? load(p) : loadn(p, m);
}
template <class T>
FASTLLM_INLINE void store_chunk(T* p, V v, int m) {
  if (m == W) {
    store(p, v);
  } else {
    storen(p, v, m);
  }
}

// out[j] = act(g[j]) * u[j] for j in [0, n).
template <Activation A, class T>
void fwd_span(const T* g, const T* u, T* out, int64_t n) {
  for_each_vector(n, [&](int64_t j, int m) FASTLLM_INLINE_LAMBDA {
    store_chunk(out + j, act_v<A>(load_chunk(g + j, m)) * load_chunk(u + j, m), m);
  });
}

// dg[j] = dy[j] * u[j] * act'(g[j]), du[j] = dy[j] * act(g[j]) for j in [0, n). All loads of
// a chunk come before its stores (an output row may sit a multiple of 4 KiB from an input
// row: a load issued behind a store to the same address modulo 4 KiB waits for it).
template <Activation A, class T>
void bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  for_each_vector(n, [&](int64_t j, int m) FASTLLM_INLINE_LAMBDA {
    const V dyv = load_chunk(dy + j, m);
    const V uv = load_chunk(u + j, m);
    V act, grad;
    act_and_grad_v<A>(load_chunk(g + j, m), act, grad);
    store_chunk(dg + j, dyv * uv * grad, m);
    store_chunk(du + j, dyv * act, m);
  });
}
