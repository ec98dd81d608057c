// Causal depthwise conv1d (docs/design.md §3) forward and backward on the CPU, along a scan
// order (order.h):
//   out[m(t)] = act(bias + sum_k w[k] x[m(t - (K-1) + k)]),  x = 0 before t = 0.
// One (batch, channel) row at a time (OpenMP over rows). A row is its (S, P) grid of slices x
// columns (S = 1 unless inter-slice), walked in chunks of whole columns across every slice and
// vectorised over the columns of a slice, which are consecutive in memory: the step s steps
// back of every column of slice i is the same column of slice i - s, or, past the first slice,
// the previous column of slice S + i - s (forward order: the s-th previous position). A chunk's
// columns of every slice, with the `halo` columns the taps reach beyond them, are converted
// once into a window that stays in cache.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <memory>
#include <vector>

#include "block_io.h"

namespace segmamba {
namespace conv {

constexpr int64_t kRowChunk = 4096;  // elements per chunk, over all slices
// Columns per chunk at least: each slice's run in a chunk is a separate memory stream, too short
// below this for the hardware prefetcher to follow (measured at L = 32^3, S = 32: forward and
// backward 1.5x and 2x the forward order's time with 128 columns, within 10% with 1024).
constexpr int64_t kMinColumns = 1024;

template <class T, class IO>
struct Problem {
  BatchRows<IO> x;
  const T *weight, *bias;  // (dim, K), (dim,)
  int64_t batch, dim, L;
  bool silu;
  Order order;
};

// The source of the step `delta` steps from a step of slice i, in unreversed order (delta = -s
// for the conv's tap s, +s for its transpose; reversed orders flip the sign): slice `slice`,
// `shift` columns away.
struct Tap {
  int64_t slice, shift;
};
inline Tap tap_of(const Order& o, int64_t i, int64_t delta) {
  return {floor_mod(i + delta, o.S), floor_div(i + delta, o.S)};
}

// How a row is chunked: `cols` columns per chunk (the last one fewer), windows of S rows of
// `pitch` elements holding columns [j0 - lo, j0 + cols + hi) of each slice at [0, ...). taps[i][s]
// is the source of the step s steps back of slice i's steps (back: earlier in unreversed order
// for forward orders, later for reversed ones), the same for every chunk.
template <class T, int K>
struct Chunking {
  int64_t S, P, halo, cols, pitch;
  std::vector<std::array<Tap, K>> back, ahead;  // ahead: s steps forward (the transpose's taps)

  explicit Chunking(const Order& o) : S(o.S), P(o.P), back(o.S), ahead(o.S) {
    constexpr int W = simd::V<T>::W;
    halo = (K - 1 + S - 1) / S;  // columns that K - 1 steps span
    cols = std::min(P, (std::max({halo, kRowChunk / S, kMinColumns}) + W - 1) / W * W);
    pitch = (cols + W - 1) / W * W + 2 * halo + W;  // vectors over the padded columns, taps either side
    const int sign = o.reverse ? 1 : -1;
    for (int64_t i = 0; i < S; ++i)
      for (int s = 0; s < K; ++s) {
        back[i][s] = tap_of(o, i, sign * s);
        ahead[i][s] = tap_of(o, i, -sign * s);
      }
  }
};

// Row buffers of one thread.
template <class T>
struct RowWorkspace {
  std::vector<T> xw, dpw, pre, carry;  // windows [S][pitch], [cols], [S][halo]
  template <int K>
  explicit RowWorkspace(const Chunking<T, K>& c)
      : xw(c.S * c.pitch), dpw(c.S * c.pitch), pre(c.pitch), carry(c.S * c.halo) {}
};

// Columns [j0 - lo, j0 + n + hi) of every slice of the row into the window, zero outside the
// slice and after the n + hi columns.
template <class T, int K, class IO>
void load_window(const IO* row, const Chunking<T, K>& c, int64_t j0, int64_t n, int64_t lo, int64_t hi, T* win) {
  const int64_t first = std::max<int64_t>(0, j0 - lo), last = std::min(c.P, j0 + n + hi);
  for (int64_t i = 0; i < c.S; ++i) {
    T* w = win + i * c.pitch;
    const IO* src = row + i * c.P;
    std::fill(w, w + (first - (j0 - lo)), T(0));
    for (int64_t j = first; j < last; ++j) w[j - (j0 - lo)] = to_compute<T>(src[j]);
    std::fill(w + (last - (j0 - lo)), w + c.pitch, T(0));
  }
}

// acc[c] = bias + sum_s wts[s] * taps[s][c] for c < count (a multiple of W).
template <class T, int K>
SM_INLINE void weighted_taps(const T* const (&taps)[K], const T* wts, T bias, int64_t count, T* acc) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  for (int64_t c = 0; c < count; c += W) {
    vec a = simd::splat<T>(bias);
#pragma GCC unroll 4
    for (int s = 0; s < K; ++s) a += wts[s] * simd::loadu<T>(taps[s] + c);
    simd::storeu<T>(acc + c, a);
  }
}

// Pointers to the K taps of a slice in a window whose columns start `lo` before the chunk's:
// taps[s][c] = the value of the step s steps from column c (tap table `table`).
template <class T, int K>
SM_INLINE void taps_of(const std::array<Tap, K>& table, int64_t pitch, const T* win, int64_t lo, const T* (&taps)[K]) {
  for (int s = 0; s < K; ++s) taps[s] = win + table[s].slice * pitch + lo + table[s].shift;
}

template <class T>
SM_INLINE int64_t round_up_w(int64_t n) {
  constexpr int W = simd::V<T>::W;
  return (n + W - 1) / W * W;
}

template <class T, class IO, int K>
void forward_row(const Problem<T, IO>& p, const Chunking<T, K>& c, int64_t row, IO* out, RowWorkspace<T>& ws) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  const Order& o = p.order;
  const int64_t d = row % p.dim;
  const int64_t lo = o.reverse ? 0 : c.halo, hi = o.reverse ? c.halo : 0;
  T wts[K];  // tap s (s steps back) has weight w[K - 1 - s]
  for (int s = 0; s < K; ++s) wts[s] = p.weight[d * K + K - 1 - s];
  for (int64_t j0 = 0; j0 < c.P; j0 += c.cols) {
    const int64_t n = std::min(c.cols, c.P - j0), count = round_up_w<T>(n);
    load_window(p.x.row(row / p.dim, d), c, j0, n, lo, hi, ws.xw.data());
    for (int64_t i = 0; i < c.S; ++i) {
      const T* taps[K];
      taps_of<T, K>(c.back[i], c.pitch, ws.xw.data(), lo, taps);
      weighted_taps<T, K>(taps, wts, p.bias[d], count, ws.pre.data());
      if (p.silu)
        for (int64_t t = 0; t < count; t += W) {
          const vec v = simd::loadu<T>(ws.pre.data() + t);
          simd::storeu<T>(ws.pre.data() + t, v * simd::sigmoid<T>(v));
        }
      IO* orow = out + row * p.L + i * c.P + j0;
      for (int64_t t = 0; t < n; ++t) orow[t] = to_storage<IO>(ws.pre[t]);
    }
  }
}

template <class T, class IO>
struct Grads {
  IO* dx;
  T *dweight, *dbias;  // (dim, K), (dim,)
};

// dp = dL/d(pre-activation); dx[step] = sum_s w[K-1-s] dp[step + s], dw[k] = sum dp x[tap K-1-k].
// Chunks are walked against the scan order (from the last columns for forward orders), so that
// the dp of the `halo` columns after a chunk in scan order is that of the chunk visited just
// before, kept in `carry`.
template <class T, class IO, int K>
void backward_row(const Problem<T, IO>& p, const Chunking<T, K>& c, BatchRows<IO> dout, int64_t row, const Grads<T, IO>& gr,
                  T* dw_part, T* db_part, RowWorkspace<T>& ws) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  const Order& o = p.order;
  const int64_t d = row % p.dim, halo = c.halo;
  const int64_t lo = o.reverse ? 0 : halo, hi = o.reverse ? halo : 0;  // the x window, as in the forward
  const int64_t dlo = hi;  // the dp window's columns start `dlo` before the chunk's (the later steps' side)
  T wts[K];
  for (int s = 0; s < K; ++s) wts[s] = p.weight[d * K + K - 1 - s];
  const IO* xrow = p.x.row(row / p.dim, d);
  const IO* gorow = dout.row(row / p.dim, d);
  IO* dxrow = gr.dx + row * p.L;
  T* dp = ws.dpw.data();
  std::fill(ws.carry.begin(), ws.carry.end(), T(0));
  vec dw[K], db = simd::splat<T>(T(0));
  for (int s = 0; s < K; ++s) dw[s] = simd::splat<T>(T(0));
  const int64_t chunks = (c.P + c.cols - 1) / c.cols;
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t j0 = (o.reverse ? q : chunks - 1 - q) * c.cols;
    const int64_t n = std::min(c.cols, c.P - j0), count = round_up_w<T>(n);
    load_window(xrow, c, j0, n, lo, hi, ws.xw.data());
    for (int64_t i = 0; i < c.S; ++i) {
      T* g = dp + i * c.pitch + dlo;  // column j0 + t of slice i at g[t]
      std::fill(dp + i * c.pitch, g, T(0));
      for (int64_t t = 0; t < n; ++t) g[t] = to_compute<T>(gorow[i * c.P + j0 + t]);
      std::fill(g + n, dp + (i + 1) * c.pitch, T(0));
      const T* taps[K];
      taps_of<T, K>(c.back[i], c.pitch, ws.xw.data(), lo, taps);
      if (p.silu) {
        weighted_taps<T, K>(taps, wts, p.bias[d], count, ws.pre.data());
        for (int64_t t = 0; t < count; t += W) {
          const vec v = simd::loadu<T>(ws.pre.data() + t);
          const vec sg = simd::sigmoid<T>(v);
          simd::storeu<T>(g + t, simd::loadu<T>(g + t) * sg * (T(1) + v * (T(1) - sg)));
        }
      }
      // Columns past n are zero here (the halo is placed below), so they add nothing.
      for (int64_t t = 0; t < count; t += W) {
        const vec gv = simd::loadu<T>(g + t);
        db += gv;
#pragma GCC unroll 4
        for (int s = 0; s < K; ++s) dw[s] += gv * simd::loadu<T>(taps[s] + t);
      }
    }
    // The dp of the halo columns on the later steps' side: the chunk visited before this one.
    for (int64_t i = 0; i < c.S; ++i) {
      T* g = dp + i * c.pitch + dlo;
      std::copy_n(ws.carry.data() + i * halo, halo, o.reverse ? g - halo : g + n);
    }
    for (int64_t i = 0; i < c.S; ++i) {
      const T* taps[K];
      taps_of<T, K>(c.ahead[i], c.pitch, dp, dlo, taps);
      weighted_taps<T, K>(taps, wts, T(0), count, ws.pre.data());
      IO* dx = dxrow + i * c.P + j0;
      for (int64_t t = 0; t < n; ++t) dx[t] = to_storage<IO>(ws.pre[t]);
    }
    // Keep this chunk's dp on the side of the chunk visited next (its halo there). Reaching past
    // a short chunk reads the old halo, which continues it.
    for (int64_t i = 0; i < c.S; ++i) {
      const T* g = dp + i * c.pitch + dlo;
      std::copy_n(o.reverse ? g + n - halo : g, halo, ws.carry.data() + i * halo);
    }
  }
  for (int s = 0; s < K; ++s) dw_part[K - 1 - s] = simd::reduce_lanes<T>(dw[s]);
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
    constexpr int KW = decltype(kw)::value;
    const Chunking<T, KW> c(p.order);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      RowWorkspace<T> ws(c);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) forward_row<T, IO, KW>(p, c, r, out, ws);
    }
  });
}

// dweight / dbias are summed over the batch from per-row partials (no shared writes).
template <class T, class IO>
void backward(const Problem<T, IO>& p, int64_t K, BatchRows<IO> dout, const Grads<T, IO>& gr, int num_threads) {
  const int64_t rows = p.batch * p.dim;
  const int threads = threads_for(num_threads, rows, rows * p.L);
  std::unique_ptr<T[]> dw_part(new T[rows * K]), db_part(new T[rows]);
  with_width(K, [&](auto kw) {
    constexpr int KW = decltype(kw)::value;
    const Chunking<T, KW> c(p.order);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      RowWorkspace<T> ws(c);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        backward_row<T, IO, KW>(p, c, dout, r, gr, dw_part.get() + r * KW, db_part.get() + r, ws);
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
