// Selective scan (docs/design.md §3) forward and backward on the CPU.
//
// Layout of the work: one work item ("tile") is W consecutive channels of one
// (batch, group) in the forward, up to kBwdVectors such blocks in the backward,
// so a SIMD vector holds W channels and B/C are scalars shared by all lanes.
// Time is walked in chunks of kChunk scan steps; the chunk's inputs are converted once
// into transposed tiles. States are independent across n, so the N states are
// processed in groups kept in registers, each group walking the whole chunk.
//
// Scan orders (order.h) change only where a step's data lives: for forward and
// reverse orders a chunk is a run of a row, read forwards or backwards in place; for
// inter-slice orders its steps are strided over the slices, so the inputs are copied
// ("staged"), a batch of steps at a time, into per-thread rows in scan order, and the
// outputs are written back from such rows (block_io.h: RowCopy says why).
//
// Nothing of size (batch, dim, L, N) is ever stored: when a backward will
// follow, the forward saves the state at each scan chunk boundary ("chunk states",
// (batch, chunks, N, dim): N / kChunk floats per element of u). The backward
// visits chunks in reverse; each chunk's states are recomputed from its
// boundary, recording what the reverse recurrence for dL/dh then reads back.
// Saving the boundaries costs the forward a few stores per chunk and spares the
// backward a whole forward recurrence. When rows are long multiples of a power of
// two, the backward reads its inputs from staged rows too (kAliasingRowBytes).
#pragma once

#include <omp.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "block_io.h"

namespace segmamba {
namespace scan {

// Steps per chunk, a multiple of every W: short enough that the backward's per-chunk
// records (which grow with the vector width) stay near L1, long enough to keep the
// saved chunk states (N / kChunk floats per element) small.
constexpr int kChunk = SEGMAMBA_VEC_BYTES == 64 ? 32 : 64;
// How far ahead rows read or written in place are requested (scan steps; see Rows).
constexpr int64_t kAhead = 2 * kChunk;
// Rows a multiple of this many bytes long start on at most 4 set positions of an L2
// with a 128 KiB set period (1 MiB 8-way, 2 MiB 16-way): the backward then reads its
// inputs from staged rows, kStage steps at a time. Not below: at L = 16^3 in fp32
// (16 KiB rows) the copies cost more than they save.
constexpr int64_t kAliasingRowBytes = 32 * 1024;
constexpr int kStage = 128;
static_assert(kStage % kChunk == 0);
// Inter-slice orders are staged in batches of about kStageSteps steps, whole columns, each
// slice's run of a row covering one to four cache lines: every line is read from memory once,
// and longer runs amortise a page's translation over more lines (measured at L = 32^3, S = 32:
// 256-byte runs took the staging overhead of the forward from 8 to 6 ms, the backward's from 15
// to 9 ms, against 64-byte ones).
constexpr int64_t kStageSteps = 2048;
constexpr int64_t kStageRunBytes[2] = {64, 256};  // fewest, most

// States per register-resident group: AVX-512 has 32 vector registers, the others 16.
constexpr int kMaxStates = SEGMAMBA_VEC_BYTES == 64 ? 8 : 4;
// The backward's recurrences keep per state and vector one value in registers (the
// state, the carry), and (AVX-512) walk up to three SIMD blocks of channels at once
// ("vectors") so that the lane reductions of dB and dC are shared by all of them.
constexpr int kBwdVectors = SEGMAMBA_VEC_BYTES == 64 ? 3 : 1;
constexpr int kMaxStatesBwd = 4;

template <class T, class IO>
struct Problem {
  BatchRows<IO> u, delta, B, C, z;  // B, C: groups * N rows; z empty: no gate
  const T *A, *D, *delta_bias;
  int64_t batch, dim, L, N, groups;
  bool softplus;
  Order order;  // where each scan step is along L

  static constexpr int W = simd::V<T>::W;
  int64_t per_group() const { return dim / groups; }
  int64_t blocks_per_group() const { return (per_group() + W - 1) / W; }
  int64_t num_tiles() const { return batch * groups * blocks_per_group(); }
  int64_t num_chunks() const { return (L + kChunk - 1) / kChunk; }
};

// One SIMD block: up to W consecutive channels of one (batch, group).
struct Tile {
  int64_t b, g, d0;
  int lanes;
};

// A work item's first rows of the inputs (z: nullptr without a gate; dout: in the backward).
template <class IO>
struct InputRows {
  const IO *u, *delta, *z, *B, *C, *dout;
};

template <class T, class IO>
InputRows<IO> input_rows(const Problem<T, IO>& p, const Tile& tl, BatchRows<IO> dout = {}) {
  return {p.u.row(tl.b, tl.d0), p.delta.row(tl.b, tl.d0), p.z ? p.z.row(tl.b, tl.d0) : nullptr,
          p.B.row(tl.b, tl.g * p.N), p.C.row(tl.b, tl.g * p.N), dout ? dout.row(tl.b, tl.d0) : nullptr};
}

template <class T, class IO>
Tile tile_of(const Problem<T, IO>& p, int64_t i) {
  const int64_t nblk = p.blocks_per_group();
  const int64_t bg = i / nblk, blk = i % nblk;
  Tile t;
  t.b = bg / p.groups;
  t.g = bg % p.groups;
  t.d0 = t.g * p.per_group() + blk * Problem<T, IO>::W;
  t.lanes = int(std::min<int64_t>(Problem<T, IO>::W, p.per_group() - blk * Problem<T, IO>::W));
  return t;
}

// Per-thread scratch, reused across tiles. Per-step buffers hold kBwdVectors
// blocks of kChunk steps ([vector][step]); the forward uses the first block.
template <class T>
struct Workspace {
  using vec = simd::vec_t<T>;
  static constexpr int W = simd::V<T>::W;
  std::vector<vec> u, dt, dtu, dsoftplus, z, zsig, dout, dy, y, gb, ddtA;  // [V][kChunk]
  std::vector<T> B, C;                                                     // [N][kChunk]
  std::vector<vec> A, A2, h, carry, dA;                                    // [N][V]
  std::vector<vec> rec;  // [kChunk][kMaxStatesBwd * V][2]: the recompute's records (see advance_states)
  std::vector<vec> redB, redC;                                             // [kMaxStatesBwd][W]

  explicit Workspace(int64_t N)
      : u(kV), dt(kV), dtu(kV), dsoftplus(kV), z(kV), zsig(kV), dout(kV), dy(kV), y(kV), gb(kV),
        ddtA(kV), B(N * kChunk), C(N * kChunk), A(N * kBwdVectors), A2(N * kBwdVectors), h(N * kBwdVectors),
        carry(N * kBwdVectors), dA(N * kBwdVectors), rec(2 * kMaxStatesBwd * kV),
        redB(kMaxStatesBwd * W), redC(kMaxStatesBwd * W) {}

 private:
  static constexpr int kV = kBwdVectors * kChunk;
};

template <class T>
SM_INLINE T* scalars(simd::vec_t<T>* v) { return reinterpret_cast<T*>(v); }

// Where the tile's state n before chunk k lives in the (batch, chunks, N, dim) chunk states.
template <class T, class IO>
SM_INLINE int64_t chunk_state_offset(const Problem<T, IO>& p, const Tile& tl, int64_t k, int64_t n) {
  return ((tl.b * p.num_chunks() + k) * p.N + n) * p.dim + tl.d0;
}

// Calls f(std::integral_constant<int, NB>, n0) for consecutive groups of states covering [0, N).
template <int kMax, class F>
SM_INLINE void for_state_groups(int64_t N, F&& f) {
  int64_t n = 0;
  if constexpr (kMax >= 8)
    for (; n + 8 <= N; n += 8) f(std::integral_constant<int, 8>{}, n);
  if constexpr (kMax >= 4)
    for (; n + 4 <= N; n += 4) f(std::integral_constant<int, 4>{}, n);
  for (; n + 2 <= N; n += 2) f(std::integral_constant<int, 2>{}, n);
  if (n < N) f(std::integral_constant<int, 1>{}, n);
}

// Per-channel A (and A * log2(e), the argument scale of exp2) as vectors, state n
// at A[n * stride].
template <class T, class IO>
void load_A(const Problem<T, IO>& p, const Tile& tl, int stride, simd::vec_t<T>* A, simd::vec_t<T>* A2) {
  for (int64_t n = 0; n < p.N; ++n) {
    simd::vec_t<T> a = simd::splat<T>(T(0));
    for (int c = 0; c < tl.lanes; ++c) a[c] = p.A[(tl.d0 + c) * p.N + n];
    A[n * stride] = a;
    A2[n * stride] = a * simd::kLog2e<T>;
  }
}

// Loads one chunk of u and delta of block tl into the kChunk steps starting at
// index `at` of the per-step buffers, and derives dt (bias, softplus), dt * u and,
// when asked, d softplus / d(delta + bias).
template <class T, class IO>
void load_dt(const Problem<T, IO>& p, const Tile& tl, Rows<IO> u_rows, Rows<IO> delta_rows, int steps,
             bool with_dsoftplus, Workspace<T>& ws, int at = 0) {
  using vec = simd::vec_t<T>;
  vec *u = ws.u.data() + at, *dt = ws.dt.data() + at, *dtu = ws.dtu.data() + at;
  vec* dsoftplus = ws.dsoftplus.data() + at;
  load_tile(u_rows, tl.lanes, steps, kChunk, scalars<T>(u));
  load_tile(delta_rows, tl.lanes, steps, kChunk, scalars<T>(dt));  // delta, then dt in place
  const vec bias = load_channels(p.delta_bias + tl.d0, tl.lanes);
  for (int t = 0; t < kChunk; ++t) {
    const vec s = dt[t] + bias;
    vec d = s;
    if (p.softplus) d = with_dsoftplus ? simd::softplus<T, true>(s, &dsoftplus[t]) : simd::softplus<T>(s);
    dt[t] = d;
    dtu[t] = d * u[t];
  }
}

// One chunk of the N rows of B or C into [N][kChunk].
template <class T, class IO>
void load_bc_rows(Rows<IO> rows, int64_t N, int steps, T* dst) {
  for (int64_t n = 0; n < N; ++n)
    load_row(Rows<IO>{rows.p + n * rows.stride, rows.stride, rows.ahead, rows.dir}, steps, kChunk, dst + n * kChunk);
}

// How sums reach their destination: added to it, stored, or stored bypassing the cache (for
// data read back much later; the caller fences before other threads read it).
enum class Write { kAdd, kStore, kStream };

// Where a tile group's shares of dB and dC for one chunk go: state n's value of the chunk's
// step t at B[n * stride + dir * t] (C likewise).
template <class T>
struct BCRows {
  T *B, *C;
  int64_t stride;
  int dir;
  Write mode;
};

// acc[dir * i] (+)= the sum of the lanes of red[i], for i < min(W, valid). The N rows of dB and
// dC (2 MB each at L = 32^3) are written a line at a time, far apart and never read back by
// this thread: the first writer's lines bypass the cache (Write::kStream).
template <class T>
SM_INLINE void add_lane_sums(simd::vec_t<T>* red, T* acc, int64_t valid, Write mode, int dir) {
  constexpr int W = simd::V<T>::W;
  simd::vec_t<T> s = simd::reduce_lanes_batch<T>(red);
  if (valid >= W) {
    if (dir < 0) {
      s = simd::reverse<T>(s);
      acc -= W - 1;
    }
    if (mode == Write::kStream)
      stream_channels(s, W, acc);
    else if (mode == Write::kStore)
      simd::storeu<T>(acc, s);
    else
      simd::storeu<T>(acc, simd::loadu<T>(acc) + s);
  } else {
    for (int i = 0; i < valid; ++i) acc[dir * i] = mode == Write::kAdd ? acc[dir * i] + s[i] : s[i];
  }
}

// Advances NB states of V vectors over `steps` steps of a chunk (state k of
// vector v at h[k * V + v]; per-step buffers [V][kChunk]):
//   h_t = a_t h_{t-1} + dt u B with a_t = exp(dt * A);  y += C . h_t  (kY).
// kRecord (the backward's recompute, always whole chunks): h_{t-1} and a_t are
// recorded for the reverse pass, step by step (rec[(t * NB * V + i) * 2 + {0, 1}]
// for state-vector i: the reverse pass reads them back as one stream), and dy_t h_t
// summed over the channels goes to dC (rows.C for state k; `valid` steps).
template <class T, int NB, int V, bool kY, bool kRecord>
SM_INLINE void advance_states(const simd::vec_t<T>* A2, simd::vec_t<T>* h, const simd::vec_t<T>* dt,
                              const simd::vec_t<T>* dtu, const T* Bn, const T* Cn, simd::vec_t<T>* y,
                              int steps, const simd::vec_t<T>* dy, simd::vec_t<T>* rec, simd::vec_t<T>* redC,
                              BCRows<T> rows, int64_t valid) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  vec a2[NB * V], hh[NB * V];
  for (int i = 0; i < NB * V; ++i) {
    a2[i] = A2[i];
    hh[i] = h[i];
  }
  for (int t = 0; t < steps; ++t) {
    vec acc[V];
    for (int v = 0; v < V; ++v) acc[v] = simd::splat<T>(T(0));
#pragma GCC unroll 8
    for (int k = 0; k < NB; ++k) {
      const T b = Bn[k * kChunk + t], c = Cn[k * kChunk + t];
      vec dc = simd::splat<T>(T(0));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const int i = k * V + v;
        const vec e = simd::exp2<T>(dt[v * kChunk + t] * a2[i]);
        if constexpr (kRecord) {
          rec[(t * NB * V + i) * 2] = hh[i];
          rec[(t * NB * V + i) * 2 + 1] = e;
          hh[i] = e * hh[i] + dtu[v * kChunk + t] * b;
          dc += dy[v * kChunk + t] * hh[i];
        } else {
          hh[i] = e * hh[i] + dtu[v * kChunk + t] * b;
        }
        if constexpr (kY) acc[v] += hh[i] * c;
      }
      if constexpr (kRecord) redC[k * W + t % W] = dc;
    }
    if constexpr (kY)
      for (int v = 0; v < V; ++v) y[v * kChunk + t] += acc[v];
    if constexpr (kRecord)
      if (t % W == W - 1)
        for (int k = 0; k < NB; ++k)
          add_lane_sums<T>(redC + k * W, rows.C + k * rows.stride + rows.dir * (t - (W - 1)), valid - (t - (W - 1)),
                           rows.mode, rows.dir);
  }
  for (int i = 0; i < NB * V; ++i) h[i] = hh[i];
}

// Reverse recurrence over one whole chunk for NB states of V vectors, from the
// records of advance_states:
//   g_t = dy_t C_t + a_{t+1} g_{t+1}           (carry = a_{t+1} g_{t+1})
//   dB_t += sum over channels of g_t dt_t u_t  (rows.B, as dC in advance_states)
//   gb_t += g_t B_t                            (-> du = gb dt, ddt = gb u)
//   x = a_t g_t h_{t-1}:  ddt += x A,  dA += x dt
// h_{t-1} is recorded rather than recovered as (h_t - dt u B) / a_t, which cancels
// badly when a_t is tiny and |A| large. The recurrence leaves x in place of
// h_{t-1}, and a second pass over the chunk sums it into ddt and dA: done in
// the recurrence, the dA accumulators no longer fit in registers beside the
// carries, and the spills cost more than that pass.
template <class T, int NB, int V>
SM_INLINE void reverse_states(const simd::vec_t<T>* A, simd::vec_t<T>* carry, simd::vec_t<T>* dA,
                              simd::vec_t<T>* rec, const simd::vec_t<T>* dt, const simd::vec_t<T>* dtu,
                              const simd::vec_t<T>* dy, const T* Bn, const T* Cn, simd::vec_t<T>* gb,
                              simd::vec_t<T>* ddtA, simd::vec_t<T>* redB, BCRows<T> rows, int64_t valid) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  vec c[NB * V];
  for (int i = 0; i < NB * V; ++i) c[i] = carry[i];
  for (int t = kChunk - 1; t >= 0; --t) {
    vec* r = rec + t * NB * V * 2;
    vec gbt[V];
    for (int v = 0; v < V; ++v) gbt[v] = simd::splat<T>(T(0));
#pragma GCC unroll 8
    for (int k = 0; k < NB; ++k) {
      const T b = Bn[k * kChunk + t], cc = Cn[k * kChunk + t];
      vec db = simd::splat<T>(T(0));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const int i = k * V + v;
        const vec g = dy[v * kChunk + t] * cc + c[i];
        c[i] = r[2 * i + 1] * g;  // a_t g_t: the next carry, and x / h_{t-1}
        db += g * dtu[v * kChunk + t];
        gbt[v] += g * b;
        r[2 * i] *= c[i];
      }
      redB[k * W + t % W] = db;
    }
    for (int v = 0; v < V; ++v) gb[v * kChunk + t] += gbt[v];
    if (t % W == 0)
      for (int k = 0; k < NB; ++k)
        add_lane_sums<T>(redB + k * W, rows.B + k * rows.stride + rows.dir * t, valid - t, rows.mode, rows.dir);
  }
  for (int i = 0; i < NB * V; ++i) carry[i] = c[i];

  vec da[NB * V];
  for (int i = 0; i < NB * V; ++i) da[i] = dA[i];
  for (int t = 0; t < kChunk; ++t) {
    const vec* x = rec + t * NB * V * 2;
    vec ddt[V];
    for (int v = 0; v < V; ++v) ddt[v] = simd::splat<T>(T(0));
#pragma GCC unroll 8
    for (int k = 0; k < NB; ++k)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const int i = k * V + v;
        ddt[v] += x[2 * i] * A[i];
        da[i] += x[2 * i] * dt[v * kChunk + t];
      }
    for (int v = 0; v < V; ++v) ddtA[v * kChunk + t] += ddt[v];
  }
  for (int i = 0; i < NB * V; ++i) dA[i] = da[i];
}

// ------------------------------------------------------------------ staging

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Steps per staged batch: kStage for contiguous orders (aliasing rows); for inter-slice orders
// about kStageSteps in whole columns and chunks, so that every batch starts on a column and its
// runs form a grid (RunGrid); where that multiple is much larger, in whole chunks only.
template <class IO>
int64_t stage_steps(const Order& o) {
  if (o.contiguous()) return kStage;
  constexpr int64_t kSize = sizeof(IO);
  const int64_t columns = std::clamp(kStageSteps / o.S, kStageRunBytes[0] / kSize, kStageRunBytes[1] / kSize);
  const int64_t wanted = o.S * columns, aligned = round_up(wanted, std::lcm(o.S, int64_t(kChunk)));
  return std::min(aligned <= 2 * wanted ? aligned : round_up(wanted, kChunk), round_up(o.L, kChunk));
}

// The batch of staged steps [t0, t0 + steps) of one work item: its runs, and those of the batch
// visited next (prefetched while this one is copied).
struct Batch {
  int64_t t0 = -1, steps = 0;
  std::vector<Run> runs, next;

  // Moves to the batch starting at t0; `next_t0` < 0: none follows.
  void move_to(const Order& o, int64_t t0_, int64_t batch_steps, int64_t next_t0) {
    t0 = t0_;
    steps = std::min(batch_steps, o.L - t0);
    runs_of(o, t0, steps, runs);
    if (next_t0 >= 0)
      runs_of(o, next_t0, std::min(batch_steps, o.L - next_t0), next);
    else
      next.clear();
  }
};

// ------------------------------------------------------------------ forward

// Per-thread staged rows of the forward (inter-slice orders only): u, delta, z of a tile's
// channels, B and C of its (batch, group), and its output, in scan order.
template <class T, class IO>
struct ForwardStage {
  int64_t batch_steps, pitch;  // batch_steps = 0: nothing staged
  std::vector<IO> u, delta, z, B, C, out;
  Batch batch;

  ForwardStage(const Order& o, int64_t N)
      : batch_steps(o.contiguous() ? 0 : stage_steps<IO>(o)),
        pitch(batch_steps ? batch_steps + 64 / int64_t(sizeof(IO)) : 0),  // a line of padding per row
        u(simd::V<T>::W * pitch), delta(u.size()), z(u.size()), B(N * pitch), C(N * pitch), out(u.size()) {}

  void stage(const Problem<T, IO>& p, const InputRows<IO>& in, int lanes, int64_t t0) {
    const int64_t next = t0 + batch_steps < p.L ? t0 + batch_steps : -1;
    batch.move_to(p.order, t0, batch_steps, next);
    const RowCopy<const IO, IO> copies[] = {
        {in.u, p.L, lanes, u.data()},
        {in.delta, p.L, lanes, delta.data()},
        {in.z, p.L, in.z ? lanes : 0, z.data()},
        {in.B, p.L, int(p.N), B.data()},
        {in.C, p.L, int(p.N), C.data()},
    };
    gather_rows<T>(copies, pitch, batch.runs, batch.next);
  }

  void flush(IO* out_row0, int64_t L, int lanes) {
    const RowCopy<IO, const IO> copies[] = {{out_row0, L, lanes, out.data()}};
    scatter_rows<T>(copies, pitch, batch.runs, false);
  }
};

template <class T, class IO>
void forward_tile(const Problem<T, IO>& p, const Tile& tl, IO* out, T* last_state, T* chunk_states,
                  Workspace<T>& ws, ForwardStage<T, IO>& st) {
  using vec = simd::vec_t<T>;
  const Order& o = p.order;
  load_A(p, tl, 1, ws.A.data(), ws.A2.data());
  std::fill(ws.h.begin(), ws.h.end(), simd::splat<T>(T(0)));
  const vec Dv = load_channels(p.D + tl.d0, tl.lanes);
  const InputRows<IO> rows = input_rows(p, tl);
  IO* const out_rows = out + (tl.b * p.dim + tl.d0) * p.L;
  const bool staged = st.batch_steps > 0;
  for (int64_t t0 = 0; t0 < p.L; t0 += kChunk) {
    const int steps = int(std::min<int64_t>(kChunk, p.L - t0));
    if (staged && t0 % st.batch_steps == 0) {
      if (t0 > 0) st.flush(out_rows, p.L, tl.lanes);
      st.stage(p, rows, tl.lanes, t0);
    }
    // Chunk states are read only by the backward, later and in reverse order: caching them
    // now would only evict the forward's own data.
    if (chunk_states)
      for (int64_t n = 0; n < p.N; ++n)
        stream_channels(ws.h[n], tl.lanes, chunk_states + chunk_state_offset(p, tl, t0 / kChunk, n));
    // The chunk's rows of a tensor (from its first row `mem`): staged, or in place.
    const int64_t at = t0 - st.batch.t0, pos = o.position(t0);
    const auto in = [&](const IO* mem, const std::vector<IO>& copy) {
      return staged ? Rows<IO>{copy.data() + at, st.pitch, 0} : Rows<IO>{mem + pos, p.L, kAhead, o.dir()};
    };
    load_dt(p, tl, in(rows.u, st.u), in(rows.delta, st.delta), steps, false, ws);
    load_bc_rows(in(rows.B, st.B), p.N, steps, ws.B.data());
    load_bc_rows(in(rows.C, st.C), p.N, steps, ws.C.data());
    std::fill_n(ws.y.begin(), kChunk, simd::splat<T>(T(0)));
    for_state_groups<kMaxStates>(p.N, [&](auto nb, int64_t n0) {
      advance_states<T, decltype(nb)::value, 1, true, false>(ws.A2.data() + n0, ws.h.data() + n0, ws.dt.data(),
                                                             ws.dtu.data(), ws.B.data() + n0 * kChunk,
                                                             ws.C.data() + n0 * kChunk, ws.y.data(), steps,
                                                             nullptr, nullptr, nullptr, BCRows<T>{}, 0);
    });
    if (p.z) {
      load_tile(in(rows.z, st.z), tl.lanes, steps, kChunk, scalars<T>(ws.z.data()));
      for (int t = 0; t < steps; ++t)
        ws.y[t] = (ws.y[t] + Dv * ws.u[t]) * (ws.z[t] * simd::sigmoid<T>(ws.z[t]));
    } else {
      for (int t = 0; t < steps; ++t) ws.y[t] += Dv * ws.u[t];
    }
    store_tile(scalars<T>(ws.y.data()), tl.lanes, steps,
               staged ? OutRows<IO>{st.out.data() + at, st.pitch, 0}
                      : OutRows<IO>{out_rows + pos, p.L, kAhead, o.dir()});
  }
  if (staged) st.flush(out_rows, p.L, tl.lanes);
  simd::stream_fence();
  for (int c = 0; c < tl.lanes; ++c)
    for (int64_t n = 0; n < p.N; ++n) last_state[(tl.b * p.dim + tl.d0 + c) * p.N + n] = ws.h[n][c];
}

// chunk_states: nullptr, or room for (batch, chunks, N, dim) values to be filled for the backward.
template <class T, class IO>
void forward(const Problem<T, IO>& p, IO* out, T* last_state, T* chunk_states, int num_threads) {
  const int64_t tiles = p.num_tiles();
  const int threads = threads_for(num_threads, tiles, p.batch * p.dim * p.L * p.N);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Workspace<T> ws(p.N);
    ForwardStage<T, IO> st(p.order, p.N);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiles; ++i) forward_tile(p, tile_of(p, i), out, last_state, chunk_states, ws, st);
  }
}

// ------------------------------------------------------------------ backward

template <class T, class IO>
struct Grads {
  IO *du, *ddelta, *dz, *dB, *dC;  // dz == nullptr when there is no gate
  T *dA, *dD, *ddelta_bias;
};

// Per-tile contributions to the per-channel gradients, one row per batch element
// so that tiles never share a destination; summed over the batch afterwards.
template <class T>
struct ChannelPartials {
  std::unique_ptr<T[]> dA, dD, ddelta_bias;  // [batch][dim][N], [batch][dim], [batch][dim]
};

// Where a work item's dB and dC sums go: N rows of L values for its (batch, group), state n's
// row at B + n * L (C likewise), written with `mode` (kStream by the first tile group, which
// overwrites; kAdd by the later ones).
template <class T>
struct PartRows {
  T *B, *C;
  Write mode;
};

// Per-thread staged rows of the backward for one work item (V blocks): u, delta, z and dout of
// its channels, B and C of its (batch, group); for inter-slice orders (`outputs`) also du,
// ddelta, dz and its dB, dC sums, written back batch by batch. Contiguous orders are staged only
// for rows that alias in the L2 (kAliasingRowBytes), inputs only.
template <class T, class IO>
struct BackwardStage {
  int64_t batch_steps, pitch;  // batch_steps = 0: nothing staged
  bool outputs;
  std::vector<IO> u, delta, z, dout, du, ddelta, dz, B, C;  // [rows][pitch]
  std::vector<T> dB, dC;                                    // [N][pitch]
  Batch batch;

  BackwardStage(const Problem<T, IO>& p, int channels)
      : batch_steps(!p.order.contiguous() || p.L * int64_t(sizeof(IO)) % kAliasingRowBytes == 0
                        ? stage_steps<IO>(p.order)
                        : 0),
        pitch(batch_steps ? batch_steps + 64 / int64_t(sizeof(IO)) : 0),  // a line of padding per row
        outputs(!p.order.contiguous()),
        u(channels * pitch), delta(u.size()), z(u.size()), dout(u.size()),
        du(outputs ? u.size() : 0), ddelta(du.size()), dz(du.size()),
        B(p.N * pitch), C(B.size()), dB(outputs ? B.size() : 0), dC(dB.size()) {}

  // Stages the batch starting at step t0 (the one before it follows): `rows` channel rows of the
  // (batch, dim, L) inputs from `in`, the N rows of B and C.
  void stage(const Problem<T, IO>& p, const InputRows<IO>& in, int rows, int64_t t0) {
    batch.move_to(p.order, t0, batch_steps, t0 > 0 ? t0 - batch_steps : -1);
    const RowCopy<const IO, IO> copies[] = {
        {in.u, p.L, rows, u.data()},
        {in.delta, p.L, rows, delta.data()},
        {in.z, p.L, in.z ? rows : 0, z.data()},
        {in.dout, p.L, rows, dout.data()},
        {in.B, p.L, int(p.N), B.data()},
        {in.C, p.L, int(p.N), C.data()},
    };
    gather_rows<T>(copies, pitch, batch.runs, batch.next);
  }

  // Writes the staged outputs of the batch back: gradients of the rows from `row0`, dB and dC
  // sums to the work item's rows.
  void flush(const Problem<T, IO>& p, const Grads<T, IO>& gr, int64_t row0, int rows, PartRows<T> part) {
    const bool gated = bool(p.z);
    const RowCopy<IO, const IO> grads[] = {
        {gr.du + row0, p.L, rows, du.data()},
        {gr.ddelta + row0, p.L, rows, ddelta.data()},
        {gated ? gr.dz + row0 : nullptr, p.L, gated ? rows : 0, dz.data()},
    };
    scatter_rows<T>(grads, pitch, batch.runs, false);
    const RowCopy<T, const T> sums[] = {{part.B, p.L, int(p.N), dB.data()}, {part.C, p.L, int(p.N), dC.data()}};
    scatter_rows<T>(sums, pitch, batch.runs, part.mode == Write::kAdd);
  }
};

// The V consecutive blocks of one group starting at block index `first`, walked
// together from the last chunk to the first.
template <int V, class T, class IO>
void backward_tile(const Problem<T, IO>& p, BatchRows<IO> dout, const T* chunk_states, int64_t first,
                   const Grads<T, IO>& gr, ChannelPartials<T>& part, PartRows<T> rows, Workspace<T>& ws,
                   BackwardStage<T, IO>& st) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  const vec zero = simd::splat<T>(T(0));
  const int64_t N = p.N, L = p.L;
  const Order& o = p.order;
  const bool gated = bool(p.z);
  Tile tl[V];
  vec Dv[V], dD[V], ddb[V];
  for (int v = 0; v < V; ++v) {
    tl[v] = tile_of(p, first + v);
    load_A(p, tl[v], V, ws.A.data() + v, ws.A2.data() + v);
    Dv[v] = load_channels(p.D + tl[v].d0, tl[v].lanes);
    dD[v] = ddb[v] = zero;
  }
  std::fill(ws.carry.begin(), ws.carry.end(), zero);
  std::fill(ws.dA.begin(), ws.dA.end(), zero);
  // The V blocks are consecutive channels, staged as one run of rows.
  const int channels = (V - 1) * W + tl[V - 1].lanes;
  const InputRows<IO> in = input_rows(p, tl[0], dout);
  const int64_t row0 = (tl[0].b * p.dim + tl[0].d0) * L;  // of the gradients
  const bool staged = st.batch_steps > 0;
  st.batch.t0 = -1;
  for (int64_t k = p.num_chunks() - 1; k >= 0; --k) {
    const int64_t t0 = k * kChunk;
    const int steps = int(std::min<int64_t>(kChunk, L - t0));
    if (staged && t0 / st.batch_steps * st.batch_steps != st.batch.t0) {
      if (st.outputs && st.batch.t0 >= 0) st.flush(p, gr, row0, channels, rows);
      st.stage(p, in, channels, t0 / st.batch_steps * st.batch_steps);
    }
    const int64_t at = t0 - st.batch.t0, pos = o.position(t0);
    // This chunk of an input's rows from `row` on: in its staged copy, or in place (mem).
    const auto rows_at = [&](const std::vector<IO>& copy, const IO* mem, int64_t row) {
      return staged ? Rows<IO>{copy.data() + row * st.pitch + at, st.pitch, 0}
                    : Rows<IO>{mem + row * L + pos, L, -kAhead, o.dir()};
    };
    // ... and of an output's rows.
    const auto out_at = [&](std::vector<IO>& copy, IO* mem, int64_t row) {
      return st.outputs ? OutRows<IO>{copy.data() + row * st.pitch + at, st.pitch, 0}
                        : OutRows<IO>{mem + row * L + pos, L, -kAhead, o.dir()};
    };
    load_bc_rows(rows_at(st.B, in.B, 0), N, steps, ws.B.data());
    load_bc_rows(rows_at(st.C, in.C, 0), N, steps, ws.C.data());
    for (int v = 0; v < V; ++v) {
      const int64_t row = v * W;
      const int at_v = v * kChunk;
      load_dt(p, tl[v], rows_at(st.u, in.u, row), rows_at(st.delta, in.delta, row), steps, true, ws, at_v);
      load_tile(rows_at(st.dout, in.dout, row), tl[v].lanes, steps, kChunk, scalars<T>(ws.dout.data() + at_v));
      if (gated) {
        load_tile(rows_at(st.z, in.z, row), tl[v].lanes, steps, kChunk, scalars<T>(ws.z.data() + at_v));
        for (int t = at_v; t < at_v + kChunk; ++t) {
          ws.zsig[t] = simd::sigmoid<T>(ws.z[t]);
          ws.dy[t] = ws.dout[t] * ws.z[t] * ws.zsig[t];
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        ws.h[n * V + v] = load_channels(chunk_states + chunk_state_offset(p, tl[v], k, n), tl[v].lanes);
        if (k >= 2) prefetch_read(chunk_states + chunk_state_offset(p, tl[v], k - 2, n));
      }
    }
    const vec* dy = (gated ? ws.dy : ws.dout).data();  // dL/dy: the gate's factor applied, if any
    std::fill(ws.y.begin(), ws.y.end(), zero);
    std::fill(ws.gb.begin(), ws.gb.end(), zero);
    std::fill(ws.ddtA.begin(), ws.ddtA.end(), zero);
    for_state_groups<kMaxStatesBwd>(N, [&](auto nb, int64_t n0) {
      constexpr int NB = decltype(nb)::value;
      const T* Bn = ws.B.data() + n0 * kChunk;
      const T* Cn = ws.C.data() + n0 * kChunk;
      const BCRows<T> r = st.outputs ? BCRows<T>{st.dB.data() + n0 * st.pitch + at, st.dC.data() + n0 * st.pitch + at,
                                                 st.pitch, 1, Write::kStore}
                                     : BCRows<T>{rows.B + n0 * L + pos, rows.C + n0 * L + pos, L, o.dir(), rows.mode};
    // Padded steps of the last chunk have u = dy = 0, so they add nothing below.
      // y (the scan's output before the gate) is recomputed only for dz.
      const auto recompute = [&](auto with_y) {
        advance_states<T, NB, V, decltype(with_y)::value, true>(
            ws.A2.data() + n0 * V, ws.h.data() + n0 * V, ws.dt.data(), ws.dtu.data(), Bn, Cn, ws.y.data(), kChunk,
            dy, ws.rec.data(), ws.redC.data(), r, steps);
      };
      gated ? recompute(std::true_type{}) : recompute(std::false_type{});
      reverse_states<T, NB, V>(ws.A.data() + n0 * V, ws.carry.data() + n0 * V, ws.dA.data() + n0 * V,
                               ws.rec.data(), ws.dt.data(), ws.dtu.data(), dy, Bn, Cn, ws.gb.data(),
                               ws.ddtA.data(), ws.redB.data(), r, steps);
    });
    // Per-step gradients; reuse buffers: gb -> du, ddtA -> ddelta, y -> dz.
    for (int v = 0; v < V; ++v) {
      const int at_v = v * kChunk;
      for (int t = at_v; t < at_v + kChunk; ++t) {
        const vec u = ws.u[t];
        const vec ddt = ws.gb[t] * u + ws.ddtA[t];
        const vec ddelta = p.softplus ? ddt * ws.dsoftplus[t] : ddt;
        dD[v] += dy[t] * u;
        ddb[v] += ddelta;
        ws.gb[t] = dy[t] * Dv[v] + ws.gb[t] * ws.dt[t];
        ws.ddtA[t] = ddelta;
        if (gated) {
          const vec s = ws.zsig[t];
          ws.y[t] = ws.dout[t] * (ws.y[t] + Dv[v] * u) * s * (T(1) + ws.z[t] * (T(1) - s));
        }
      }
      const int64_t row = v * W;
      store_tile(scalars<T>(ws.gb.data() + at_v), tl[v].lanes, steps, out_at(st.du, gr.du + row0, row));
      store_tile(scalars<T>(ws.ddtA.data() + at_v), tl[v].lanes, steps, out_at(st.ddelta, gr.ddelta + row0, row));
      if (gated) store_tile(scalars<T>(ws.y.data() + at_v), tl[v].lanes, steps, out_at(st.dz, gr.dz + row0, row));
    }
  }
  if (st.outputs) st.flush(p, gr, row0, channels, rows);
  simd::stream_fence();  // dB, dC rows (add_lane_sums)
  for (int v = 0; v < V; ++v) {
    const int64_t ch0 = tl[v].b * p.dim + tl[v].d0;
    store_channels(dD[v], tl[v].lanes, part.dD.get() + ch0);
    store_channels(ddb[v], tl[v].lanes, part.ddelta_bias.get() + ch0);
    for (int c = 0; c < tl[v].lanes; ++c)
      for (int64_t n = 0; n < N; ++n) part.dA[(ch0 + c) * N + n] = ws.dA[n * V + v][c];
  }
}

// Blocks [b0, b1) of one group, V at a time, the rest in fewer.
template <int V, class T, class IO>
void backward_blocks(const Problem<T, IO>& p, BatchRows<IO> dout, const T* chunk_states, int64_t b0, int64_t b1,
                     const Grads<T, IO>& gr, ChannelPartials<T>& part, PartRows<T> rows, Workspace<T>& ws,
                     BackwardStage<T, IO>& st) {
  int64_t i = b0;
  for (; i + V <= b1; i += V, rows.mode = Write::kAdd)
    backward_tile<V>(p, dout, chunk_states, i, gr, part, rows, ws, st);
  if constexpr (V > 1) backward_blocks<V - 1>(p, dout, chunk_states, i, b1, gr, part, rows, ws, st);
}

// dB and dC are sums over all channels of a (batch, group) pair. Each pair's blocks are split
// into parts_per_pair contiguous ranges ("parts", one work item each), a number set by the
// problem's shape, never by the thread count. A part writes its sums to rows of its own (the
// first part into dB / dC themselves when no conversion is needed), adding its tile groups in
// block order; the parts of a pair are then added in part order. Every sum is thus formed in one
// order whatever the threads: the CPU backward is deterministic (docs/design.md §3), and so are
// the per-channel gradients (per-tile partials, summed over the batch in order).
constexpr int64_t kPartChannels = 48;  // the fewest channels worth a part (and its rows)
constexpr int64_t kParallelParts = 8;  // parts over all pairs worth having for parallelism

template <class T, class IO>
int64_t parts_per_pair(const Problem<T, IO>& p) {
  const int64_t for_threads = std::max<int64_t>(1, kParallelParts / (p.batch * p.groups));
  const int64_t for_size = std::max<int64_t>(1, p.per_group() / kPartChannels);
  return std::min({for_threads, for_size, p.blocks_per_group()});
}

template <class T, class IO>
void backward(const Problem<T, IO>& p, BatchRows<IO> dout, const T* chunk_states, const Grads<T, IO>& gr,
              int num_threads) {
  const int64_t N = p.N, L = p.L, BG = p.batch * p.groups, nblk = p.blocks_per_group();
  const int64_t parts = parts_per_pair(p), items = BG * parts;
  const int64_t work = 2 * p.batch * p.dim * L * N;  // recompute, reverse
  const int threads = threads_for(num_threads, items, work);
  constexpr bool direct = std::is_same_v<T, IO>;
  const int64_t own = direct ? parts - 1 : parts;  // parts per pair needing rows of their own
  const LineArray<T> ownB = line_array<T>(BG * own * N * L), ownC = line_array<T>(BG * own * N * L);
  const auto rows_of = [&](int64_t bg, int64_t q) {
    if constexpr (direct)
      if (q == 0) return PartRows<T>{gr.dB + bg * N * L, gr.dC + bg * N * L, Write::kStream};
    const int64_t slot = bg * own + q - (direct ? 1 : 0);
    return PartRows<T>{ownB.get() + slot * N * L, ownC.get() + slot * N * L, Write::kStream};
  };
  ChannelPartials<T> part{std::unique_ptr<T[]>(new T[p.batch * p.dim * N]),
                          std::unique_ptr<T[]>(new T[p.batch * p.dim]),
                          std::unique_ptr<T[]>(new T[p.batch * p.dim])};

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Workspace<T> ws(N);
    BackwardStage<T, IO> st(p, kBwdVectors * simd::V<T>::W);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t bg = item / parts, q = item % parts;
      backward_blocks<kBwdVectors>(p, dout, chunk_states, bg * nblk + q * nblk / parts,
                                   bg * nblk + (q + 1) * nblk / parts, gr, part, rows_of(bg, q), ws, st);
    }
    if (!direct || parts > 1) {
      std::vector<T> sum(direct ? 0 : L);
#pragma omp for schedule(static)
      for (int64_t row = 0; row < 2 * BG * N; ++row) {  // dB rows, then dC rows
        const bool is_B = row < BG * N;
        const int64_t r = is_B ? row : row - BG * N, bg = r / N, n = r % N;
        IO* const out = (is_B ? gr.dB : gr.dC) + r * L;
        T* acc = sum.data();
        if constexpr (direct) acc = out;  // part 0's sums are already there
        for (int64_t q = direct ? 1 : 0; q < parts; ++q) {
          const PartRows<T> own_rows = rows_of(bg, q);
          const T* src = (is_B ? own_rows.B : own_rows.C) + n * L;
          if (q == 0)
            std::copy(src, src + L, acc);
          else
            for (int64_t t = 0; t < L; ++t) acc[t] += src[t];
        }
        if constexpr (!direct)
          for (int64_t t = 0; t < L; ++t) out[t] = to_storage<IO>(acc[t]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t d = 0; d < p.dim; ++d) {
      T dD = 0, ddb = 0;
      for (int64_t b = 0; b < p.batch; ++b) {
        dD += part.dD[b * p.dim + d];
        ddb += part.ddelta_bias[b * p.dim + d];
      }
      gr.dD[d] = dD;
      gr.ddelta_bias[d] = ddb;
      for (int64_t n = 0; n < N; ++n) {
        T s = 0;
        for (int64_t b = 0; b < p.batch; ++b) s += part.dA[(b * p.dim + d) * N + n];
        gr.dA[d * N + n] = s;
      }
    }
  }
}

}  // namespace scan
}  // namespace segmamba
