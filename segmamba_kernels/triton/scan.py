"""Selective scan, forward and backward, in Triton.

Work split
    One program per (batch, block of BLOCK_D channels); it walks L in chunks of
    BLOCK_L and loops over the N states inside a chunk. A chunk of one state is a
    [BLOCK_D, BLOCK_L] register tile scanned with ``tl.associative_scan`` over
    (decay, value) pairs; the state carried from the previous chunk is folded into
    the chunk's first value, so the scan output is the true h_t. The channel block
    always lies inside one B/C group (BLOCK_D divides dim / groups, configs that
    do not are pruned), so B and C rows are loaded once per block, not per channel.

Why an associative scan and not a sequential loop over t
    At SegMamba shapes (batch 2, dim 96, N 16, L 64^3) there are only
    batch * dim * N = 3072 independent recurrences. A per-t loop gives each of
    them one thread (under one warp per SM on an H100/H200), and every step waits
    on the exp -> FMA latency chain: latency bound by orders of magnitude.
    A register loop over t would also need column t of a tile each step, which
    Triton can only extract with an O(BLOCK_L) masked reduction. Triton lowers
    ``associative_scan`` the way the CUDA selective scan is written: a sequential
    scan over the elements a thread holds, then warp shuffles, then one shared
    memory step across warps; so the parallelism comes from L, as it must.

Why N is a loop and not a tensor dimension
    A [BLOCK_D, N, BLOCK_L] tile keeps N times more live registers: at N = 16 and
    the large chunks that amortise the per-chunk cross-warp step (BLOCK_L
    512..2048, 4..8 warps) that is 64..256 values per thread per tile, against a
    255-register limit. Looping over N keeps a handful of [BLOCK_D, BLOCK_L] tiles live (as
    the CUDA kernel does), accumulating y across states.

Backward
    One program per (batch, channel block), two phases:
    1. forward over the chunks, storing only the state at each chunk start
       (batch, dim, n_chunks, N) -- linear in L, never (batch, dim, L, N) -- and
       the pre-gate output y, from which dz follows at once;
    2. the chunks in reverse: recompute h_t inside the chunk from its stored start
       state, then the adjoint g_t = dL/dh_t by a reverse scan. g_t obeys
       g_t = C_t dy_t + a_{t+1} g_{t+1}, whose decay is the *next* step's, and a
       register tile cannot be shifted by one; so the reverse scan runs on triples
       (own decay F, decay product excluding the first step P, value V) that
       compose exactly that recurrence (see ``_adjoint_combine``). dA and ddelta
       need h_{t-1}, again a shift: the recompute scan carries, next to each
       prefix map, the map up to the step before (``_affine_prev_combine``).
       (h_t - v_t would avoid that but cancels: relative error ~eps * |A dt| in
       ddelta, ~1e-2 in float32 at A dt = -1e5.)
    Phase 1 repeats the forward because the op contract hands the backward only
    the inputs; it reads u, delta, B (and z, dout for dz) once more.
    dB and dC sum over the channels of a group: each program reduces over its
    BLOCK_D channels, then adds its [BLOCK_L] row per state into a buffer shared
    by the group's programs. By default with relaxed fp32 atomics (the order of
    the additions, hence the last bits of dB/dC, can vary run to run); with
    ``deterministic=True`` as exact two-word fixed-point integer atomics
    (``_exact``: integer addition is associative, so every schedule gives the same
    bits; no carry between the two words, so no atomic waits for its old value).
    dA, dD and ddelta_bias are written per (batch, channel) and summed over
    batch on the host: deterministic either way.

Scan orders (docs/design.md §3)
    Steps t of the recurrence map to memory positions m(t) = T(R(t)): every load
    and store goes through m, so inputs and outputs stay in memory order and no
    permuted copy exists. A tile holds ascending s = R(t) (``_common.tile_start``),
    so a reverse chunk is a contiguous tile whose steps run from its end to its
    start: the scans flip direction (``reverse=REVERSE``), not the data. T is a
    gather: an inter-slice chunk of BLOCK_L steps is BLOCK_L / S contiguous runs
    in each of the S slices. REVERSE and SLICED are constexprs, so the forward
    order pays no index arithmetic.

Offsets
    Every memory offset is int64 before any product that can pass 2^31 (the B/C
    row n * L did in int32 from (N - 1) * L = 2^31 on, L = 143M tokens at N = 16;
    positions and chunk indices stay below L and are int32).

Configs
    GPU: a few (BLOCK_D, BLOCK_L, num_warps) per kernel, autotuned per
    (dim, L, N, dim/groups, slices, dtypes and every constexpr that is not a tile
    size); chunks larger than the sequence are pruned. The compiled resources of
    every config are in benchmarks/TRITON_RESOURCES.md (``aot``).
    Interpreter: one small config (BLOCK_L = 16, so tiny test sequences still cross
    several chunk boundaries) and no benchmarking.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (INTERPRET, as_i64, checked_grid, config, configs_to_try, launch,
                      order_constexprs, silu_and_grad, slice_position, softplus, softplus_grad, tile_start)
from ._exact import accumulator_value, check_count, exact_add, exact_check, new_accumulator, new_overflow_flag

if INTERPRET:
    # BLOCK_D 2 first (exercises multi-channel blocks), 1 when dim/groups is odd.
    # BLOCK_L 16: test sequences of a few dozen steps still span several chunks,
    # while the per-chunk interpreter overhead stays bearable.
    FWD_CONFIGS = [config(1, BLOCK_D=2, BLOCK_L=16), config(1, BLOCK_D=1, BLOCK_L=16)]
    BWD_CONFIGS = FWD_CONFIGS
else:
    # Items per thread = BLOCK_D * BLOCK_L / (32 * num_warps): 4..8; BLOCK_D 2 halves
    # B/C traffic when batch * dim is large. 16 items (BLOCK_L 2048 with 4 warps) ran
    # out of registers (255 and spills) in the gathering (inter-slice) variants.
    # maxnreg=255: left to its own occupancy target, ptxas spilled a few values in the
    # inter-slice variants at 96..190 registers (benchmarks/TRITON_RESOURCES.md); the
    # programs are few (batch * dim / BLOCK_D: 192 at SegMamba's first stage on a
    # 132-SM GPU), so the grid, not the register count, bounds the occupancy there.
    FWD_CONFIGS = [
        config(4, 255, BLOCK_D=1, BLOCK_L=512),
        config(4, 255, BLOCK_D=1, BLOCK_L=1024),
        config(8, 255, BLOCK_D=1, BLOCK_L=2048),
        config(8, 255, BLOCK_D=2, BLOCK_L=1024),
    ]
    # The backward holds about three times as many live tiles: smaller chunks.
    BWD_CONFIGS = [
        config(4, 255, BLOCK_D=1, BLOCK_L=256),
        config(4, 255, BLOCK_D=1, BLOCK_L=512),
        config(8, 255, BLOCK_D=1, BLOCK_L=1024),
        config(8, 255, BLOCK_D=2, BLOCK_L=512),
    ]
MIN_BWD_BLOCK_L = min(c.kwargs["BLOCK_L"] for c in BWD_CONFIGS)
# Steps outside the sequence (the last chunk's tail) reach at most one chunk past either end.
ACC_PAD = max(c.kwargs["BLOCK_L"] for c in BWD_CONFIGS)
# Everything that changes the compiled program or its speed, except the tuned tile sizes.
FWD_KEY = ["dim", "L", "N", "dpg", "slices", "HAS_Z", "SOFTPLUS", "REVERSE", "SLICED", "BLOCK_N"]
BWD_KEY = FWD_KEY + ["DETERMINISTIC"]


def _prune(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    dpg, L = named_args["dpg"], named_args["L"]
    smallest = min(c.kwargs["BLOCK_L"] for c in configs)
    limit = max(triton.next_power_of_2(L), smallest)
    keep = [c for c in configs if dpg % c.kwargs["BLOCK_D"] == 0 and c.kwargs["BLOCK_L"] <= limit]
    return configs_to_try(keep, named_args)


def pick_configs(configs: list[triton.Config], dpg: int, L: int) -> list[triton.Config]:
    """The configs autotuning would consider for dim/groups = dpg and length L."""
    return _prune(configs, {"dpg": dpg, "L": L})


def grid(batch: int, dim: int, BLOCK_D: int) -> tuple[int, int]:
    """One program per (channel block, batch); channel blocks on axis 0 (up to 2^31 - 1), so
    that the programs of one group, which share B/C rows, run side by side."""
    return checked_grid((dim // BLOCK_D, batch))  # BLOCK_D divides dim / groups


# --------------------------------------------------------------------------- scan algebra

@triton.jit
def _affine_combine(a1, v1, a2, v2):
    # Step (a1, v1) then (a2, v2): h -> a2 * (a1 * h + v1) + v2.
    return a1 * a2, a2 * v1 + v2


@triton.jit
def _affine_prev_combine(a1, v1, p1, w1, a2, v2, p2, w2):
    # (a, v): the prefix map h -> a h + v; (p, w): the same prefix without its
    # last step. A single step is (a_t, v_t, 1, 0): without it, nothing happens.
    return a1 * a2, a2 * v1 + v2, p2 * a1, p2 * v1 + w2


@triton.jit
def _adjoint_combine(f1, p1, g1, f2, p2, g2):
    """Reverse-scan composition for g_t = c_t + a_{t+1} g_{t+1}.

    A segment [t..T] is (F, P, V) with F = a_t, P = a_{t+1}...a_T and
    g_t = V + P * q where q = a_{T+1} g_{T+1} comes from after the segment.
    The scan runs from late to early times, so (f1, p1, g1) is the later segment
    [m+1..T] and (f2, p2, g2) the earlier one [t..m]; q for the earlier segment
    is f1 * (g1 + p1 * q), which gives the result below. A single step is
    (a_t, 1, c_t). Associativity follows from this being composition of maps.
    """
    pf = p2 * f1
    return f2, pf * p1, g2 + pf * g1


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, SOFTPLUS: tl.constexpr):
    """(dt, pre-softplus delta) in the compute dtype; dt is 0 outside the sequence so
    that padded steps have decay 1 and input 0 and leave the state unchanged."""
    x = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(bias.dtype) + bias[:, None]
    dt = softplus(x) if SOFTPLUS else x
    return tl.where(mask, dt, 0.0), x


@triton.jit
def bc_row(bc_base, n, L):
    """Offset of row n of a group's B/C block (int64: n * L passes 2^31 once (N - 1) * L does)."""
    return bc_base + as_i64(n) * L


@triton.jit
def _tile(c, L, slices, local, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr, SLICED: tl.constexpr):
    """(memory positions, in-sequence mask) of the tile holding chunk c's steps."""
    s = tile_start(c, L, BLOCK_L, REVERSE) + local
    return slice_position(s, L, slices, SLICED), (s >= 0) & (s < L)


@triton.jit
def _chunk_ends(local, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """Masks of the tile slots holding a chunk's first and last step ([1, BLOCK_L])."""
    if REVERSE:
        first, last = local == BLOCK_L - 1, local == 0
    else:
        first, last = local == 0, local == BLOCK_L - 1
    return first[None, :], last[None, :]


@triton.jit
def _chunk_forward(A_ptr, B_ptr, C_ptr, a_row, bc_base, pos, t_ok, first, last, dt, dtu, h, n_idx, L, N,
                   REVERSE: tl.constexpr):
    """One chunk of the forward recurrence for all states.

    Returns (sum_n C_t h_t[n] as a [BLOCK_D, BLOCK_L] tile, the state after the
    chunk). ``h`` is the state before the chunk, [BLOCK_D, BLOCK_N]; ``pos`` the
    chunk's memory positions; ``bc_base`` (int64) the offset of the group's B/C rows.
    """
    y = tl.zeros_like(dt)
    h_next = h
    for n in range(N):
        # Register tiles cannot be indexed: state n is selected by a mask. (No
        # helper function for this: under the interpreter every device-function
        # call re-patches triton.language, which dominated the test run time.)
        is_n = n_idx[None, :] == n
        A_n = tl.load(A_ptr + a_row + n)
        bc_offs = bc_row(bc_base, n, L) + pos
        B_n = tl.load(B_ptr + bc_offs, mask=t_ok, other=0.0).to(dt.dtype)
        C_n = tl.load(C_ptr + bc_offs, mask=t_ok, other=0.0).to(dt.dtype)
        a = tl.exp(dt * A_n[:, None])
        h0 = tl.sum(tl.where(is_n, h, 0.0), axis=1)
        v = dtu * B_n[None, :] + tl.where(first, a * h0[:, None], 0.0)
        _, hs = tl.associative_scan((a, v), axis=1, combine_fn=_affine_combine, reverse=REVERSE)
        y += hs * C_n[None, :]
        h_next = tl.where(is_n, tl.sum(tl.where(last, hs, 0.0), axis=1)[:, None], h_next)
    return y, h_next


# --------------------------------------------------------------------------- forward

@triton.autotune(configs=FWD_CONFIGS, key=FWD_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    dim, L, N, dpg, groups, slices,
    HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # No channel masks: BLOCK_D divides dim / groups, so every block is full.
    d0 = tl.program_id(0) * BLOCK_D
    pid_b = as_i64(tl.program_id(1))
    d = d0 + tl.arange(0, BLOCK_D)
    n_idx = tl.arange(0, BLOCK_N)
    rows = (pid_b * dim + d) * L
    bc_base = (pid_b * groups + d0 // dpg) * N * L
    a_row = d * N
    bias = tl.load(bias_ptr + d)
    Dv = tl.load(D_ptr + d)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=bias.dtype)
    local = tl.arange(0, BLOCK_L)
    first, last = _chunk_ends(local, BLOCK_L, REVERSE)
    for c in range(0, tl.cdiv(L, BLOCK_L)):
        pos, t_ok = _tile(c, L, slices, local, BLOCK_L, REVERSE, SLICED)
        offs = rows[:, None] + pos[None, :]
        mask = t_ok[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
        dt, _ = _load_dt(delta_ptr, offs, mask, bias, SOFTPLUS)
        ys, h = _chunk_forward(A_ptr, B_ptr, C_ptr, a_row, bc_base, pos, t_ok, first, last, dt, dt * u, h,
                               n_idx, L, N, REVERSE)
        y = ys + Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
            y = y * silu_and_grad(zv)[0]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    n_ok = (n_idx < N)[None, :]
    tl.store(last_ptr + a_row[:, None] + pid_b * dim * N + n_idx[None, :], h, mask=n_ok)


def _dims(u: Tensor, A: Tensor, B: Tensor) -> tuple[int, int, int, int, int]:
    batch, dim, L = u.shape
    groups, N = B.shape[1], A.shape[1]
    return batch, dim, L, N, groups


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                       delta_bias: Tensor, delta_softplus: bool, *, reverse: bool = False,
                       slices: int = 1) -> tuple[Tensor, Tensor]:
    batch, dim, L, N, groups = _dims(u, A, B)
    order = order_constexprs(L, reverse, slices)
    out = torch.empty_like(u)
    last_state = u.new_empty((batch, dim, N), dtype=A.dtype)
    launch(_scan_fwd_kernel, lambda meta: grid(batch, dim, meta["BLOCK_D"]), u.device,
           u, delta, A, B, C, D, z, delta_bias, out, last_state,
           dim, L, N, dim // groups, groups, slices,
           HAS_Z=z is not None, SOFTPLUS=bool(delta_softplus), **order, BLOCK_N=triton.next_power_of_2(N))
    return out, last_state


# --------------------------------------------------------------------------- backward

@triton.jit
def _accumulate(acc_ptr, plane, offs, x, amax, DETERMINISTIC: tl.constexpr):
    """acc[offs] += x across programs: exact fixed point, or a relaxed float atomic. Unmasked:
    steps outside the sequence add exact zeros into the padded buffer. Returns the running max
    of |x| the fixed point needs (unchanged for floats)."""
    if DETERMINISTIC:
        return exact_add(acc_ptr, plane, offs, x, amax)
    else:
        tl.atomic_add(acc_ptr + offs, x, sem="relaxed")
        return amax


@triton.autotune(configs=BWD_CONFIGS, key=BWD_KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["dB_ptr", "dC_ptr", "overflow_ptr"])
@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, states_ptr, overflow_ptr,
    dim, L, N, dpg, groups, slices, max_chunks, acc_plane,
    HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, SLICED: tl.constexpr,
    DETERMINISTIC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # No channel masks: BLOCK_D divides dim / groups, so every block is full.
    d0 = tl.program_id(0) * BLOCK_D
    pid_b = as_i64(tl.program_id(1))
    d = d0 + tl.arange(0, BLOCK_D)
    n_idx = tl.arange(0, BLOCK_N)
    rows = (pid_b * dim + d) * L
    bc_base = (pid_b * groups + d0 // dpg) * N * L
    a_row = d * N
    state_offs_d = (pid_b * dim + d) * max_chunks * N
    state_offs = state_offs_d[:, None] + n_idx[None, :]
    n_ok = (n_idx < N)[None, :]
    bias = tl.load(bias_ptr + d)
    Dv = tl.load(D_ptr + d)
    local = tl.arange(0, BLOCK_L)
    first, last = _chunk_ends(local, BLOCK_L, REVERSE)
    n_chunks = tl.cdiv(L, BLOCK_L)
    adders = dpg // BLOCK_D  # programs adding into each dB/dC element

    # Phase 1: chunk start states (and dz, which needs the pre-gate output y).
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=bias.dtype)
    for c in range(0, n_chunks):
        tl.store(states_ptr + state_offs + c * N, h, mask=n_ok)
        pos, t_ok = _tile(c, L, slices, local, BLOCK_L, REVERSE, SLICED)
        offs = rows[:, None] + pos[None, :]
        mask = t_ok[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
        dt, _ = _load_dt(delta_ptr, offs, mask, bias, SOFTPLUS)
        ys, h = _chunk_forward(A_ptr, B_ptr, C_ptr, a_row, bc_base, pos, t_ok, first, last, dt, dt * u, h,
                               n_idx, L, N, REVERSE)
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
            dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
            dz = dout * (ys + Dv[:, None] * u) * silu_and_grad(zv)[1]
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    # The states were stored by other threads of this program.
    tl.debug_barrier()

    # Phase 2: chunks in reverse, adjoint state q = a_{T+1} g_{T+1} carried backwards.
    q = tl.zeros([BLOCK_D, BLOCK_N], dtype=bias.dtype)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=bias.dtype)
    dD = tl.zeros([BLOCK_D], dtype=bias.dtype)
    dbias = tl.zeros([BLOCK_D], dtype=bias.dtype)
    amax = tl.zeros([BLOCK_L], dtype=bias.dtype)  # max |dB|, |dC| contribution, for exact_check
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        pos, t_ok = _tile(c, L, slices, local, BLOCK_L, REVERSE, SLICED)
        offs = rows[:, None] + pos[None, :]
        mask = t_ok[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
        dt, x = _load_dt(delta_ptr, offs, mask, bias, SOFTPLUS)
        dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(bias.dtype)
            dy = dy * silu_and_grad(zv)[0]
        dD += tl.sum(dy * u, axis=1)
        dtu = dt * u
        du = dy * Dv[:, None]
        ddt = tl.zeros_like(dt)
        ones = tl.full(dt.shape, 1.0, dt.dtype)
        for n in range(N):
            is_n = n_idx[None, :] == n
            bc_offs = bc_row(bc_base, n, L) + pos
            A_n = tl.load(A_ptr + a_row + n)
            B_n = tl.load(B_ptr + bc_offs, mask=t_ok, other=0.0).to(bias.dtype)
            C_n = tl.load(C_ptr + bc_offs, mask=t_ok, other=0.0).to(bias.dtype)
            a = tl.exp(dt * A_n[:, None])
            h0 = tl.load(states_ptr + state_offs_d + c * N + n)[:, None]
            # The start state enters the first step's value, and is the first step's h_{t-1}.
            _, hs, _, h_prev = tl.associative_scan(
                (a, dtu * B_n[None, :] + tl.where(first, a * h0, 0.0), ones, tl.where(first, h0, 0.0)),
                axis=1, combine_fn=_affine_prev_combine, reverse=REVERSE)
            # Zero outside the sequence: dy is 0 there.
            amax = _accumulate(dC_ptr, acc_plane, bc_offs, tl.sum(dy * hs, axis=0), amax, DETERMINISTIC)
            q0 = tl.sum(tl.where(is_n, q, 0.0), axis=1)
            c_dy = dy * C_n[None, :] + tl.where(last, q0[:, None], 0.0)
            _, _, g = tl.associative_scan((a, ones, c_dy), axis=1,
                                          combine_fn=_adjoint_combine, reverse=not REVERSE)
            q = tl.where(is_n, tl.sum(tl.where(first, a * g, 0.0), axis=1)[:, None], q)
            # Zero outside the sequence: dt, hence dtu, is 0 there.
            amax = _accumulate(dB_ptr, acc_plane, bc_offs, tl.sum(g * dtu, axis=0), amax, DETERMINISTIC)
            gB = g * B_n[None, :]
            du += gB * dt
            w = g * a * h_prev
            ddt += gB * u + w * A_n[:, None]
            dA += tl.where(is_n, tl.sum(w * dt, axis=1)[:, None], 0.0)
        if SOFTPLUS:
            ddt = ddt * softplus_grad(x)
        ddt = tl.where(mask, ddt, 0.0)
        dbias += tl.sum(ddt, axis=1)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
    part = pid_b * dim + d
    tl.store(dA_ptr + part[:, None] * N + n_idx[None, :], dA, mask=n_ok)
    tl.store(dD_ptr + part, dD)
    tl.store(dbias_ptr + part, dbias)
    if DETERMINISTIC:  # one range check per program, not one per element in the loop
        exact_check(overflow_ptr, amax, adders)


def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
                       delta_bias: Tensor, delta_softplus: bool, dout: Tensor, *, reverse: bool = False,
                       slices: int = 1, deterministic: bool = False) -> tuple[Tensor, ...]:
    batch, dim, L, N, groups = _dims(u, A, B)
    order = order_constexprs(L, reverse, slices)
    cdt = A.dtype
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    # Per (batch, channel) partial sums, reduced over batch below.
    dA_part = u.new_empty((batch, dim, N), dtype=cdt)
    dD_part = u.new_empty((batch, dim), dtype=cdt)
    dbias_part = u.new_empty((batch, dim), dtype=cdt)
    # Accumulators summed over the channels of each group, fixed point or float, padded by
    # ACC_PAD elements on both sides for the unmasked adds of steps outside the sequence.
    if deterministic:
        check_count(dim // groups, "selective_scan_bwd (triton)")
        dB_acc, dC_acc = (new_accumulator(B.numel(), ACC_PAD, u.device) for _ in range(2))
        overflow = new_overflow_flag(u.device)
    else:
        dB_acc, dC_acc = (torch.zeros(B.numel() + 2 * ACC_PAD, dtype=cdt, device=u.device) for _ in range(2))
        overflow = None
    # Sized for the smallest chunk any config may pick.
    max_chunks = triton.cdiv(L, MIN_BWD_BLOCK_L)
    states = u.new_empty((batch, dim, max_chunks, N), dtype=cdt)
    launch(_scan_bwd_kernel, lambda meta: grid(batch, dim, meta["BLOCK_D"]), u.device,
           u, delta, A, B, C, D, z, delta_bias, dout,
           du, ddelta, dz if z is not None else None, dA_part, dB_acc[ACC_PAD:], dC_acc[ACC_PAD:], dD_part,
           dbias_part, states, overflow,
           dim, L, N, dim // groups, groups, slices, max_chunks, B.numel() if deterministic else 0,
           HAS_Z=z is not None, SOFTPLUS=bool(delta_softplus), **order, DETERMINISTIC=bool(deterministic),
           BLOCK_N=triton.next_power_of_2(N))
    if deterministic:
        dB, dC = (accumulator_value(acc, ACC_PAD, B.shape, overflow, B.dtype) for acc in (dB_acc, dC_acc))
    else:
        dB, dC = (acc[ACC_PAD:ACC_PAD + B.numel()].view(B.shape).to(B.dtype) for acc in (dB_acc, dC_acc))
    return du, ddelta, dA_part.sum(0), dB, dC, dD_part.sum(0), dz, dbias_part.sum(0)
