// Moving (channel, time) tiles between the (batch, dim, L) tensors and small
// transposed buffers in which one SIMD vector holds W channels at one time step.
// Storage-dtype conversion (bf16 / fp16 <-> fp32) happens here, once per element.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>

#include "simd.h"

namespace segmamba {

// Threads to use for `items` independent work items totalling `work` elementary
// steps: small problems stay on one thread, since waking an OpenMP team costs
// more than they take (and much more on a busy machine).
inline int threads_for(int num_threads, int64_t items, int64_t work) {
  constexpr int64_t kMinWorkPerThread = int64_t(1) << 16;
  const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), items, by_work})));
}

template <class T, class IO>
SM_INLINE T to_compute(IO x) { return static_cast<T>(x); }

template <class IO, class T>
SM_INLINE IO to_storage(T x) { return static_cast<IO>(x); }

// W consecutive elements as one vector of the compute type.
template <class T, class IO>
SM_INLINE simd::vec_t<T> load_vec(const IO* p) {
  if constexpr (std::is_same_v<T, IO>) {
    return simd::loadu<T>(p);
  } else {
    simd::vec_t<T> v;
    for (int i = 0; i < simd::V<T>::W; ++i) v[i] = to_compute<T>(p[i]);
    return v;
  }
}

template <class T, class IO>
SM_INLINE void store_vec(simd::vec_t<T> v, IO* p) {
  if constexpr (std::is_same_v<T, IO>) {
    simd::storeu<T>(p, v);
  } else {
    for (int i = 0; i < simd::V<T>::W; ++i) p[i] = to_storage<IO>(v[i]);
  }
}

// Requests the line at p into L2, not L1: a chunk's rows of all streams together
// exceed L1, where prefetched lines would be evicted before they are used.
template <class X>
SM_INLINE void prefetch_read(const X* p) { __builtin_prefetch(p, 0, 2); }
template <class X>
SM_INLINE void prefetch_write(X* p) { __builtin_prefetch(p, 1, 2); }

// prefetch_read / prefetch_write of the lines holding the n elements from p.
template <class X>
SM_INLINE void prefetch_read_span(const X* p, int n) {
  for (int t = 0; t < n; t += 64 / int(sizeof(X))) prefetch_read(p + t);
}
template <class X>
SM_INLINE void prefetch_write_span(X* p, int n) {
  for (int t = 0; t < n; t += 64 / int(sizeof(X))) prefetch_write(p + t);
}

// Steps of a tile moved as whole W x W blocks (transposed in registers); the
// rest, and tiles with fewer than W lanes, go element by element.
template <class T>
SM_INLINE int block_steps(int lanes, int steps) {
  constexpr int W = simd::V<T>::W;
  return lanes == W ? steps / W * W : 0;
}

// Where a tile's rows are read from: lane c's row at p + c * stride. The W rows are
// W separate memory streams, too many for the hardware prefetcher to follow: while
// they are read, the segment `ahead` elements away (the chunk that will be loaded
// next, forwards or backwards in time) is requested; 0: rows already in cache.
template <class IO>
struct Rows {
  const IO* p;
  int64_t stride, ahead;
};

// dst[t * W + c] = row c's element t for c < lanes, t < steps; zero elsewhere in the
// [padded_steps][W] tile, so padded lanes and steps contribute nothing.
template <class T, class IO>
inline void load_tile(Rows<IO> src, int lanes, int steps, int padded_steps, T* dst) {
  constexpr int W = simd::V<T>::W;
  const int blocked = block_steps<T>(lanes, steps);
  for (int t = 0; t < blocked; t += W) {
    simd::vec_t<T> r[W];
    for (int c = 0; c < W; ++c) r[c] = load_vec<T>(src.p + c * src.stride + t);
    simd::transpose<T>(r);
    for (int i = 0; i < W; ++i) simd::storeu<T>(dst + (t + i) * W, r[i]);
  }
  std::fill(dst + int64_t(blocked) * W, dst + int64_t(padded_steps) * W, T(0));
  for (int c = 0; c < lanes; ++c) {
    const IO* row = src.p + c * src.stride;
    if (src.ahead) prefetch_read_span(row + src.ahead, padded_steps);
    for (int t = blocked; t < steps; ++t) dst[t * W + c] = to_compute<T>(row[t]);
  }
}

// The inverse of load_tile. The rows' segment `prefetch_ahead` elements away is
// requested for writing now: outputs are fresh memory, and stores that miss
// would otherwise wait for their lines one by one.
template <class T, class IO>
inline void store_tile(const T* src, int lanes, int steps, int64_t row_stride, IO* dst, int64_t prefetch_ahead) {
  constexpr int W = simd::V<T>::W;
  for (int c = 0; c < lanes; ++c) prefetch_write_span(dst + c * row_stride + prefetch_ahead, steps);
  const int blocked = block_steps<T>(lanes, steps);
  for (int t = 0; t < blocked; t += W) {
    simd::vec_t<T> r[W];
    for (int i = 0; i < W; ++i) r[i] = simd::loadu<T>(src + (t + i) * W);
    simd::transpose<T>(r);
    for (int c = 0; c < W; ++c) store_vec<T>(r[c], dst + c * row_stride + t);
  }
  for (int c = 0; c < lanes; ++c) {
    IO* row = dst + c * row_stride;
    for (int t = blocked; t < steps; ++t) row[t] = to_storage<IO>(src[t * W + c]);
  }
}

// A row of `steps` elements converted to T and zero-padded to `padded`; the
// segment `prefetch_ahead` elements away is requested now (0: none; see Rows).
template <class T, class IO>
inline void load_row(const IO* src, int steps, int padded, T* dst, int64_t prefetch_ahead) {
  if (prefetch_ahead) prefetch_read_span(src + prefetch_ahead, padded);
  for (int t = 0; t < steps; ++t) dst[t] = to_compute<T>(src[t]);
  std::fill(dst + steps, dst + padded, T(0));
}

// Copies of input rows into a dense per-thread buffer, a batch of steps at a time.
// Why: when rows are a multiple of the L2's set period long (128 KiB on 1 MiB 8-way
// and 2 MiB 16-way L2s; L = 32^3 in fp32 is 128 KiB), every row of a tensor starts at
// the same offset modulo that period, and tensors of equal size allocated one after
// another nearly so too: a tile's rows of all inputs at one time step compete for a
// handful of cache sets, and lines fetched ahead for them evict each other before
// they are used (measured: the fp32 backward at L = 32^3 ran 10-15% faster with L
// padded by one chunk, or with the inputs placed 16 KiB apart modulo 128 KiB).
// Copied row by row, few rows are in flight at a time, and the buffer's padded
// pitch spreads its rows over the sets.
template <class IO>
struct RowCopy {
  const IO* src;  // row c, step t at src[c * stride + t]
  int64_t stride;
  int rows;
  IO* dst;  // row c at dst[c * pitch]
};

// Copies `steps` elements of every row of `copies`, in order, with the rows
// kRowsAhead further on requested meanwhile; then requests the first rows of the
// next batch, `next` elements away from this one's (0: none).
template <class IO, size_t K>
inline void stage_rows(const RowCopy<IO> (&copies)[K], int steps, int64_t pitch, int64_t next) {
  constexpr int kRowsAhead = 6;  // rows of one input share cache sets: fewer than the ways in flight
  // Row i of the batch: the rows of copies[0], then of copies[1], ...
  const auto source = [&](int i) -> const IO* {
    for (const RowCopy<IO>& c : copies) {
      if (i < c.rows) return c.src + i * c.stride;
      i -= c.rows;
    }
    return nullptr;
  };
  int i = 0;
  for (; i < kRowsAhead; ++i)
    if (const IO* row = source(i)) prefetch_read_span(row, steps);
  for (const RowCopy<IO>& c : copies)
    for (int r = 0; r < c.rows; ++r, ++i) {
      if (const IO* row = source(i)) prefetch_read_span(row, steps);
      std::copy_n(c.src + r * c.stride, steps, c.dst + r * pitch);
    }
  if (next)
    for (i = 0; i < kRowsAhead; ++i)
      if (const IO* row = source(i)) prefetch_read_span(row + next, steps);
}

// One vector of per-channel parameters p[d0 .. d0 + lanes), zero-padded.
template <class T>
inline simd::vec_t<T> load_channels(const T* p, int lanes) {
  if (lanes == simd::V<T>::W) return simd::loadu<T>(p);
  simd::vec_t<T> v = simd::splat<T>(T(0));
  for (int c = 0; c < lanes; ++c) v[c] = p[c];
  return v;
}

template <class T>
inline void store_channels(simd::vec_t<T> v, int lanes, T* p) {
  if (lanes == simd::V<T>::W) return simd::storeu<T>(p, v);
  for (int c = 0; c < lanes; ++c) p[c] = v[c];
}

// store_channels for data read back much later: whole aligned vectors bypass the
// cache (simd::stream; the caller fences), the rest are stored normally.
template <class T>
inline void stream_channels(simd::vec_t<T> v, int lanes, T* p) {
  if (lanes == simd::V<T>::W && reinterpret_cast<uintptr_t>(p) % simd::kVecBytes == 0) return simd::stream<T>(p, v);
  store_channels(v, lanes, p);
}

// Scratch of n elements starting on a cache line: stream_channels streams into it
// (without alignment, every store there would read its line first).
template <class T>
using LineArray = std::unique_ptr<T[], void (*)(void*)>;

template <class T>
LineArray<T> line_array(int64_t n) {
  if (n == 0) return {nullptr, std::free};
  void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  return {static_cast<T*>(p), std::free};
}

}  // namespace segmamba
