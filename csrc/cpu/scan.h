// Selective scan (design.md §3) forward and backward on the CPU.
//
// Layout of the work: one work item ("tile") is W consecutive channels of one
// (batch, group), so a SIMD vector holds W channels and B/C are scalars shared
// by all lanes. Time is walked in chunks of kChunk steps; the chunk's inputs are
// converted once into transposed tiles. States are independent across n, so the
// N states are processed in groups of up to kMaxStates kept in registers, each
// group walking the whole chunk.
//
// Nothing of size (batch, dim, L, N) is ever stored: when a backward will
// follow, the forward saves the state at each chunk boundary ("chunk states",
// (batch, chunks, N, dim): N / kChunk floats per element of u). The backward
// visits chunks in reverse; each chunk's states are recomputed from its
// boundary into a small buffer and the reverse recurrence for dL/dh runs over it.
// Saving the boundaries costs the forward a few stores per chunk and spares the
// backward a whole forward recurrence.
#pragma once

#include <omp.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "block_io.h"

namespace segmamba {
namespace scan {

constexpr int kChunk = 64;  // a multiple of every W
// How far ahead the per-channel rows are prefetched (elements; backwards in the backward pass).
constexpr int64_t kAheadFwd = 2 * kChunk, kAheadBwd = -2 * kChunk;
// States per register-resident group: AVX-512 has 32 vector registers, the others 16.
constexpr int kMaxStates = SEGMAMBA_VEC_BYTES == 64 ? 8 : 4;

template <class T, class IO>
struct Problem {
  const IO *u, *delta, *B, *C, *z;  // z == nullptr: no gate
  const T *A, *D, *delta_bias;
  int64_t batch, dim, L, N, groups;
  bool softplus;

  static constexpr int W = simd::V<T>::W;
  int64_t per_group() const { return dim / groups; }
  int64_t blocks_per_group() const { return (per_group() + W - 1) / W; }
  int64_t num_tiles() const { return batch * groups * blocks_per_group(); }
  int64_t num_chunks() const { return (L + kChunk - 1) / kChunk; }
};

struct Tile {
  int64_t b, g, d0;
  int lanes;
};

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

// Per-thread scratch, reused across tiles.
template <class T>
struct Workspace {
  using vec = simd::vec_t<T>;
  static constexpr int W = simd::V<T>::W;
  std::vector<vec> u, delta, dt, dtu, dsoftplus, z, zsig, dout, dy, y, gb, ddtA;  // [kChunk]
  std::vector<T> B, C;                                                            // [N][kChunk]
  std::vector<vec> A, A2, h, carry, dA;                                           // [N]
  std::vector<vec> decrec, arec;                                                  // [kMaxStates][kChunk]
  std::vector<vec> redB, redC;                                                    // [kMaxStates][W]

  explicit Workspace(int64_t N)
      : u(kChunk), delta(kChunk), dt(kChunk), dtu(kChunk), dsoftplus(kChunk), z(kChunk), zsig(kChunk),
        dout(kChunk), dy(kChunk), y(kChunk), gb(kChunk), ddtA(kChunk), B(N * kChunk), C(N * kChunk),
        A(N), A2(N), h(N), carry(N), dA(N), decrec(kMaxStates * kChunk), arec(kMaxStates * kChunk),
        redB(kMaxStates * W), redC(kMaxStates * W) {}
};

template <class T>
SM_INLINE T* scalars(std::vector<simd::vec_t<T>>& v) { return reinterpret_cast<T*>(v.data()); }

// Where the tile's state n before chunk k lives in the (batch, chunks, N, dim) chunk states.
template <class T, class IO>
SM_INLINE int64_t chunk_state_offset(const Problem<T, IO>& p, const Tile& tl, int64_t k, int64_t n) {
  return ((tl.b * p.num_chunks() + k) * p.N + n) * p.dim + tl.d0;
}

// Calls f(std::integral_constant<int, NB>, n0) for consecutive groups of states covering [0, N).
template <class F>
SM_INLINE void for_state_groups(int64_t N, F&& f) {
  int64_t n = 0;
  if constexpr (kMaxStates >= 8)
    for (; n + 8 <= N; n += 8) f(std::integral_constant<int, 8>{}, n);
  for (; n + 4 <= N; n += 4) f(std::integral_constant<int, 4>{}, n);
  if (n + 2 <= N) {
    f(std::integral_constant<int, 2>{}, n);
    n += 2;
  }
  if (n < N) f(std::integral_constant<int, 1>{}, n);
}

// Per-channel A (and A * log2(e), the argument scale of exp2) as vectors.
template <class T, class IO>
void load_A(const Problem<T, IO>& p, const Tile& tl, Workspace<T>& ws) {
  for (int64_t n = 0; n < p.N; ++n) {
    simd::vec_t<T> a = simd::splat<T>(T(0));
    for (int c = 0; c < tl.lanes; ++c) a[c] = p.A[(tl.d0 + c) * p.N + n];
    ws.A[n] = a;
    ws.A2[n] = a * simd::kLog2e<T>;
  }
}

// Loads u and delta of one chunk and derives dt (bias, softplus), dt * u and,
// when asked, d softplus / d(delta + bias).
template <class T, class IO>
void load_dt(const Problem<T, IO>& p, const Tile& tl, int64_t t0, int steps, bool with_dsoftplus, int64_t ahead,
             Workspace<T>& ws) {
  using vec = simd::vec_t<T>;
  const int64_t row0 = (tl.b * p.dim + tl.d0) * p.L + t0;
  load_tile(p.u + row0, p.L, tl.lanes, steps, kChunk, scalars<T>(ws.u), ahead);
  load_tile(p.delta + row0, p.L, tl.lanes, steps, kChunk, scalars<T>(ws.delta), ahead);
  const vec bias = load_channels(p.delta_bias + tl.d0, tl.lanes);
  for (int t = 0; t < kChunk; ++t) {
    const vec s = ws.delta[t] + bias;
    const vec dt = p.softplus ? simd::softplus<T>(s) : s;
    ws.dt[t] = dt;
    ws.dtu[t] = dt * ws.u[t];
    // torch's softplus is the identity above 20, so its derivative is exactly 1 there.
    if (with_dsoftplus) ws.dsoftplus[t] = s > T(20) ? simd::splat<T>(T(1)) : simd::sigmoid<T>(s);
  }
}

template <class T, class IO>
void load_bc_rows(const IO* src, const Problem<T, IO>& p, const Tile& tl, int64_t t0, int steps, T* dst) {
  const IO* base = src + (tl.b * p.groups + tl.g) * p.N * p.L + t0;
  for (int64_t n = 0; n < p.N; ++n) load_row(base + n * p.L, steps, kChunk, dst + n * kChunk);
}

// Advances NB states over `steps` steps of a chunk:
//   h_t = a_t h_{t-1} + dt u B with a_t = exp(dt * A);  y += C . h_t  (kY);
//   a_t h_{t-1} and a_t recorded (kRecord) for the reverse pass.
template <class T, int NB, bool kY, bool kRecord>
SM_INLINE void advance_states(const simd::vec_t<T>* A2, simd::vec_t<T>* h, const simd::vec_t<T>* dt,
                              const simd::vec_t<T>* dtu, const T* Bn, const T* Cn, simd::vec_t<T>* y,
                              int steps, simd::vec_t<T>* decrec, simd::vec_t<T>* arec) {
  using vec = simd::vec_t<T>;
  vec a2[NB], hh[NB];
  for (int k = 0; k < NB; ++k) {
    a2[k] = A2[k];
    hh[k] = h[k];
  }
  for (int t = 0; t < steps; ++t) {
    const vec d = dt[t], du = dtu[t];
    vec acc = simd::splat<T>(T(0));
#pragma GCC unroll 8
    for (int k = 0; k < NB; ++k) {
      const vec e = simd::exp2<T>(d * a2[k]);
      if constexpr (kRecord) {
        const vec decayed = e * hh[k];
        hh[k] = decayed + du * Bn[k * kChunk + t];
        decrec[k * kChunk + t] = decayed;
        arec[k * kChunk + t] = e;
      } else {
        hh[k] = e * hh[k] + du * Bn[k * kChunk + t];
      }
      if constexpr (kY) acc += hh[k] * Cn[k * kChunk + t];
    }
    if constexpr (kY) y[t] += acc;
  }
  for (int k = 0; k < NB; ++k) h[k] = hh[k];
}

// Reverse recurrence over one whole chunk for NB states, from recorded a_t h_{t-1}, a_t:
//   g_t = dy_t C_t + a_{t+1} g_{t+1}           (carry = a_{t+1} g_{t+1})
//   dB_t += g_t dt_t u_t,  dC_t += dy_t h_t    (summed over the tile's channels)
//   gb_t += g_t B_t                            (-> du = gb dt, ddt = gb u)
//   x = g_t a_t h_{t-1}:  ddt += x A,  dA += x dt
// a_t h_{t-1} is recorded rather than recovered as h_t - dt u B, which cancels
// badly when a_t is tiny and |A| large.
template <class T, int NB>
SM_INLINE void reverse_states(const simd::vec_t<T>* A, simd::vec_t<T>* carry, simd::vec_t<T>* dA,
                              const simd::vec_t<T>* decrec, const simd::vec_t<T>* arec, const simd::vec_t<T>* dt,
                              const simd::vec_t<T>* dtu, const simd::vec_t<T>* dy, const T* Bn, const T* Cn,
                              simd::vec_t<T>* gb, simd::vec_t<T>* ddtA, simd::vec_t<T>* redB,
                              simd::vec_t<T>* redC, T* accB, T* accC, int64_t ld_acc) {
  using vec = simd::vec_t<T>;
  constexpr int W = simd::V<T>::W;
  vec c[NB], av[NB], da[NB];
  for (int k = 0; k < NB; ++k) {
    c[k] = carry[k];
    av[k] = A[k];
    da[k] = dA[k];
  }
  for (int t = kChunk - 1; t >= 0; --t) {
    const vec dyt = dy[t], dut = dtu[t], dtt = dt[t];
    vec gbt = simd::splat<T>(T(0)), ddt = simd::splat<T>(T(0));
#pragma GCC unroll 8
    for (int k = 0; k < NB; ++k) {
      const T b = Bn[k * kChunk + t];
      const vec decayed = decrec[k * kChunk + t];
      const vec g = dyt * Cn[k * kChunk + t] + c[k];
      c[k] = arec[k * kChunk + t] * g;
      redB[k * W + t % W] = g * dut;
      redC[k * W + t % W] = dyt * (decayed + dut * b);
      gbt += g * b;
      const vec x = g * decayed;
      ddt += x * av[k];
      da[k] += x * dtt;
    }
    gb[t] += gbt;
    ddtA[t] += ddt;
    if (t % W == 0) {
      for (int k = 0; k < NB; ++k) {
        T* rb = accB + k * ld_acc + t;
        T* rc = accC + k * ld_acc + t;
        simd::storeu<T>(rb, simd::loadu<T>(rb) + simd::reduce_lanes_batch<T>(redB + k * W));
        simd::storeu<T>(rc, simd::loadu<T>(rc) + simd::reduce_lanes_batch<T>(redC + k * W));
      }
    }
  }
  for (int k = 0; k < NB; ++k) {
    carry[k] = c[k];
    dA[k] = da[k];
  }
}

// ------------------------------------------------------------------ forward

template <class T, class IO>
void forward_tile(const Problem<T, IO>& p, const Tile& tl, IO* out, T* last_state, T* chunk_states,
                  Workspace<T>& ws) {
  using vec = simd::vec_t<T>;
  load_A(p, tl, ws);
  std::fill(ws.h.begin(), ws.h.end(), simd::splat<T>(T(0)));
  const vec Dv = load_channels(p.D + tl.d0, tl.lanes);
  const int64_t row0 = (tl.b * p.dim + tl.d0) * p.L;
  for (int64_t t0 = 0; t0 < p.L; t0 += kChunk) {
    const int steps = int(std::min<int64_t>(kChunk, p.L - t0));
    if (chunk_states)
      for (int64_t n = 0; n < p.N; ++n)
        store_channels(ws.h[n], tl.lanes, chunk_states + chunk_state_offset(p, tl, t0 / kChunk, n));
    load_dt(p, tl, t0, steps, false, kAheadFwd, ws);
    load_bc_rows(p.B, p, tl, t0, steps, ws.B.data());
    load_bc_rows(p.C, p, tl, t0, steps, ws.C.data());
    std::fill(ws.y.begin(), ws.y.end(), simd::splat<T>(T(0)));
    for_state_groups(p.N, [&](auto nb, int64_t n0) {
      advance_states<T, decltype(nb)::value, true, false>(ws.A2.data() + n0, ws.h.data() + n0, ws.dt.data(),
                                                          ws.dtu.data(), ws.B.data() + n0 * kChunk,
                                                          ws.C.data() + n0 * kChunk, ws.y.data(), steps,
                                                          nullptr, nullptr);
    });
    if (p.z) {
      load_tile(p.z + row0 + t0, p.L, tl.lanes, steps, kChunk, scalars<T>(ws.z), kAheadFwd);
      for (int t = 0; t < steps; ++t)
        ws.y[t] = (ws.y[t] + Dv * ws.u[t]) * (ws.z[t] * simd::sigmoid<T>(ws.z[t]));
    } else {
      for (int t = 0; t < steps; ++t) ws.y[t] += Dv * ws.u[t];
    }
    store_tile(scalars<T>(ws.y), tl.lanes, steps, p.L, out + row0 + t0);
  }
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
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiles; ++i) forward_tile(p, tile_of(p, i), out, last_state, chunk_states, ws);
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

template <class T, class IO>
void backward_tile(const Problem<T, IO>& p, const IO* dout, const T* chunk_states, const Tile& tl,
                   const Grads<T, IO>& gr, ChannelPartials<T>& part, T* accB, T* accC, int64_t ld_acc,
                   Workspace<T>& ws) {
  using vec = simd::vec_t<T>;
  const vec zero = simd::splat<T>(T(0));
  const int64_t N = p.N, chunks = p.num_chunks();
  const int64_t row0 = (tl.b * p.dim + tl.d0) * p.L;
  load_A(p, tl, ws);
  const vec Dv = load_channels(p.D + tl.d0, tl.lanes);
  const bool gated = p.z != nullptr;
  std::fill(ws.carry.begin(), ws.carry.end(), zero);
  std::fill(ws.dA.begin(), ws.dA.end(), zero);
  vec dD = zero, ddb = zero;
  for (int64_t k = chunks - 1; k >= 0; --k) {
    const int64_t t0 = k * kChunk;
    const int steps = int(std::min<int64_t>(kChunk, p.L - t0));
    load_dt(p, tl, t0, steps, true, kAheadBwd, ws);
    load_bc_rows(p.B, p, tl, t0, steps, ws.B.data());
    load_bc_rows(p.C, p, tl, t0, steps, ws.C.data());
    load_tile(dout + row0 + t0, p.L, tl.lanes, steps, kChunk, scalars<T>(ws.dout), kAheadBwd);
    if (gated) {
      load_tile(p.z + row0 + t0, p.L, tl.lanes, steps, kChunk, scalars<T>(ws.z), kAheadBwd);
      for (int t = 0; t < kChunk; ++t) {
        ws.zsig[t] = simd::sigmoid<T>(ws.z[t]);
        ws.dy[t] = ws.dout[t] * ws.z[t] * ws.zsig[t];
      }
    } else {
      std::copy(ws.dout.begin(), ws.dout.end(), ws.dy.begin());
    }
    std::fill(ws.y.begin(), ws.y.end(), zero);
    std::fill(ws.gb.begin(), ws.gb.end(), zero);
    std::fill(ws.ddtA.begin(), ws.ddtA.end(), zero);
    for (int64_t n = 0; n < N; ++n)
      ws.h[n] = load_channels(chunk_states + chunk_state_offset(p, tl, k, n), tl.lanes);
    for_state_groups(N, [&](auto nb, int64_t n0) {
      constexpr int NB = decltype(nb)::value;
      const T* Bn = ws.B.data() + n0 * kChunk;
      const T* Cn = ws.C.data() + n0 * kChunk;
      // Padded steps of the last chunk have u = dy = 0, so they add nothing below.
      if (gated)
        advance_states<T, NB, true, true>(ws.A2.data() + n0, ws.h.data() + n0, ws.dt.data(), ws.dtu.data(), Bn, Cn,
                                          ws.y.data(), kChunk, ws.decrec.data(), ws.arec.data());
      else
        advance_states<T, NB, false, true>(ws.A2.data() + n0, ws.h.data() + n0, ws.dt.data(), ws.dtu.data(), Bn,
                                           Cn, nullptr, kChunk, ws.decrec.data(), ws.arec.data());
      reverse_states<T, NB>(ws.A.data() + n0, ws.carry.data() + n0, ws.dA.data() + n0, ws.decrec.data(),
                            ws.arec.data(), ws.dt.data(), ws.dtu.data(), ws.dy.data(), Bn, Cn, ws.gb.data(),
                            ws.ddtA.data(), ws.redB.data(), ws.redC.data(), accB + n0 * ld_acc + t0,
                            accC + n0 * ld_acc + t0, ld_acc);
    });
    // Per-step gradients; reuse buffers: gb -> du, ddtA -> ddelta, y -> dz.
    for (int t = 0; t < kChunk; ++t) {
      const vec u = ws.u[t];
      const vec ddt = ws.gb[t] * u + ws.ddtA[t];
      const vec ddelta = p.softplus ? ddt * ws.dsoftplus[t] : ddt;
      dD += ws.dy[t] * u;
      ddb += ddelta;
      ws.gb[t] = ws.dy[t] * Dv + ws.gb[t] * ws.dt[t];
      ws.ddtA[t] = ddelta;
      if (gated) {
        const vec s = ws.zsig[t];
        ws.y[t] = ws.dout[t] * (ws.y[t] + Dv * u) * s * (T(1) + ws.z[t] * (T(1) - s));
      }
    }
    store_tile(scalars<T>(ws.gb), tl.lanes, steps, p.L, gr.du + row0 + t0);
    store_tile(scalars<T>(ws.ddtA), tl.lanes, steps, p.L, gr.ddelta + row0 + t0);
    if (gated) store_tile(scalars<T>(ws.y), tl.lanes, steps, p.L, gr.dz + row0 + t0);
  }
  const int64_t ch0 = tl.b * p.dim + tl.d0;
  store_channels(dD, tl.lanes, part.dD.get() + ch0);
  store_channels(ddb, tl.lanes, part.ddelta_bias.get() + ch0);
  for (int c = 0; c < tl.lanes; ++c)
    for (int64_t n = 0; n < N; ++n) part.dA[(ch0 + c) * N + n] = ws.dA[n][c];
}

// dB and dC are shared by all channels of a group. When there are at least as
// many (batch, group) pairs as threads, each pair is one thread's job and its
// tiles accumulate in place; otherwise every thread accumulates into its own
// copy ("slot") and the slots are summed in a fixed order (deterministic).
template <class T, class IO>
void backward(const Problem<T, IO>& p, const IO* dout, const T* chunk_states, const Grads<T, IO>& gr,
              int num_threads) {
  const int64_t N = p.N, L = p.L, BG = p.batch * p.groups, nblk = p.blocks_per_group();
  const int64_t ld_acc = p.num_chunks() * kChunk;
  const int64_t per_slot = BG * N * ld_acc;
  const int64_t work = 2 * p.batch * p.dim * L * N;  // recompute, reverse
  const bool by_pair = BG >= threads_for(num_threads, p.num_tiles(), work);
  const int threads = threads_for(num_threads, by_pair ? BG : p.num_tiles(), work);
  const int slots = by_pair ? 1 : threads;
  // Zeroed, and vector-aligned for the reductions' vector updates (ld_acc is a multiple of W).
  std::vector<simd::vec_t<T>> accB_storage(slots * per_slot / simd::V<T>::W);
  std::vector<simd::vec_t<T>> accC_storage(accB_storage.size());
  T* const accB = scalars<T>(accB_storage);
  T* const accC = scalars<T>(accC_storage);
  ChannelPartials<T> part{std::unique_ptr<T[]>(new T[p.batch * p.dim * N]),
                          std::unique_ptr<T[]>(new T[p.batch * p.dim]),
                          std::unique_ptr<T[]>(new T[p.batch * p.dim])};

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Workspace<T> ws(N);
    if (by_pair) {
#pragma omp for schedule(static)
      for (int64_t bg = 0; bg < BG; ++bg) {
        T* aB = accB + bg * N * ld_acc;
        T* aC = accC + bg * N * ld_acc;
        for (int64_t blk = 0; blk < nblk; ++blk)
          backward_tile(p, dout, chunk_states, tile_of(p, bg * nblk + blk), gr, part, aB, aC, ld_acc, ws);
      }
    } else {
      const int64_t slot = omp_get_thread_num();
      T* sB = accB + slot * per_slot;
      T* sC = accC + slot * per_slot;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < p.num_tiles(); ++i) {
        const Tile tl = tile_of(p, i);
        const int64_t off = (tl.b * p.groups + tl.g) * N * ld_acc;
        backward_tile(p, dout, chunk_states, tl, gr, part, sB + off, sC + off, ld_acc, ws);
      }
    }

    // Sum the slots into dB / dC rows.
#pragma omp for schedule(static)
    for (int64_t row = 0; row < BG * N; ++row) {
      for (int64_t t = 0; t < L; ++t) {
        T sb = 0, sc = 0;
        for (int s = 0; s < slots; ++s) {
          sb += accB[s * per_slot + row * ld_acc + t];
          sc += accC[s * per_slot + row * ld_acc + t];
        }
        gr.dB[row * L + t] = to_storage<IO>(sb);
        gr.dC[row * L + t] = to_storage<IO>(sc);
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
