// The vector kernel of rotary_cpu.cpp, written once for any vector width. No include guard on
// purpose: rotary_cpu.cpp includes this file twice, inside its AVX2 region (namespace
// avx2_path, W = 8) and inside its AVX-512 region (namespace avx512_path, W = 16), after that
// namespace has defined the primitives used here:
//   V, W                          a vector of W floats, W (even: a pair never straddles two)
//   mul(a, b)                     a * b
//   fmadd(a, b, c)                a * b + c, one rounding;  fnmadd(a, b, c): c - a * b
//   swap_pairs(x)                 lanes (0 1 2 3 ...) -> (1 0 3 2 ...)
//   load(p) / loadn(p, n)         W (or the first n < W) elements of float, BFloat16 or Half as
//                                 floats, the other lanes 0
//   store(p, v) / storen(p, v, n) the same, rounded to the storage type (round to nearest
//                                 even, as c10 rounds)
// Templates defined here take the target of the region they are included in (GCC).
//
// rotate_head rotates one head's R features (rotary.h's math) with the angle buffers of the
// row (rotary_cpu.cpp, fill_angles):
//   NeoX         c[i], s[i] (i < R / 2): out1 = x1 c - x2 s, out2 = x2 c + x1 s, x1 and x2
//                W consecutive features each, R / 2 apart;
//   interleaved  c[j] = c_{j/2}, s[j] = -s_{j/2} (j even) or +s_{j/2} (j odd), j < R:
//                out[j] = x[j] c[j] + x[j ^ 1] s[j], one vector of W / 2 pairs at a time.
// Every element is loaded before any element of its pair is stored, so in == out works.

template <class T>
void rotate_head(const T* in, T* out, const float* c, const float* s, int64_t half,
                 bool interleaved) {
  if (interleaved) {
    const int64_t r = 2 * half;
    int64_t j = 0;
    for (; j + W <= r; j += W) {
      const V x = load(in + j);
      store(out + j, fmadd(swap_pairs(x), load(s + j), mul(x, load(c + j))));
    }
    if (j < r) {
      const int n = static_cast<int>(r - j);
      const V x = loadn(in + j, n);
      storen(out + j, fmadd(swap_pairs(x), loadn(s + j, n), mul(x, loadn(c + j, n))), n);
    }
    return;
  }
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    const V x1 = load(in + i), x2 = load(in + half + i);
    const V cv = load(c + i), sv = load(s + i);
    store(out + i, fnmadd(x2, sv, mul(x1, cv)));
    store(out + half + i, fmadd(x1, sv, mul(x2, cv)));
  }
  if (i < half) {
    const int n = static_cast<int>(half - i);
    const V x1 = loadn(in + i, n), x2 = loadn(in + half + i, n);
    const V cv = loadn(c + i, n), sv = loadn(s + i, n);
    storen(out + i, fnmadd(x2, sv, mul(x1, cv)), n);
    storen(out + half + i, fmadd(x1, sv, mul(x2, cv)), n);
  }
}
