// Causal depthwise conv1d (docs/design.md §3) forward and backward on the CPU:
// one (batch, channel) row at a time (OpenMP over rows), vectorised over time,
// the row walked in chunks that stay in cache.
//   out[t] = act(bias + sum_k w[k] x[t - (K-1) + k]),  x = 0 before t = 0.
#pragma once

#include <omp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "block_io.h"

namespace segmamba {
namespace conv {

constexpr int kRowChunk = 4096;  // a multiple of every W

template <class T, class IO>
struct Problem {
  const IO* x;
  const T *weight, *bias;  // (dim, K), (dim,)
  int64_t batch, dim, L;
  bool silu;
};

// xb[j] = x[t0 - (K-1) + j]: pre-activation for the `count` steps from t0 (count a multiple of W).
template <class T, int K>
SM_INLINE void preactivation(const T* xb, const T* w, T bias, int count, T* pre) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  for (int t = 0; t < count; t += W) {
    vec acc = simd::splat<T>(bias);
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) acc += w[k] * simd::loadu<T>(xb + t + k);
    simd::storeu<T>(pre + t, acc);
  }
}

template <class T>
SM_INLINE int round_up(int n) {
  constexpr int W = simd::V<T>::W;
  return (n + W - 1) / W * W;
}

// Row buffers of one thread.
template <class T>
struct RowWorkspace {
  std::vector<T> xb, pre, dp;
  RowWorkspace() : xb(kRowChunk + 3 + simd::V<T>::W), pre(kRowChunk), dp(kRowChunk + 3 + simd::V<T>::W) {}
};

// x[t0 - (K-1) .. t0 + n) into xb, zeros before t = 0 and after the n steps.
template <class T, class IO, int K>
SM_INLINE void load_window(const IO* xrow, int64_t t0, int n, T* xb) {
  std::fill(xb, xb + kRowChunk + 3 + simd::V<T>::W, T(0));
  for (int j = 0; j < n + K - 1; ++j) {
    const int64_t t = t0 - (K - 1) + j;
    if (t >= 0) xb[j] = to_compute<T>(xrow[t]);
  }
}

template <class T, class IO, int K>
void forward_row(const Problem<T, IO>& p, int64_t row, IO* out, RowWorkspace<T>& ws) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  const int64_t d = row % p.dim;
  const IO* xrow = p.x + row * p.L;
  for (int64_t t0 = 0; t0 < p.L; t0 += kRowChunk) {
    const int n = int(std::min<int64_t>(kRowChunk, p.L - t0));
    const int count = round_up<T>(n);
    load_window<T, IO, K>(xrow, t0, n, ws.xb.data());
    preactivation<T, K>(ws.xb.data(), p.weight + d * K, p.bias[d], count, ws.pre.data());
    if (p.silu)
      for (int t = 0; t < count; t += W) {
        const vec v = simd::loadu<T>(ws.pre.data() + t);
        simd::storeu<T>(ws.pre.data() + t, v * simd::sigmoid<T>(v));
      }
    IO* orow = out + row * p.L + t0;
    for (int t = 0; t < n; ++t) orow[t] = to_storage<IO>(ws.pre[t]);
  }
}

template <class T, class IO>
struct Grads {
  IO* dx;
  T *dweight, *dbias;  // (dim, K), (dim,)
};

// Chunks are walked backwards so that dx[s] = sum_k w[k] dp[s + (K-1) - k] finds the
// first K-1 values of the next chunk's dp already computed (kept at dp[n ..)).
template <class T, class IO, int K>
void backward_row(const Problem<T, IO>& p, const IO* dout, int64_t row, const Grads<T, IO>& gr, T* dw_part,
                  T* db_part, RowWorkspace<T>& ws) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  const int64_t d = row % p.dim;
  const T* w = p.weight + d * K;
  const IO* xrow = p.x + row * p.L;
  const IO* gorow = dout + row * p.L;
  T* dp = ws.dp.data();
  std::fill(ws.dp.begin(), ws.dp.end(), T(0));
  vec dw[K], db = simd::splat<T>(T(0));
  for (int k = 0; k < K; ++k) dw[k] = simd::splat<T>(T(0));
  const int64_t last_t0 = (p.L - 1) / kRowChunk * kRowChunk;
  for (int64_t t0 = last_t0; t0 >= 0; t0 -= kRowChunk) {
    const int n = int(std::min<int64_t>(kRowChunk, p.L - t0));
    const int count = round_up<T>(n);  // only the last chunk is partial, and it has no successor
    load_window<T, IO, K>(xrow, t0, n, ws.xb.data());
    for (int t = 0; t < n; ++t) dp[t] = to_compute<T>(gorow[t0 + t]);
    std::fill(dp + n, dp + count, T(0));
    if (p.silu) {
      preactivation<T, K>(ws.xb.data(), w, p.bias[d], count, ws.pre.data());
      for (int t = 0; t < count; t += W) {
        const vec v = simd::loadu<T>(ws.pre.data() + t);
        const vec s = simd::sigmoid<T>(v);
        simd::storeu<T>(dp + t, simd::loadu<T>(dp + t) * s * (T(1) + v * (T(1) - s)));
      }
    }
    for (int t = 0; t < count; t += W) {
      const vec g = simd::loadu<T>(dp + t);
      db += g;
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) dw[k] += g * simd::loadu<T>(ws.xb.data() + t + k);
    }
    IO* dxrow = gr.dx + row * p.L + t0;
    for (int s = 0; s < count; s += W) {
      vec acc = simd::splat<T>(T(0));
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) acc += w[k] * simd::loadu<T>(dp + s + (K - 1) - k);
      simd::storeu<T>(ws.pre.data() + s, acc);
    }
    for (int s = 0; s < n; ++s) dxrow[s] = to_storage<IO>(ws.pre[s]);
    // The previous chunk is full (kRowChunk steps): its successor's dp goes right after it.
    std::copy(dp, dp + K - 1, dp + kRowChunk);
  }
  for (int k = 0; k < K; ++k) dw_part[k] = simd::reduce_lanes<T>(dw[k]);
  *db_part = simd::reduce_lanes<T>(db);
}

template <class F>
void with_width(int64_t K, F&& f) {
  switch (K) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

template <class T, class IO>
void forward(const Problem<T, IO>& p, int64_t K, IO* out, int num_threads) {
  const int64_t rows = p.batch * p.dim;
  const int threads = threads_for(num_threads, rows, rows * p.L);
  with_width(K, [&](auto kw) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      RowWorkspace<T> ws;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) forward_row<T, IO, decltype(kw)::value>(p, r, out, ws);
    }
  });
}

// dweight / dbias are summed over the batch from per-row partials (no shared writes).
template <class T, class IO>
void backward(const Problem<T, IO>& p, int64_t K, const IO* dout, const Grads<T, IO>& gr, int num_threads) {
  const int64_t rows = p.batch * p.dim;
  const int threads = threads_for(num_threads, rows, rows * p.L);
  std::unique_ptr<T[]> dw_part(new T[rows * K]), db_part(new T[rows]);
  with_width(K, [&](auto kw) {
    constexpr int KW = decltype(kw)::value;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      RowWorkspace<T> ws;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        backward_row<T, IO, KW>(p, dout, r, gr, dw_part.get() + r * KW, db_part.get() + r, ws);
    }
  });
  for (int64_t d = 0; d < p.dim; ++d) {
    T db = 0;
    for (int64_t b = 0; b < p.batch; ++b) db += db_part[b * p.dim + d];
    gr.dbias[d] = db;
    for (int64_t k = 0; k < K; ++k) {
      T s = 0;
      for (int64_t b = 0; b < p.batch; ++b) s += dw_part[(b * p.dim + d) * K + k];
      gr.dweight[d * K + k] = s;
    }
  }
}

}  // namespace conv
}  // namespace segmamba
