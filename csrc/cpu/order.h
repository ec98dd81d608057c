// Scan orders (docs/design.md §3). Scan step t of a row touches memory position
//   m(t) = T(R(t)),  R(t) = L - 1 - t when reversed (else t),
//   T(s) = (s % S) * P + s / S  for S slices of P = L / S tokens (inter-slice; else S = 1).
// Viewed as an (S, P) grid of slices x columns, the scan walks a column through every slice
// before moving to the next column. The kernels read and write through this map: no permuted
// copy of a tensor is made.
#pragma once

#include <cstdint>
#include <vector>

namespace segmamba {

// floor(a / b) and the matching remainder in [0, b), for b > 0.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t floor_mod(int64_t a, int64_t b) { return a - floor_div(a, b) * b; }

struct Order {
  int64_t L = 1, S = 1, P = 1;
  bool reverse = false;

  Order() = default;
  Order(int64_t L_, int64_t slices, bool reverse_) : L(L_), S(slices), P(L_ / slices), reverse(reverse_) {
    if (S == 1 || P == 1) {  // one slice, or slices of one token: both are the identity T
      S = 1;
      P = L;
    }
  }

  // Consecutive steps at consecutive positions, ascending (dir() = 1) or descending (-1).
  bool contiguous() const { return S == 1; }
  int dir() const { return reverse ? -1 : 1; }
  int64_t position(int64_t t) const {
    const int64_t s = reverse ? L - 1 - t : t;
    return s % S * P + s / S;
  }
};

// `count` consecutive memory positions from `pos` hold the steps t0 + index + k * step, k < count.
struct Run {
  int64_t pos, index, step, count;
};

// The steps [t0, t0 + n) of a row as runs of consecutive memory positions: one run per slice
// (one in all for a contiguous order), each along a column range of its slice.
inline void runs_of(const Order& o, int64_t t0, int64_t n, std::vector<Run>& runs) {
  runs.clear();
  // The unreversed steps s in [s0, s0 + n), s = column * S + slice.
  const int64_t s0 = o.reverse ? o.L - t0 - n : t0;
  for (int64_t s_first = s0; s_first < s0 + n && s_first < s0 + o.S; ++s_first) {  // one per slice
    const int64_t count = (s0 + n - 1 - s_first) / o.S + 1;
    const int64_t t_first = o.reverse ? o.L - 1 - s_first : s_first;
    runs.push_back({s_first % o.S * o.P + s_first / o.S, t_first - t0, o.reverse ? -o.S : o.S, count});
  }
}

}  // namespace segmamba
