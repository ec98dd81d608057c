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
#include <vector>

#include "order.h"
#include "simd.h"

namespace segmamba {

// A (batch, rows, L) input read in place: each batch element's rows are L contiguous elements,
// one after another, and batch elements are `batch_stride` apart, so that a slice of a larger
// tensor (the x and z halves of the Mamba layer's in_proj output) is read without a copy.
template <class IO>
struct BatchRows {
  const IO* p = nullptr;
  int64_t batch_stride = 0, L = 0;

  explicit operator bool() const { return p != nullptr; }
  const IO* row(int64_t b, int64_t r) const { return p + b * batch_stride + r * L; }
};

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

// The first element of the steps [a, a + n) of a walk from p in direction dir (+1 or -1).
template <class X>
SM_INLINE X* span_start(X* p, int dir, int64_t a, int64_t n) {
  return dir > 0 ? p + a : p - a - (n - 1);
}

// Steps t .. t + W - 1 of a walk from p in direction dir as one vector, and back.
template <class T, class IO>
SM_INLINE simd::vec_t<T> load_steps(const IO* p, int64_t t, int dir) {
  constexpr int W = simd::V<T>::W;
  return dir > 0 ? load_vec<T>(p + t) : simd::reverse<T>(load_vec<T>(p - t - (W - 1)));
}
template <class T, class IO>
SM_INLINE void store_steps(simd::vec_t<T> v, IO* p, int64_t t, int dir) {
  constexpr int W = simd::V<T>::W;
  if (dir > 0)
    store_vec<T>(v, p + t);
  else
    store_vec<T>(simd::reverse<T>(v), p - t - (W - 1));
}

// Where a tile's rows are: step t of lane c at p[c * stride + dir * t] (dir = -1: a reversed
// walk). The W rows are W separate memory streams, too many for the hardware prefetcher to
// follow: while they are read, the rows' steps [ahead, ahead + padded) (the chunk that will be
// loaded next, later or earlier in the walk) are requested; 0: rows already in cache.
template <class IO>
struct Rows {
  const IO* p;
  int64_t stride, ahead;
  int dir = 1;
};

// The same for a tile's output rows.
template <class IO>
struct OutRows {
  IO* p;
  int64_t stride, ahead;
  int dir = 1;
};

// dst[t * W + c] = row c's step t for c < lanes, t < steps; zero elsewhere in the
// [padded_steps][W] tile, so padded lanes and steps contribute nothing.
template <class T, class IO>
inline void load_tile(Rows<IO> src, int lanes, int steps, int padded_steps, T* dst) {
  constexpr int W = simd::V<T>::W;
  const int blocked = block_steps<T>(lanes, steps);
  for (int t = 0; t < blocked; t += W) {
    simd::vec_t<T> r[W];
    for (int c = 0; c < W; ++c) r[c] = load_steps<T>(src.p + c * src.stride, t, src.dir);
    simd::transpose<T>(r);
    for (int i = 0; i < W; ++i) simd::storeu<T>(dst + (t + i) * W, r[i]);
  }
  std::fill(dst + int64_t(blocked) * W, dst + int64_t(padded_steps) * W, T(0));
  for (int c = 0; c < lanes; ++c) {
    const IO* row = src.p + c * src.stride;
    if (src.ahead) prefetch_read_span(span_start(row, src.dir, src.ahead, padded_steps), padded_steps);
    for (int t = blocked; t < steps; ++t) dst[t * W + c] = to_compute<T>(row[src.dir * t]);
  }
}

// The inverse of load_tile. The rows' steps [ahead, ahead + steps) are requested for writing
// now (0: none): outputs are fresh memory, and stores that miss would otherwise wait for their
// lines one by one.
template <class T, class IO>
inline void store_tile(const T* src, int lanes, int steps, OutRows<IO> dst) {
  constexpr int W = simd::V<T>::W;
  if (dst.ahead)
    for (int c = 0; c < lanes; ++c)
      prefetch_write_span(span_start(dst.p + c * dst.stride, dst.dir, dst.ahead, steps), steps);
  const int blocked = block_steps<T>(lanes, steps);
  for (int t = 0; t < blocked; t += W) {
    simd::vec_t<T> r[W];
    for (int i = 0; i < W; ++i) r[i] = simd::loadu<T>(src + (t + i) * W);
    simd::transpose<T>(r);
    for (int c = 0; c < W; ++c) store_steps<T>(r[c], dst.p + c * dst.stride, t, dst.dir);
  }
  for (int c = 0; c < lanes; ++c) {
    IO* row = dst.p + c * dst.stride;
    for (int t = blocked; t < steps; ++t) row[dst.dir * t] = to_storage<IO>(src[t * W + c]);
  }
}

// One row's `steps` steps (from Rows: p, dir, ahead) converted to T and zero-padded to `padded`.
template <class T, class IO>
inline void load_row(Rows<IO> src, int steps, int padded, T* dst) {
  if (src.ahead) prefetch_read_span(span_start(src.p, src.dir, src.ahead, padded), padded);
  if (src.dir > 0)
    for (int t = 0; t < steps; ++t) dst[t] = to_compute<T>(src.p[t]);
  else
    for (int t = 0; t < steps; ++t) dst[t] = to_compute<T>(src.p[-t]);
  std::fill(dst + steps, dst + padded, T(0));
}

// Copies of some rows' steps [t0, t0 + n), in scan order, read by the kernels as contiguous rows
// ("staging"). For inter-slice orders the steps are strided over the rows (one element per slice
// and column): read in place, every step would touch W rows x slices lines that share a few
// cache sets when rows and slices are powers of two long, and they would be evicted before their
// next column is read. The copy reads whole runs (a column range of one slice) at a time.
// Staging also serves rows whose length aliases in the L2 (scan.h: kAliasingRowBytes): when rows
// are a multiple of the L2's set period long (128 KiB on 1 MiB 8-way and 2 MiB 16-way L2s;
// L = 32^3 in fp32 is 128 KiB), every row of a tensor starts at the same offset modulo that
// period, and tensors of equal size allocated one after another nearly so too: a tile's rows of
// all inputs at one time step compete for a handful of cache sets, and lines fetched ahead for
// them evict each other before they are used (measured: the fp32 backward at L = 32^3 ran 10-15%
// faster with L padded by one chunk, or with the inputs placed 16 KiB apart modulo 128 KiB).
// Copied row by row, few rows are in flight at a time, and the copy's padded pitch spreads its
// rows over the sets.
template <class M, class X>  // M: X or const X
struct RowCopy {
  M* mem;  // row c's memory position m at mem[c * stride + m]
  int64_t stride;
  int rows;
  X* staged;  // row c's step t0 + i at staged[c * pitch + i]
};

// Rows requested ahead of the one copied: at most kRowsAhead (rows of one input share cache sets:
// fewer than the ways in flight), and about kLinesAhead lines (a row of an inter-slice batch has
// a line per slice; with too many requests in flight, the next ones wait).
constexpr int kRowsAhead = 6;
constexpr int64_t kLinesAhead = 48;

template <class X>
int rows_ahead(const std::vector<Run>& runs) {
  int64_t lines = 0;
  for (const Run& r : runs) lines += (r.count * int64_t(sizeof(X)) + 63) / 64;
  return int(std::clamp<int64_t>(kLinesAhead / std::max<int64_t>(lines, 1), 1, kRowsAhead));
}

// Row i of the rows of copies[0], then of copies[1], ... (nullptr past the last).
template <class M, class X, size_t K>
SM_INLINE M* mem_row(const RowCopy<M, X> (&copies)[K], int i) {
  for (const RowCopy<M, X>& c : copies) {
    if (i < c.rows) return c.mem + i * c.stride;
    i -= c.rows;
  }
  return nullptr;
}

// Calls copy(mem row, staged row) for every row of `copies`, in order, after requesting the
// row `ahead` further on (prefetch(mem row)).
template <class M, class X, size_t K, class F, class Pf>
SM_INLINE void for_copied_rows(const RowCopy<M, X> (&copies)[K], int64_t pitch, int ahead, F&& copy,
                               Pf&& prefetch) {
  int i = 0;
  for (; i < ahead; ++i)
    if (M* row = mem_row(copies, i)) prefetch(row);
  for (const RowCopy<M, X>& c : copies)
    for (int r = 0; r < c.rows; ++r, ++i) {
      if (M* row = mem_row(copies, i)) prefetch(row);
      copy(c.mem + r * c.stride, c.staged + r * pitch);
    }
}

// Runs that are W-aligned blocks of a grid: consecutive slices of the same columns, run i's
// step k at index(0) + i * lane + k * step. W runs x W columns then move as one W x W block
// transposed in registers (in the compute type T), W consecutive slices of a column being W
// consecutive steps.
struct RunGrid {
  int64_t runs = 0, count = 0, step = 0, lane = 0;  // runs = 0: not a grid
};

template <class T>
inline RunGrid grid_of(const std::vector<Run>& runs) {
  constexpr int W = simd::V<T>::W;
  RunGrid g;
  if (runs.size() < size_t(W)) return g;
  const int64_t lane = runs[1].index - runs[0].index;
  if (lane != 1 && lane != -1) return g;
  for (size_t i = 0; i < runs.size(); ++i)
    if (runs[i].count != runs[0].count || runs[i].step != runs[0].step ||
        runs[i].index != runs[0].index + int64_t(i) * lane)
      return g;
  return {int64_t(runs.size()) / W * W, runs[0].count / W * W, runs[0].step, lane};
}

// Staged rows <- memory, through the runs of the batch; then requests the first rows' runs of
// the next batch (`next`; empty: none).
template <class T, class X, size_t K>
inline void gather_rows(const RowCopy<const X, X> (&copies)[K], int64_t pitch, const std::vector<Run>& runs,
                        const std::vector<Run>& next) {
  constexpr int W = simd::V<T>::W;
  const RunGrid g = grid_of<T>(runs);
  const auto prefetch_runs = [](const std::vector<Run>& rs, const X* row) {
    for (const Run& r : rs) prefetch_read_span(row + r.pos, int(r.count));
  };
  const int ahead = rows_ahead<X>(runs);
  for_copied_rows(
      copies, pitch, ahead,
      [&](const X* mem, X* staged) {
        for (int64_t a = 0; a < g.runs; a += W)
          for (int64_t k = 0; k < g.count; k += W) {
            simd::vec_t<T> r[W];
            for (int l = 0; l < W; ++l) r[l] = load_vec<T>(mem + runs[a + l].pos + k);
            simd::transpose<T>(r);
            for (int c = 0; c < W; ++c) store_steps<T>(r[c], staged + runs[a].index + (k + c) * g.step, 0, int(g.lane));
          }
        for (int64_t i = 0; i < int64_t(runs.size()); ++i) {
          const Run& r = runs[i];
          const X* src = mem + r.pos;
          if (r.step == 1)
            std::copy_n(src, r.count, staged + r.index);
          else if (r.step == -1)
            std::reverse_copy(src, src + r.count, staged + r.index - (r.count - 1));
          else
            for (int64_t k = i < g.runs ? g.count : 0; k < r.count; ++k) staged[r.index + k * r.step] = src[k];
        }
      },
      [&](const X* row) { prefetch_runs(runs, row); });
  for (int i = 0; i < ahead && !next.empty(); ++i)
    if (const X* row = mem_row(copies, i)) prefetch_runs(next, row);
}

// Memory <- staged rows, through the runs of the batch: stored, or added to what is there.
template <class T, class X, size_t K>
inline void scatter_rows(const RowCopy<X, const X> (&copies)[K], int64_t pitch, const std::vector<Run>& runs,
                         bool add) {
  constexpr int W = simd::V<T>::W;
  const RunGrid g = grid_of<T>(runs);
  for_copied_rows(
      copies, pitch, rows_ahead<X>(runs),
      [&](X* mem, const X* staged) {
        for (int64_t a = 0; a < g.runs; a += W)
          for (int64_t k = 0; k < g.count; k += W) {
            simd::vec_t<T> r[W];
            for (int c = 0; c < W; ++c) r[c] = load_steps<T>(staged + runs[a].index + (k + c) * g.step, 0, int(g.lane));
            simd::transpose<T>(r);
            for (int l = 0; l < W; ++l) {
              X* dst = mem + runs[a + l].pos + k;
              store_vec<T>(add ? load_vec<T>(dst) + r[l] : r[l], dst);
            }
          }
        for (int64_t i = 0; i < int64_t(runs.size()); ++i) {
          const Run& r = runs[i];
          const X* src = staged + r.index;
          X* dst = mem + r.pos;
          for (int64_t k = i < g.runs ? g.count : 0; k < r.count; ++k)
            dst[k] = add ? to_storage<X>(to_compute<T>(dst[k]) + to_compute<T>(src[k * r.step])) : src[k * r.step];
        }
      },
      [&](X* row) {
        for (const Run& r : runs) prefetch_write_span(row + r.pos, int(r.count));
      });
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
