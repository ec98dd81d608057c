"""csrc/cuda run on the CPU by the emulator in csrc/emu, against the float64 reference.

The CUDA kernel sources are compiled unchanged by the host compiler against an emulation of
the CUDA subset they use (csrc/emu/README.md): threads of a block are fibers whose order
between barriers is permuted, blocks run in a permuted order, shared memory starts as NaN,
barriers and warp shuffles are rendezvous that report divergence, and every load and store
reaches a race detector (inter-block and, between barriers, intra-block). The extension is
built on first use into build/emu (cached); SEGMAMBA_EMU_SANITIZE=address builds it with
AddressSanitizer instead (csrc/emu/asan.sh), SEGMAMBA_EMU_CUDA_SRC points it at other kernel
sources (tests/mutation). The host logic is the CUDA backend's own (csrc/cuda/host_ops.h)
with CPU tensors as device memory and the SM count set by `configure`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

from segmamba_kernels.reference import causal_conv1d_ref, selective_scan_ref

pytestmark = pytest.mark.emulated

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = list(TOL)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _chunk(dtype: torch.dtype) -> int:
    """Scan chunk (and conv tile) length of the CUDA kernels: 128 threads x one 16-byte vector."""
    return 128 * 16 // torch.empty(0, dtype=dtype).element_size()


@pytest.fixture(scope="module")
def emu() -> ModuleType:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the CUDA emulator's fibers are written for x86-64 Linux")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no host C++ compiler (g++) to build the CUDA emulator with")
    spec = importlib.util.spec_from_file_location("segmamba_emu_build", ROOT / "csrc" / "emu" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load(os.environ.get("SEGMAMBA_EMU_SANITIZE") or None, os.environ.get("SEGMAMBA_EMU_CUDA_SRC"),
                      os.environ.get("SEGMAMBA_EMU_BUILD_DIR"))


@contextlib.contextmanager
def schedule(emu: ModuleType, target_blocks: int = 2112, order: str = "random", seed: int = 0,
             blocks: str | None = None):
    """Runs the body with the given target grid size of the segment planning (SMs x 16 on a
    GPU) and thread/block orders, then restores the defaults."""
    emu.configure(target_blocks=target_blocks, thread_order=order, block_order=blocks or order, seed=seed)
    emu.launches()
    try:
        yield
    finally:
        emu.configure()


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """max |got - ref| <= tol * max(max |ref|, 1e-3)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().double(), ref.detach().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(ref.abs().max().item(), 1e-3)
    err = (got - ref).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * scale {scale:.3g}"


# --------------------------------------------------------------------------- the emulator itself

SHUFFLES = {"xor": (0, lambda l, a: l ^ a), "up": (1, lambda l, a: l - a if l % 32 >= a else l),
            "down": (2, lambda l, a: l + a if l % 32 + a < 32 else l), "idx": (3, lambda l, a: (l // 32) * 32 + a)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(SHUFFLES))
def test_warp_shuffles_are_exact_over_32_lanes(emu, kind, dtype):
    values = torch.randn(96, dtype=dtype)
    code, src = SHUFFLES[kind]
    for arg in (1, 5, 16, 31):
        got = emu.selftest.shuffle(values, code, arg, 32)
        want = values[[src(lane, arg) for lane in range(96)]].float()
        assert torch.equal(got, want), f"{kind} {arg}"


def test_thread_and_block_orders(emu):
    seen = {}
    for order in ("forward", "reverse", "random"):
        with schedule(emu, order=order, seed=7):
            threads, blocks = emu.selftest.order(5, 64)
        assert sorted(blocks.tolist()) == list(range(5))
        for row in threads:
            assert sorted(row.tolist()) == list(range(64))
        seen[order] = (threads, blocks)
    assert seen["forward"][0][0].tolist() == list(range(64)) and seen["forward"][1].tolist() == list(range(5))
    assert seen["reverse"][0][0].tolist() == list(range(63, -1, -1)) and seen["reverse"][1].tolist() == [4, 3, 2, 1, 0]
    assert seen["random"][0][0].tolist() not in (list(range(64)), list(range(63, -1, -1)))
    assert not torch.equal(seen["random"][0][0], seen["random"][0][1]), "each block draws its own order"


def test_shared_memory_starts_as_nan(emu):
    assert torch.isnan(emu.selftest.uninitialised_shared(64)).all()


def test_missing_barrier_is_reported(emu):
    x = torch.arange(64, dtype=torch.float32)
    assert torch.equal(emu.selftest.neighbour(x, True), x.roll(-1))
    if emu.race_detector_active():
        with pytest.raises(RuntimeError, match=r"(?s)neighbour_kernel: \d+ racing access.*race on shared memory.*"
                                               r"no __syncthreads\(\) between them"):
            emu.selftest.neighbour(x, False)
    emu.configure(thread_order="forward", race_check=False)
    try:
        # Thread t reads its neighbour's slot before that thread ran: still NaN.
        assert torch.isnan(emu.selftest.neighbour(x, False)[:-1]).all()
    finally:
        emu.configure()


def test_barrier_divergence_is_an_error(emu):
    with pytest.raises(RuntimeError, match=r"early_return_kernel block \(0,0,0\): barrier divergence: 63 thread\(s\) "
                                           r"wait at __syncthreads\(\).*1 returned \(first: thread 0\)"):
        emu.selftest.early_return(64)
    with pytest.raises(RuntimeError, match=r"barrier divergence: thread 0 waits at __syncthreads\(\) .*first_barrier"
                                           r".*thread 32 at .*second_barrier"):
        emu.selftest.divergent_barrier(64)


def test_shuffle_that_not_all_lanes_reach_is_an_error(emu):
    with pytest.raises(RuntimeError, match=r"deadlock.*32 at a warp shuffle.*32 returned"):
        emu.selftest.partial_shuffle(64)


def test_plain_adds_from_several_blocks_are_a_race(emu):
    assert emu.selftest.add_from_blocks(7, 64, True).item() == 7 * 64
    if not emu.race_detector_active():
        pytest.skip("the race detector needs the -fsanitize=thread build (not the ASan one)")
    with pytest.raises(RuntimeError, match=r"(?s)add_kernel: \d+ racing access.*race on global memory"):
        emu.selftest.add_from_blocks(7, 64, False)


# --------------------------------------------------------------------------- selective scan

@dataclasses.dataclass(frozen=True)
class ScanCase:
    batch: int
    dim: int
    L: int
    N: int
    groups: int
    target_blocks: int = 2112  # below batch * dim * chunks: several segments

    def __str__(self) -> str:
        return f"b{self.batch}-d{self.dim}-L{self.L}-N{self.N}-g{self.groups}-t{self.target_blocks}"


def carry_case(dtype: torch.dtype, N: int = 3) -> ScanCase:
    """2.5 chunks (odd L) over 2 segments of up to 2 chunks: the chunk carry inside a segment,
    the segment map and prefix passes, and a partial last chunk all run. Grouped B/C, two
    channels per group. (batch * dim stays small: the reference's backward is quadratic in L.)"""
    return ScanCase(1, 4, 5 * _chunk(dtype) // 2 + 1, N, 2, target_blocks=8)


OPTS = {  # D, z, delta_bias, delta_softplus
    "all": dict(D=True, z=True, delta_bias=True, softplus=True),
    "none": dict(D=False, z=False, delta_bias=False, softplus=False),
    "D-bias": dict(D=True, z=False, delta_bias=True, softplus=False),
    "z-softplus": dict(D=False, z=True, delta_bias=False, softplus=True),
}


def make_scan(case: ScanCase, opts: dict, dtype: torch.dtype, seed: int = 0) -> dict:
    """Backend-contract inputs: B/C 4-d, D and delta_bias always given (zeros when off)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b, d, L, N, G = case.batch, case.dim, case.L, case.N, case.groups
    delta = (0.5 * r(b, d, L) - 1.0 if opts["softplus"]
             else 0.2 + 0.3 * torch.rand(b, d, L, generator=g, dtype=torch.float64))
    # Without softplus dt = delta + delta_bias is used as is: keep it positive so states stay bounded.
    bias = 0.3 * r(d) if opts["softplus"] else 0.1 * torch.rand(d, generator=g, dtype=torch.float64)
    return dict(
        u=r(b, d, L).to(dtype), delta=delta.to(dtype),
        A=(-0.1 - 2.0 * torch.rand(d, N, generator=g, dtype=torch.float64)).to(acc),
        B=r(b, G, N, L).to(dtype), C=r(b, G, N, L).to(dtype),
        D=(r(d) if opts["D"] else torch.zeros(d, dtype=torch.float64)).to(acc),
        z=r(b, d, L).to(dtype) if opts["z"] else None,
        delta_bias=(bias if opts["delta_bias"] else torch.zeros(d, dtype=torch.float64)).to(acc),
        dout=r(b, d, L).to(dtype),
    )


SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def run_scan(emu: ModuleType, x: dict, softplus: bool, **kw) -> tuple[torch.Tensor, torch.Tensor, dict]:
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, last = emu.selective_scan_fwd(*args, softplus, **kw.get("fwd", {}))
    grads = emu.selective_scan_bwd(*args, softplus, x["dout"], **kw.get("bwd", {}))
    return out, last, {k: g for k, g in zip(SCAN_GRADS, grads) if x[k] is not None}


def ref_scan(x: dict, softplus: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    leaves = {k: x[k].double().requires_grad_() for k in SCAN_GRADS if x[k] is not None}
    out, last = selective_scan_ref(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                                   leaves.get("z"), leaves["delta_bias"], softplus, return_last_state=True)
    out.backward(x["dout"].double())
    return out, last, {k: v.grad for k, v in leaves.items()}


def check_scan(emu: ModuleType, case: ScanCase, opts: dict, dtype: torch.dtype, **kw) -> list:
    x = make_scan(case, opts, dtype)
    with schedule(emu, case.target_blocks, seed=case.L):
        out, last, grads = run_scan(emu, x, opts["softplus"], **kw)
        launches = emu.launches()
    ref, ref_last, ref_grads = ref_scan(x, opts["softplus"])
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert_close_scaled(out, ref, tol, "out")
    assert_close_scaled(last, ref_last, tol, "last_state")
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.dtype == x[name].dtype, f"d{name}: dtype {g.dtype}, expected {x[name].dtype}"
        assert_close_scaled(g, ref_grads[name], tol, f"d{name}")
    return launches


@pytest.mark.parametrize("opts", ["all", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_scan_carries_across_chunks_and_segments(emu, dtype, opts):
    case = carry_case(dtype)
    launches = check_scan(emu, case, OPTS[opts], dtype)
    nchunks = -(-case.L // _chunk(dtype))
    maps = [grid for name, grid, _ in launches if name.startswith("scan_segment_map_kernel")]
    # Forward: one map pass; backward: the forward map (for the recorded states) and the adjoint's.
    assert len(maps) == 3 and all(grid[1] == 2 for grid in maps), launches
    assert nchunks == 3, "two segments, one of them with two chunks"


@pytest.mark.parametrize("opts", list(OPTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_scan_short_sequences(emu, dtype, opts):
    check_scan(emu, ScanCase(1, 3, 1, 2, 1), OPTS[opts], dtype)
    check_scan(emu, ScanCase(2, 6, 37, 3, 3), OPTS[opts], dtype)


@pytest.mark.parametrize("N", [1, 17])
def test_scan_state_sizes(emu, N):
    check_scan(emu, ScanCase(1, 2, 1100, N, 1, target_blocks=4), OPTS["D-bias"], torch.float32)


def test_scan_vector_and_scalar_paths_agree_bitwise(emu):
    """A 4-byte offset (or L not a multiple of the vector) sends every load and store through
    the scalar path: same arithmetic, so the same bits."""
    case, dtype = ScanCase(1, 2, 1024 + 16, 3, 1, target_blocks=4), torch.float32
    x = make_scan(case, OPTS["all"], dtype)

    def shifted(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.dtype != dtype:
            return t
        buf = torch.empty(t.numel() + 1, dtype=dtype)[1:].view(t.shape)
        return buf.copy_(t)

    xs = {k: shifted(v) for k, v in x.items()}
    assert xs["u"].data_ptr() % 16 != 0 and xs["u"].is_contiguous()
    with schedule(emu, case.target_blocks, blocks="forward"):  # the same order of the float atomics
        want = run_scan(emu, x, True)
        got = run_scan(emu, xs, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for k in want[2]:
        assert torch.equal(got[2][k], want[2][k]), f"d{k}"


def test_scan_forward_is_independent_of_the_schedule(emu):
    case, dtype = carry_case(torch.float32), torch.float32
    x = make_scan(case, OPTS["all"], dtype)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        with schedule(emu, case.target_blocks, order, seed):
            results.append(emu.selective_scan_fwd(*args, True))
    for out, last in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(last, results[0][1])


def test_scan_bad_input_is_refused(emu):
    x = make_scan(ScanCase(1, 4, 5, 3, 1), OPTS["all"], torch.float32)
    args = dict(u=x["u"], delta=x["delta"], A=x["A"], B=x["B"], C=x["C"], D=x["D"], z=x["z"],
                delta_bias=x["delta_bias"], delta_softplus=True)
    fwd = emu.selective_scan_fwd
    with pytest.raises(RuntimeError, match=r"state size N .* must be in \[1, 256\], got 257"):
        fwd(**{**args, "A": torch.zeros(4, 257), "B": torch.zeros(1, 1, 257, 5), "C": torch.zeros(1, 1, 257, 5)})
    with pytest.raises(RuntimeError, match=r"D must have dtype Float, got Double"):
        fwd(**{**args, "D": args["D"].double()})
    with pytest.raises(RuntimeError, match=r"groups \(B.shape\[1\]\) must divide dim = 4, got 3"):
        fwd(**{**args, "B": torch.zeros(1, 3, 3, 5), "C": torch.zeros(1, 3, 3, 5)})
    with pytest.raises(RuntimeError, match=r"delta must be contiguous"):
        fwd(**{**args, "delta": args["delta"].transpose(1, 2).contiguous().transpose(1, 2)})
    with pytest.raises(RuntimeError, match=r"u must be a CPU tensor \(the emulated device\), got one on meta"):
        fwd(**{**args, "u": args["u"].to("meta")})
    with pytest.raises(RuntimeError, match=r"dout must have shape \[1, 4, 5\], got \[1, 4, 6\]"):
        emu.selective_scan_bwd(**args, dout=torch.zeros(1, 4, 6))


def test_scan_empty_input(emu):
    x = make_scan(ScanCase(2, 3, 0, 4, 1), OPTS["all"], torch.float32)
    out, last, grads = run_scan(emu, x, True)
    assert out.shape == (2, 3, 0) and torch.equal(last, torch.zeros(2, 3, 4))
    assert grads["A"].shape == (3, 4) and not grads["A"].any()


# --------------------------------------------------------------------------- causal conv1d

def make_conv(batch: int, dim: int, L: int, width: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(batch, dim, L).to(dtype), weight=r(dim, width).to(acc), bias=r(dim).to(acc),
                dout=r(batch, dim, L).to(dtype))


def run_conv(emu: ModuleType, c: dict, silu: bool, **kw) -> tuple[torch.Tensor, tuple]:
    out = emu.causal_conv1d_fwd(c["x"], c["weight"], c["bias"], silu, **kw.get("fwd", {}))
    return out, emu.causal_conv1d_bwd(c["x"], c["weight"], c["bias"], silu, c["dout"], **kw.get("bwd", {}))


def ref_conv(c: dict, silu: bool) -> tuple[torch.Tensor, tuple]:
    leaves = [c[k].double().requires_grad_() for k in ("x", "weight", "bias")]
    out = causal_conv1d_ref(*leaves, activation="silu" if silu else None)
    out.backward(c["dout"].double())
    return out, tuple(t.grad for t in leaves)


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "linear"])
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_conv_matches_reference(emu, dtype, width, silu):
    # Two tiles and a partial third (odd L): the halos before and after a tile cross blocks.
    for batch, dim, L in ((1, 3, 1), (2, 3, 2 * _chunk(dtype) + 37)):
        c = make_conv(batch, dim, L, width, dtype)
        with schedule(emu, seed=L + width):
            out, grads = run_conv(emu, c, silu)
        ref, ref_grads = ref_conv(c, silu)
        assert out.dtype == dtype
        assert_close_scaled(out, ref, TOL[dtype], "out")
        for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
            assert g.dtype == c[name].dtype
            assert_close_scaled(g, r, TOL[dtype], f"d{name}")


def test_conv_vector_and_scalar_paths_agree_bitwise(emu):
    c = make_conv(2, 3, 1024 + 8, 4, torch.bfloat16)
    cs = dict(c)
    for k in ("x", "dout"):
        cs[k] = torch.empty(c[k].numel() + 1, dtype=c[k].dtype)[1:].view(c[k].shape).copy_(c[k])
    assert cs["x"].data_ptr() % 16 != 0
    want, got = run_conv(emu, c, True), run_conv(emu, cs, True)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def test_conv_bad_input_is_refused(emu):
    c = make_conv(1, 2, 5, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"width .* must be in \[2, 4\], got 5"):
        emu.causal_conv1d_fwd(c["x"], torch.zeros(2, 5), c["bias"], True)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[2\], got \[3\]"):
        emu.causal_conv1d_bwd(c["x"], c["weight"], torch.zeros(3), True, c["dout"])


# --------------------------------------------------------------------------- scan orders

def scan_positions(L: int, reverse: bool, slices: int) -> torch.Tensor:
    """m(t) of docs/design.md §3: the memory position scan step t reads and writes."""
    s = torch.arange(L)
    if reverse:
        s = L - 1 - s
    return (s % slices) * (L // slices) + s // slices


def test_scan_positions_are_the_model_orders():
    from segmamba_kernels import to_order

    x = torch.arange(60.0)
    assert torch.equal(x[scan_positions(60, True, 1)], to_order(x, "reverse", 1))
    assert torch.equal(x[scan_positions(60, False, 5)], to_order(x, "inter_slice", 5))
    assert torch.equal(x[scan_positions(60, True, 5)], to_order(x, "inter_slice", 5).flip(-1))


ORDERS = {"reverse": (True, 1), "inter_slice": (False, 5), "reverse-inter_slice": (True, 5)}


def order_case(dtype: torch.dtype, order: str) -> ScanCase:
    """2.5 chunks over 2 segments as carry_case; L a multiple of the vector for the reversed
    vector path, and of the 5 slices (whose length, L / 5, is odd) otherwise."""
    half = _chunk(dtype) // 2
    L = 5 * half if ORDERS[order][1] == 1 else 5 * (half + 1)
    return ScanCase(1, 4, L, 3, 2, target_blocks=8)


def permuted_scan_ref(x: dict, softplus: bool, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The reference run in scan order: inputs gathered at m(t), outputs scattered back."""
    leaves = {k: x[k].double().requires_grad_() for k in SCAN_GRADS if x[k] is not None}
    seq = {k: (v[..., perm] if v.dim() >= 3 else v) for k, v in leaves.items()}
    y, last = selective_scan_ref(seq["u"], seq["delta"], seq["A"], seq["B"], seq["C"], seq["D"], seq.get("z"),
                                 seq["delta_bias"], softplus, return_last_state=True)
    out = torch.empty_like(y)
    out[..., perm] = y
    out.backward(x["dout"].double())
    return out, last, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_scan_orders(emu, dtype, order):
    reverse, slices = ORDERS[order]
    case = order_case(dtype, order)
    x = make_scan(case, OPTS["all"], dtype)
    kw = dict(reverse=reverse, slices=slices)
    with schedule(emu, case.target_blocks, seed=3):
        out, last, grads = run_scan(emu, x, True, fwd=kw, bwd=kw)
        launches = emu.launches()
    assert sum(name.startswith("scan_segment_map_kernel") and grid[1] == 2 for name, grid, _ in launches) == 3
    ref, ref_last, ref_grads = permuted_scan_ref(x, True, scan_positions(case.L, reverse, slices))
    assert_close_scaled(out, ref, TOL[dtype], "out")
    assert_close_scaled(last, ref_last, TOL[dtype], "last_state")
    for name, g in grads.items():
        assert_close_scaled(g, ref_grads[name], TOL[dtype], f"d{name}")


def test_scan_reverse_without_vectors(emu):
    """Odd L: the reversed order through the one-item-at-a-time path."""
    case, dtype = carry_case(torch.float32), torch.float32
    x = make_scan(case, OPTS["z-softplus"], dtype)
    with schedule(emu, case.target_blocks):
        out, last, grads = run_scan(emu, x, True, fwd=dict(reverse=True), bwd=dict(reverse=True))
    ref, ref_last, ref_grads = permuted_scan_ref(x, True, scan_positions(case.L, True, 1))
    assert_close_scaled(out, ref, TOL[dtype], "out")
    for name, g in grads.items():
        assert_close_scaled(g, ref_grads[name], TOL[dtype], f"d{name}")


def permuted_conv_ref(c: dict, silu: bool, perm: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    leaves = [c[k].double().requires_grad_() for k in ("x", "weight", "bias")]
    y = causal_conv1d_ref(leaves[0][..., perm], leaves[1], leaves[2], activation="silu" if silu else None)
    out = torch.empty_like(y)
    out[..., perm] = y
    out.backward(c["dout"].double())
    return out, tuple(t.grad for t in leaves)


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_conv_orders(emu, dtype, order):
    reverse, slices = ORDERS[order]
    L = 5 * ((2 * _chunk(dtype) + 45) // 5)  # three tiles, the halos cross them; 5 slices of odd length
    kw = dict(reverse=reverse, slices=slices)
    for width in (2, 4):
        c = make_conv(2, 3, L, width, dtype)
        with schedule(emu, seed=width):
            out, grads = run_conv(emu, c, True, fwd=kw, bwd=kw)
        ref, ref_grads = permuted_conv_ref(c, True, scan_positions(L, reverse, slices))
        assert_close_scaled(out, ref, TOL[dtype], "out")
        for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
            assert_close_scaled(g, r, TOL[dtype], f"d{name}")


def test_slices_must_divide_L(emu):
    x = make_scan(ScanCase(1, 2, 10, 2, 1), OPTS["none"], torch.float32)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    msg = r"slices must be a positive divisor of the sequence length L = 10, got {}"
    with pytest.raises(RuntimeError, match=r"selective_scan_fwd \(cuda backend\): " + msg.format(3)):
        emu.selective_scan_fwd(*args, False, slices=3)
    with pytest.raises(RuntimeError, match=r"selective_scan_bwd \(cuda backend\): " + msg.format(0)):
        emu.selective_scan_bwd(*args, False, x["dout"], slices=0)
    c = make_conv(1, 2, 10, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"causal_conv1d_fwd \(cuda backend\): " + msg.format(4)):
        emu.causal_conv1d_fwd(c["x"], c["weight"], c["bias"], True, slices=4)
    with pytest.raises(RuntimeError, match=r"causal_conv1d_bwd \(cuda backend\): " + msg.format(-1)):
        emu.causal_conv1d_bwd(c["x"], c["weight"], c["bias"], True, c["dout"], slices=-1)


# --------------------------------------------------------------------------- deterministic backward

SCHEDULES = [("forward", "forward", 0), ("reverse", "reverse", 0), ("random", "random", 1), ("reverse", "random", 2)]


def scan_grads_under(emu: ModuleType, x: dict, case: ScanCase, softplus: bool, **kw) -> list[dict]:
    """The backward's gradients under each of SCHEDULES (thread order, block order, seed)."""
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    runs = []
    for threads, blocks, seed in SCHEDULES:
        with schedule(emu, case.target_blocks, threads, seed, blocks):
            grads = emu.selective_scan_bwd(*args, softplus, x["dout"], **kw)
        runs.append({k: g for k, g in zip(SCAN_GRADS, grads) if x[k] is not None})
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
def test_deterministic_scan_backward_is_bitwise_stable(emu, dtype):
    # 3 channels: the block has an idle warp. Two segments: four blocks add to every dA, dD,
    # ddelta_bias element. (The reference's backward slows down sharply once its
    # (batch, dim, N, L) gradient buffers pass ~256 KB: keep them below.)
    case = ScanCase(2, 3, 5 * _chunk(dtype) // 2 + 1, 2, 1, target_blocks=12)
    x = make_scan(case, OPTS["all"], dtype)
    det = scan_grads_under(emu, x, case, True, deterministic=True)
    for run in det[1:]:
        for k in run:
            assert torch.equal(run[k], det[0][k]), f"d{k} differs between schedules"
    _, _, ref_grads = ref_scan(x, True)
    for k, g in det[0].items():
        assert_close_scaled(g, ref_grads[k], TOL[dtype], f"d{k}")
    # The test can tell: without the deterministic mode the float atomics' order shows.
    plain = scan_grads_under(emu, x, case, True)
    assert any(not torch.equal(run[k], plain[0][k]) for run in plain[1:] for k in ("A", "B", "C", "D", "delta_bias"))


def test_deterministic_scan_backward_with_orders_and_groups(emu):
    # 5 channels per group: two blocks per group, the second with three idle warps.
    case, dtype = ScanCase(1, 10, 1285, 2, 2, target_blocks=8), torch.float32
    x = make_scan(case, OPTS["z-softplus"], dtype)
    for reverse, slices in ((True, 1), (False, 5)):
        kw = dict(reverse=reverse, slices=slices)
        det = scan_grads_under(emu, x, case, True, deterministic=True, **kw)
        for run in det[1:]:
            assert all(torch.equal(run[k], det[0][k]) for k in run)
        _, _, ref_grads = permuted_scan_ref(x, True, scan_positions(case.L, reverse, slices))
        for k, g in det[0].items():
            assert_close_scaled(g, ref_grads[k], TOL[dtype], f"d{k}")


def test_deterministic_scan_short_sequences(emu):
    for case in (ScanCase(1, 3, 1, 2, 1), ScanCase(2, 4, 37, 3, 4), ScanCase(2, 3, 0, 2, 1)):
        x = make_scan(case, OPTS["all"], torch.float32)
        _, _, grads = run_scan(emu, x, True, bwd=dict(deterministic=True))
        if case.L == 0:
            assert all(not g.any() for g in grads.values())
            continue
        _, _, ref_grads = ref_scan(x, True)
        for k, g in grads.items():
            assert_close_scaled(g, ref_grads[k], TOL[torch.float32], f"d{k}")


@pytest.mark.parametrize("scale", [1e-9, 1e8])
def test_deterministic_scan_backward_far_from_one(emu, scale):
    """Gradients of 1e-9 keep float32 precision in the fixed-point sums (resolution 2^-52);
    gradients of 1e8 stay inside their range."""
    case, dtype = ScanCase(2, 8, 300, 3, 1), torch.float32
    x = make_scan(case, OPTS["all"], dtype)
    x["dout"] = x["dout"] * scale
    _, _, grads = run_scan(emu, x, True, bwd=dict(deterministic=True))
    _, _, ref_grads = ref_scan(x, True)
    for k in ("B", "C"):
        assert_close_scaled(grads[k], ref_grads[k], TOL[dtype], f"d{k}")


def test_deterministic_terms_beyond_the_fixed_point_range_give_nan(emu):
    """|term| above 2^(10 + lo_bits) / (blocks per group) = 2^41 here cannot be summed exactly:
    dB and dC become NaN (which overflow checks such as GradScaler's catch), not wrong numbers."""
    case = ScanCase(1, 4, 40, 2, 1)
    x = make_scan(case, OPTS["none"], torch.float64)
    x["dout"] = x["dout"] * 1e14
    _, _, grads = run_scan(emu, x, False, bwd=dict(deterministic=True))
    assert torch.isnan(grads["B"]).all() and torch.isnan(grads["C"]).all()
    assert torch.isfinite(grads["u"]).all() and torch.isfinite(grads["A"]).all()


def test_deterministic_conv_backward_is_bitwise_stable(emu):
    c = make_conv(2, 3, 2 * _chunk(torch.float32) + 37, 4, torch.float32)
    runs, plain = [], []
    for threads, blocks, seed in SCHEDULES:
        with schedule(emu, 2112, threads, seed, blocks):
            runs.append(run_conv(emu, c, True, bwd=dict(deterministic=True))[1])
            plain.append(run_conv(emu, c, True)[1])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    assert any(not torch.equal(a, b) for run in plain[1:] for a, b in zip(run[1:], plain[0][1:]))
    _, ref_grads = ref_conv(c, True)
    for name, g, r in zip(("x", "weight", "bias"), runs[0], ref_grads):
        assert_close_scaled(g, r, TOL[torch.float32], f"d{name}")
