// Portable SIMD layer: GCC/Clang vector extensions sized by the ISA level this
// translation unit is compiled for, so each kernel is written once and built
// for SSE2 (16 bytes), AVX2 (32) and AVX-512 (64). One vector holds W
// consecutive channels (or time steps) of float or double.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(SEGMAMBA_ISA_AVX512)
#define SEGMAMBA_VEC_BYTES 64
#define SEGMAMBA_ISA_NAME "avx512"
#elif defined(SEGMAMBA_ISA_AVX2)
#define SEGMAMBA_VEC_BYTES 32
#define SEGMAMBA_ISA_NAME "avx2"
#else
#define SEGMAMBA_VEC_BYTES 16
#define SEGMAMBA_ISA_NAME "baseline"
#endif

#define SM_INLINE inline __attribute__((always_inline))

namespace segmamba {
namespace simd {

constexpr int kVecBytes = SEGMAMBA_VEC_BYTES;

template <class T> struct IntOf;
template <> struct IntOf<float> { using type = int32_t; };
template <> struct IntOf<double> { using type = int64_t; };

// Vector types for scalar type T (float or double).
template <class T>
struct V {
  using scalar = T;
  using sint = typename IntOf<T>::type;
  typedef T vec __attribute__((vector_size(kVecBytes)));
  typedef sint ivec __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / int(sizeof(T));
};

template <class T> using vec_t = typename V<T>::vec;
template <class T> using ivec_t = typename V<T>::ivec;

template <class T>
SM_INLINE vec_t<T> splat(T s) { return vec_t<T>{} + s; }

template <class T>
SM_INLINE vec_t<T> loadu(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T>
SM_INLINE void storeu(T* p, vec_t<T> v) { std::memcpy(p, &v, sizeof(v)); }

// Non-temporal store of a whole vector to p, aligned to kVecBytes: the line is
// written without being read first or kept in cache. stream_fence() orders such
// stores before later ones (call it before other threads may read the data).
template <class T>
SM_INLINE void stream(T* p, vec_t<T> v) {
#if defined(SEGMAMBA_ISA_AVX512)
  if constexpr (std::is_same<T, float>::value) _mm512_stream_ps(p, v); else _mm512_stream_pd(p, v);
#elif defined(SEGMAMBA_ISA_AVX2)
  if constexpr (std::is_same<T, float>::value) _mm256_stream_ps(p, v); else _mm256_stream_pd(p, v);
#elif defined(__SSE2__)
  if constexpr (std::is_same<T, float>::value) _mm_stream_ps(p, v); else _mm_stream_pd(p, v);
#else
  storeu<T>(p, v);
#endif
}

SM_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// max/min as single instructions: GCC keeps `a > b ? a : b` as compare + blend
// because of its NaN semantics.
#if defined(SEGMAMBA_ISA_AVX512)
SM_INLINE vec_t<float> vmax(vec_t<float> a, vec_t<float> b) { return _mm512_max_ps(a, b); }
SM_INLINE vec_t<float> vmin(vec_t<float> a, vec_t<float> b) { return _mm512_min_ps(a, b); }
SM_INLINE vec_t<double> vmax(vec_t<double> a, vec_t<double> b) { return _mm512_max_pd(a, b); }
SM_INLINE vec_t<double> vmin(vec_t<double> a, vec_t<double> b) { return _mm512_min_pd(a, b); }
#elif defined(SEGMAMBA_ISA_AVX2)
SM_INLINE vec_t<float> vmax(vec_t<float> a, vec_t<float> b) { return _mm256_max_ps(a, b); }
SM_INLINE vec_t<float> vmin(vec_t<float> a, vec_t<float> b) { return _mm256_min_ps(a, b); }
SM_INLINE vec_t<double> vmax(vec_t<double> a, vec_t<double> b) { return _mm256_max_pd(a, b); }
SM_INLINE vec_t<double> vmin(vec_t<double> a, vec_t<double> b) { return _mm256_min_pd(a, b); }
#elif defined(__SSE2__)
SM_INLINE vec_t<float> vmax(vec_t<float> a, vec_t<float> b) { return _mm_max_ps(a, b); }
SM_INLINE vec_t<float> vmin(vec_t<float> a, vec_t<float> b) { return _mm_min_ps(a, b); }
SM_INLINE vec_t<double> vmax(vec_t<double> a, vec_t<double> b) { return _mm_max_pd(a, b); }
SM_INLINE vec_t<double> vmin(vec_t<double> a, vec_t<double> b) { return _mm_min_pd(a, b); }
#else
template <class T>
SM_INLINE vec_t<T> vmax(vec_t<T> a, vec_t<T> b) { return a > b ? a : b; }
template <class T>
SM_INLINE vec_t<T> vmin(vec_t<T> a, vec_t<T> b) { return a < b ? a : b; }
#endif

// Per-type constants of exp2: float mantissa bits, exponent bias, a rounding
// "magic" number 1.5 * 2^mantissa_bits (adding it rounds to the nearest integer,
// which then sits in the low mantissa bits), and a polynomial for 2^f on
// [-0.5, 0.5].
template <class T> struct Exp2Consts;
template <> struct Exp2Consts<float> {
  static constexpr int kMant = 23;
  static constexpr int32_t kBias = 127;
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  static constexpr int32_t kSqrtHalfBits = 0x3f3504f3;
  // Least-squares minimax fit of 2^f on [-0.5, 0.5]: < 1 ulp in fp32 Horner arithmetic.
  static constexpr int kDeg = 6;
  static constexpr float kPoly[kDeg + 1] = {1.0f, 0.6931471824645996f, 0.24022646248340607f,
                                            0.05550328642129898f, 0.009618489071726799f,
                                            0.0013399932067841291f, 0.00015345841529779136f};
};
template <> struct Exp2Consts<double> {
  static constexpr int kMant = 52;
  static constexpr int64_t kBias = 1023;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int64_t kSqrtHalfBits = 0x3fe6a09e667f3bcdLL;
  // Taylor series of 2^f = e^(f ln2); degree 13 keeps the truncation below 1e-17 for |f| <= 0.5.
  static constexpr int kDeg = 13;
  static constexpr double kPoly[kDeg + 1] = {
      1.0, 0.6931471805599453, 0.2402265069591007, 0.05550410866482158, 0.009618129107628477,
      0.0013333558146428443, 0.0001540353039338161, 1.525273380405984e-05, 1.3215486790144307e-06,
      1.0178086009239699e-07, 7.054911620801123e-09, 4.445538271870811e-10, 2.567843599348821e-11,
      1.3691488853904124e-12};
};

template <class T>
SM_INLINE vec_t<T> exp2_poly(vec_t<T> f) {
  using K = Exp2Consts<T>;
  vec_t<T> p = splat<T>(K::kPoly[K::kDeg]);
#pragma GCC unroll 16
  for (int k = K::kDeg - 1; k >= 0; --k) p = p * f + K::kPoly[k];
  return p;
}

// 2^x for a vector x: x = n + f with n integer, |f| <= 1/2; 2^f by polynomial, 2^n
// put into the exponent. Results below the smallest normal flush to 0, huge x
// saturates (generic path) or gives inf (AVX-512): never NaN for finite input.
template <class T>
SM_INLINE vec_t<T> exp2(vec_t<T> x) {
#if defined(SEGMAMBA_ISA_AVX512)
  // roundscale + scalef do the range reduction and the 2^n scaling (with
  // correct underflow) in one instruction each.
  if constexpr (std::is_same<T, float>::value) {
    const vec_t<T> n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_poly<T>(x - n), n);
  } else {
    const vec_t<T> n = _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_pd(exp2_poly<T>(x - n), n);
  }
#else
  using K = Exp2Consts<T>;
  using iv = ivec_t<T>;
  x = vmax(x, splat<T>(T(-K::kBias)));
  x = vmin(x, splat<T>(T(K::kBias)));
  // Adding the magic rounds to an integer n that lands in the low mantissa bits;
  // shifting left by the mantissa width drops the magic's bits and leaves n in
  // the exponent field (n = -bias gives the bit pattern of 0.0).
  const vec_t<T> shifted = x + K::kMagic;
  const vec_t<T> n = shifted - K::kMagic;
  const iv bits = ((iv)shifted << K::kMant) + (iv{} + (K::kBias << K::kMant));
  return exp2_poly<T>(x - n) * (vec_t<T>)bits;
#endif
}

// 1 / x for finite x != 0. AVX-512 float: 14-bit estimate + one Newton step
// (~1 ulp, a fraction of the cost of a 512-bit division).
template <class T>
SM_INLINE vec_t<T> recip(vec_t<T> x) {
#if defined(SEGMAMBA_ISA_AVX512)
  if constexpr (std::is_same<T, float>::value) {
    const vec_t<T> r = _mm512_rcp14_ps(x);
    return r * (T(2) - x * r);
  }
#endif
  return T(1) / x;
}

template <class T> constexpr T kLog2e = T(1.4426950408889634);
template <class T> constexpr T kLn2 = T(0.6931471805599453);

template <class T>
SM_INLINE vec_t<T> exp(vec_t<T> x) { return exp2<T>(x * kLog2e<T>); }

// Natural log for x > 0 (finite, normal): x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its odd series.
template <class T>
SM_INLINE vec_t<T> log_pos(vec_t<T> x) {
  using K = Exp2Consts<T>;
  using iv = ivec_t<T>;
  // Subtracting the bit pattern of sqrt(1/2) and shifting out the mantissa gives
  // e = floor(log2(x / sqrt(1/2))); removing e from the exponent field leaves m.
  const iv bits = (iv)x;
  const iv e = (bits - K::kSqrtHalfBits) >> K::kMant;  // arithmetic shift: floor
  const vec_t<T> m = (vec_t<T>)(bits - (e << K::kMant));
  const vec_t<T> s = (m - T(1)) * recip<T>(m + T(1));
  const vec_t<T> s2 = s * s;
  constexpr int kTerms = std::is_same<T, float>::value ? 5 : 10;  // series up to s^9 / s^19
  vec_t<T> p = splat<T>(T(1) / T(2 * kTerms - 1));
#pragma GCC unroll 16
  for (int k = kTerms - 2; k >= 0; --k) p = p * s2 + T(1) / T(2 * k + 1);
  return T(2) * s * p + __builtin_convertvector(e, vec_t<T>) * kLn2<T>;
}

// softplus(x) = log(1 + e^x), = x above 20 as torch does; log1p is evaluated as
// log(v) * e / (v - 1) with v = 1 + e, which stays exact when e is tiny.
// With kGrad, *grad = its derivative e / (1 + e) (exactly 1 above 20, as torch),
// reusing e^x instead of a second exponential.
template <class T, bool kGrad = false>
SM_INLINE vec_t<T> softplus(vec_t<T> x, vec_t<T>* grad = nullptr) {
  const vec_t<T> e = exp<T>(vmin(x, splat<T>(T(20))));
  const vec_t<T> v = e + T(1);
  const vec_t<T> vm1 = v - T(1);
  const vec_t<T> l = log_pos<T>(v);
  const vec_t<T> safe = vm1 == T(0) ? splat<T>(T(1)) : vm1;
  const vec_t<T> lp = vm1 == T(0) ? e : l * (e * recip<T>(safe));
  if constexpr (kGrad) *grad = x > T(20) ? splat<T>(T(1)) : e * recip<T>(v);
  return x > T(20) ? x : lp;
}

// 1 / (1 + e^-x); e^-x is capped at e^80 (still finite, so the reciprocal is) which
// changes only results below 2e-35.
template <class T>
SM_INLINE vec_t<T> sigmoid(vec_t<T> x) { return recip<T>(T(1) + exp<T>(vmin(-x, splat<T>(T(80))))); }

// Reduction of W vectors to one: lane i of the result is the sum of the lanes of
// v[i]. A log2(W)-level tree; each level folds every input group in half,
// keeping groups in order, so it costs ~2W shuffles instead of W log2(W).
// Level l pairs vectors holding 2^(l-1) groups of S = W / 2^(l-1) lanes each.
template <int W, int Level>
constexpr int fold_index(int i, bool hi) {
  const int groups_in = 1 << (Level - 1), S = W >> (Level - 1);
  const int grp = i / (S / 2), off = i % (S / 2);
  const int src = grp < groups_in ? grp * S + off : W + (grp - groups_in) * S + off;
  return src + (hi ? S / 2 : 0);
}

template <class T, int Level, int... I>
SM_INLINE vec_t<T> fold_pair(vec_t<T> a, vec_t<T> b, std::integer_sequence<int, I...>) {
  constexpr int W = V<T>::W;
  return __builtin_shufflevector(a, b, fold_index<W, Level>(I, false)...) +
         __builtin_shufflevector(a, b, fold_index<W, Level>(I, true)...);
}

template <class T, int Level = 1>
SM_INLINE vec_t<T> reduce_lanes_batch(vec_t<T>* v) {
  constexpr int W = V<T>::W;
  if constexpr ((1 << Level) > W) {
    return v[0];
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < (W >> Level); ++i)
      v[i] = fold_pair<T, Level>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, W>{});
    return reduce_lanes_batch<T, Level + 1>(v);
  }
}

// Lanes a_k, b_k, a_{k+1}, b_{k+1}, ... from the low (Hi = false) or high halves of a and b.
template <int W>
constexpr int zip_index(int i, bool hi) { return (i % 2 ? W : 0) + i / 2 + (hi ? W / 2 : 0); }

template <class T, bool Hi, int... I>
SM_INLINE vec_t<T> zip_half(vec_t<T> a, vec_t<T> b, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(a, b, zip_index<V<T>::W>(I, Hi)...);
}

// Transposes the W x W matrix whose rows are r[0..W), in registers: log2(W)
// rounds of zipping row i with row i + W/2 (a perfect shuffle), W shuffles each,
// instead of W^2 scalar moves.
template <class T>
SM_INLINE void transpose(vec_t<T>* r) {
  constexpr int W = V<T>::W;
  using lanes = std::make_integer_sequence<int, W>;
#pragma GCC unroll 4
  for (int round = 1; round < W; round *= 2) {
    vec_t<T> zipped[W];
#pragma GCC unroll 16
    for (int i = 0; i < W / 2; ++i) {
      zipped[2 * i] = zip_half<T, false>(r[i], r[i + W / 2], lanes{});
      zipped[2 * i + 1] = zip_half<T, true>(r[i], r[i + W / 2], lanes{});
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r[i] = zipped[i];
  }
}

template <class T, int... I>
SM_INLINE vec_t<T> reverse_lanes(vec_t<T> v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (V<T>::W - 1 - I)...);
}

// The lanes of v in reverse order (one permute).
template <class T>
SM_INLINE vec_t<T> reverse(vec_t<T> v) { return reverse_lanes<T>(v, std::make_integer_sequence<int, V<T>::W>{}); }

template <class T>
SM_INLINE T reduce_lanes(vec_t<T> v) {
  T s = 0;
  for (int i = 0; i < V<T>::W; ++i) s += v[i];
  return s;
}

}  // namespace simd
}  // namespace segmamba
