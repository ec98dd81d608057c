"""Triton-backend specifics: chunk boundaries of the scan and conv tiles, config choice,
float64 and extreme decays, scan orders, the deterministic backward, the launch device,
grid limits and 64-bit offsets. The backend-parametrised correctness tests are in
test_kernels.py; the compiled (GPU-target) check of every kernel in test_triton_compile.py.

Under TRITON_INTERPRET=1 (tests/conftest.py, no GPU) the kernels run on CPU tensors in
Python, so every shape here is tiny; the chunk lengths come from the configs in use, so
the boundaries tested are the ones the kernels actually cross.
"""

from __future__ import annotations

import contextlib
import inspect
from fractions import Fraction

import pytest
import torch

import segmamba_kernels as sk
from segmamba_kernels import from_order, to_order

if not sk.backend_status()["triton"][0]:
    pytest.skip(f"triton backend unavailable: {sk.backend_status()['triton'][1]}", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from segmamba_kernels.triton import _common, conv, scan  # noqa: E402
from segmamba_kernels.triton._common import INTERPRET  # noqa: E402
from segmamba_kernels.triton._exact import (accumulator_value, exact_add, exact_check,  # noqa: E402
                                            new_accumulator, new_overflow_flag)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def _smallest_block_l(configs) -> int:
    return min(c.kwargs["BLOCK_L"] for c in configs)


def _scan_inputs(batch, dim, L, N, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    bc = (batch, groups, N, L)
    return dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L) - 1.0,
                # Slow decays (|A dt| small) so the state carried across chunks matters.
                A=-0.05 - 0.5 * torch.rand(dim, N, generator=g, dtype=F64),
                B=r(*bc), C=r(*bc), D=r(dim), z=r(batch, dim, L), delta_bias=0.3 * r(dim))


def _scan_and_grads(x: dict, backend: str, dout: torch.Tensor):
    leaves = {k: v.detach().to(DEVICE).requires_grad_() for k, v in x.items()}
    fn = sk.selective_scan_ref if backend == "reference" else sk.selective_scan
    kw = {} if backend == "reference" else {"backend": backend}
    out, last = fn(**leaves, delta_softplus=True, return_last_state=True, **kw)
    out.backward(dout.to(DEVICE))
    return [out, last] + [leaves[k].grad for k in x]


def _assert_scan_matches_reference(x: dict, tol: float) -> None:
    shape = x["u"].shape
    dout = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = _scan_and_grads(x, "triton", dout)
    want = _scan_and_grads(x, "reference", dout)
    for name, g, w in zip(["out", "last_state"] + [f"d{k}" for k in x], got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- scan chunks

BL = _smallest_block_l(scan.FWD_CONFIGS)


@pytest.mark.parametrize("L", [BL - 1, BL, BL + 1, 2 * BL + 3], ids=lambda L: f"L{L}")
def test_scan_across_chunk_boundaries_fp64(L):
    _assert_scan_matches_reference(_scan_inputs(1, 2, L, 2, 1), 1e-10)


def test_scan_groups_with_multi_channel_blocks():
    # dim 4 in 2 groups: 2 channels per group, so a 2-channel block is one group, and the
    # two blocks must read (and accumulate dB/dC into) different groups.
    _assert_scan_matches_reference(_scan_inputs(1, 4, BL + 1, 2, 2), 1e-10)


def test_scan_odd_channels_per_group_and_one_state():
    # dim / groups = 3 forces single-channel blocks; N = 1 is a one-wide state tile.
    _assert_scan_matches_reference(_scan_inputs(2, 3, BL + 5, 1, 1), 1e-10)


def test_scan_extreme_decays_fp64():
    """exp(A dt) underflowing to exactly 0 and softplus inputs above its linear threshold:
    the backward carries h_{t-1} through its scan (no division by a vanishing decay, and
    no h_t - v_t cancellation), so even these match float64 to 1e-10."""
    x = _scan_inputs(1, 2, BL + 3, 3, 1, seed=4)
    g = torch.Generator().manual_seed(5)
    x["A"] = -torch.tensor([[0.01, 5.0, 800.0], [1.0, 50.0, 3000.0]], dtype=F64)
    x["delta"] = 30.0 * torch.randn(x["delta"].shape, generator=g, dtype=F64)
    got = _scan_and_grads(x, "triton", torch.ones_like(x["u"]))
    assert all(torch.isfinite(t).all() for t in got)
    dt = torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])  # (1, dim, L)
    assert (torch.exp(dt[:, :, None, :] * x["A"][None, :, :, None]) == 0).any(), "no decay underflows to 0"
    assert (x["delta"] + x["delta_bias"][:, None] > 20).any(), "softplus's linear branch is not reached"
    _assert_scan_matches_reference(x, 1e-10)


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("configs", [scan.FWD_CONFIGS, scan.BWD_CONFIGS], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dpg,L", [(1, 1), (3, 50), (2, 7), (96, 64 ** 3), (48, 100)])
def test_scan_configs_keep_blocks_inside_one_group(configs, dpg, L):
    picked = scan.pick_configs(configs, dpg, L)
    assert picked, "at least one config must survive pruning"
    assert all(dpg % c.kwargs["BLOCK_D"] == 0 for c in picked)
    # No chunk longer than needed, unless it is the smallest there is.
    limit = max(1 << (L - 1).bit_length(), _smallest_block_l(configs))
    assert all(c.kwargs["BLOCK_L"] <= limit for c in picked)
    if INTERPRET:
        assert len(picked) == 1, "the interpreter must not autotune"
        # The widest block that fits is taken first (2 channels when the group allows it).
        assert picked[0].kwargs["BLOCK_D"] == (2 if dpg % 2 == 0 else 1)


def test_bwd_state_buffer_fits_every_config():
    # The state buffer is sized by the smallest chunk; every config must use chunks at least that long.
    assert all(c.kwargs["BLOCK_L"] >= scan.MIN_BWD_BLOCK_L for c in scan.BWD_CONFIGS)


# --------------------------------------------------------------------------- conv tiles

CONV_BL = _smallest_block_l(conv.CONFIGS)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("L", [CONV_BL + 1, 2 * CONV_BL + 3], ids=lambda L: f"L{L}")
def test_conv_across_tile_boundaries_fp64(width, L):
    # dim 3 with 2-channel blocks leaves a half-empty channel block.
    g = torch.Generator().manual_seed(width)
    x, w, b = (torch.randn(*s, generator=g, dtype=F64) for s in ((1, 3, L), (3, width), (3,)))
    dout = torch.randn(1, 3, L, generator=g, dtype=F64)
    res = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (x, w, b)]
        fn = sk.causal_conv1d_ref if backend == "reference" else sk.causal_conv1d
        out = fn(*leaves, activation="silu", **({} if backend == "reference" else {"backend": backend}))
        out.backward(dout.to(DEVICE))
        res[backend] = [out] + [t.grad for t in leaves]
    for name, got, want in zip(("out", "dx", "dweight", "dbias"), res["triton"], res["reference"]):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-11, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- scan orders

# (reverse, slices) as the backend contract passes them, and the reference's composition.
ORDERS = {"forward": (False, 1), "reverse": (True, 1), "inter_slice": (False, 4), "reverse_inter_slice": (True, 6)}


def _to_scan(t: torch.Tensor, reverse: bool, slices: int) -> torch.Tensor:
    t = to_order(t, "inter_slice", slices) if slices > 1 else t
    return to_order(t, "reverse", 1) if reverse else t


def _from_scan(t: torch.Tensor, reverse: bool, slices: int) -> torch.Tensor:
    t = from_order(t, "reverse", 1) if reverse else t
    return from_order(t, "inter_slice", slices) if slices > 1 else t


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max |got - want| <= tol * max(max |want|, 1e-3), want in float64 (low precision needs a
    scale-relative bound)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


ORDER_DTYPES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
SCAN_NAMES = ["du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"]


@pytest.mark.parametrize("dtype", list(ORDER_DTYPES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("order", list(ORDERS))
def test_scan_orders_match_reference(order, dtype):
    """Forward and backward in every scan order, against from_order(scan(to_order(x))) of the
    float64 reference fed the same (rounded) inputs. L = 2 * BL + 4 = 36 spans three chunks
    (a partial one), divisible by both slice counts; dim 4 in 2 groups (2-channel blocks)."""
    reverse, slices = ORDERS[order]
    x = _scan_inputs(1, 4, 2 * BL + 4, 2, 2, seed=7)
    io = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v.to(dtype).double()) for k, v in x.items()}
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    args = [io[k].to(dtype if k in ("u", "delta", "B", "C", "z") else compute).to(DEVICE)
            for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype)

    leaves = {k: v.double().requires_grad_() for k, v in io.items()}
    S = lambda t: _to_scan(t, reverse, slices)  # noqa: E731
    out_ref, last_ref = sk.selective_scan_ref(S(leaves["u"]), S(leaves["delta"]), leaves["A"], S(leaves["B"]),
                                              S(leaves["C"]), leaves["D"], S(leaves["z"]), leaves["delta_bias"],
                                              True, True)
    out_ref = _from_scan(out_ref, reverse, slices)
    grads_ref = torch.autograd.grad(out_ref, [leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                  "delta_bias")], dout.double())

    tol = ORDER_DTYPES[dtype]
    out, last = scan.selective_scan_fwd(*args, True, reverse=reverse, slices=slices)
    _close(out, out_ref, tol, "out")
    _close(last, last_ref, tol, "last_state")
    # Both accumulation modes in every order: float atomics in float64, fixed point otherwise.
    deterministic = dtype != torch.float64
    grads = scan.selective_scan_bwd(*args, True, dout.to(DEVICE), reverse=reverse, slices=slices,
                                    deterministic=deterministic)
    for name, g, want in zip(SCAN_NAMES, grads, grads_ref):
        _close(g, want, tol, f"{name} (deterministic={deterministic})")


@pytest.mark.parametrize("dtype", list(ORDER_DTYPES), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("order", list(ORDERS))
def test_conv_orders_match_reference(order, dtype):
    """Width 4 (taps cross tile boundaries in either direction), SiLU, L = 2 * CONV_BL + 4 = 36
    over three tiles, dim 3 (a half-empty channel block)."""
    reverse, slices = ORDERS[order]
    g = torch.Generator().manual_seed(11)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    L = 2 * CONV_BL + 4
    x = torch.randn(1, 3, L, generator=g, dtype=F64).to(dtype)
    w, b = (torch.randn(*s, generator=g, dtype=F64).to(compute) for s in ((3, 4), (3,)))
    dout = torch.randn(1, 3, L, generator=g, dtype=F64).to(dtype)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = _from_scan(sk.causal_conv1d_ref(_to_scan(leaves[0], reverse, slices), leaves[1], leaves[2], "silu"),
                     reverse, slices)
    grads_ref = torch.autograd.grad(ref, leaves, dout.double())
    tol = ORDER_DTYPES[dtype]
    dev = [t.to(DEVICE) for t in (x, w, b)]
    _close(conv.causal_conv1d_fwd(*dev, True, reverse=reverse, slices=slices), ref, tol, "out")
    got = conv.causal_conv1d_bwd(*dev, True, dout.to(DEVICE), reverse=reverse, slices=slices)
    for name, gt, want in zip(("dx", "dweight", "dbias"), got, grads_ref):
        _close(gt, want, tol, name)


def test_order_arguments_are_checked():
    x = _scan_inputs(1, 2, 10, 2, 1)
    with pytest.raises(ValueError, match="slices: expected a positive divisor of L = 10, got 4"):
        scan.selective_scan_fwd(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True,
                                slices=4)
    with pytest.raises(ValueError, match="slices: expected a positive divisor of L = 10, got 0"):
        conv.causal_conv1d_fwd(x["u"], torch.ones(2, 4, dtype=F64), torch.zeros(2, dtype=F64), False, slices=0)


# --------------------------------------------------------------------------- deterministic backward

@contextlib.contextmanager
def _programs_in_order(seed: int | None):
    """Run every interpreted launch's programs in a random order (seed None: the natural one).

    The interpreter runs one program after another in grid order; here the k-th program it
    starts is given the grid index perm[k] instead, so each program still runs exactly once,
    as a GPU might schedule them. Yields the list of grid indices run, for inspection."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    state: dict = {"ran": []}

    def permuted_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        n = nx * ny * nz
        state["perm"] = (list(range(n)) if seed is None
                         else torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())
        state["k"] = 0

    def permuted_idx(x, y, z):
        _, ny, nz = builder.grid_dim
        p = state["perm"][state["k"]]
        state["k"] += 1
        idx = (p // (ny * nz), (p // nz) % ny, p % nz)
        state["ran"].append(idx)
        set_idx(*idx)

    builder.set_grid_dim, builder.set_grid_idx = permuted_dim, permuted_idx
    try:
        yield state["ran"]
    finally:
        del builder.set_grid_dim, builder.set_grid_idx  # back to the class's methods


def _det_scan_inputs():
    # float32 so that the addition order shows in the last bits; dim 8 with 2-channel blocks:
    # 4 programs add into every dB/dC element.
    x = _scan_inputs(1, 8, BL + 5, 3, 1, seed=21)
    args = [x[k].float() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(22)).float()
    return args, dout


@pytest.mark.skipif(not INTERPRET, reason="permutes the interpreter's program order")
def test_scan_backward_deterministic_under_permuted_schedules():
    """deterministic=True: every gradient bitwise identical whatever order the programs run in;
    the float-atomic default differs under the same permutations (so they do permute the
    additions), and the deterministic dB/dC match the float64 reference."""
    args, dout = _det_scan_inputs()
    runs = {}
    for deterministic, seeds in ((True, (None, 1)), (False, (None, 1))):
        for seed in seeds:
            with _programs_in_order(seed) as ran:
                runs[deterministic, seed] = scan.selective_scan_bwd(*args, True, dout, deterministic=deterministic)
            assert sorted(ran) == sorted(set(ran)) and len(ran) == 4, "each program must run once"
            if seed is not None:
                assert ran != sorted(ran), "the programs must not run in grid order"
    for name, a, b in zip(SCAN_NAMES, runs[True, None], runs[True, 1]):
        assert torch.equal(a, b), f"deterministic {name} changed with the program order"
    differs = [not torch.equal(a, b) for a, b in zip(runs[False, None][3:5], runs[False, 1][3:5])]
    assert any(differs), "float atomics gave identical dB/dC under the permutation: the test is not sensitive"

    leaves = [t.double().requires_grad_() for t in args]
    out = sk.selective_scan_ref(*leaves[:7], leaves[7], True)
    want = torch.autograd.grad(out, leaves, dout.double())
    for name, g, w in zip(SCAN_NAMES, runs[True, None], want):
        _close(g, w, 2e-5, name)


@pytest.mark.skipif(not INTERPRET, reason="permutes the interpreter's program order")
def test_conv_backward_deterministic_under_permuted_schedules():
    # 2 batches x 4 step tiles = 8 programs contribute to each dweight / dbias element.
    g = torch.Generator().manual_seed(31)
    x, dout = (torch.randn(2, 3, 4 * CONV_BL, generator=g) for _ in range(2))
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    runs = []
    for seed in (None, 1):
        with _programs_in_order(seed):
            runs.append(conv.causal_conv1d_bwd(x, w, b, True, dout))
    for name, a, c in zip(("dx", "dweight", "dbias"), runs[0], runs[1]):
        assert torch.equal(a, c), f"{name} changed with the program order"


@triton.jit
def _add_rows(x_ptr, acc_ptr, plane, overflow_ptr, count, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK).to(tl.int64)
    x = tl.load(x_ptr + tl.program_id(0) * BLOCK + offs)
    exact_check(overflow_ptr, exact_add(acc_ptr, plane, offs, x, tl.zeros_like(x)), count)


def _exact_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(accumulator, overflow flag, float64 value) of the column sums of x (rows x 16) added
    row by row, one program per row."""
    acc, flag = new_accumulator(16, 0, x.device), new_overflow_flag(x.device)
    _add_rows[(x.shape[0],)](x.contiguous(), acc, 16, flag, x.shape[0], BLOCK=16)
    return acc, flag, accumulator_value(acc, 0, (16,), flag, F64)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the NaN case, on purpose
def test_exact_accumulation_range_and_overflow():
    """The fixed-point sum is exact to its resolution (2^-68 per contribution) over 2^-50..2^36,
    in any order; a contribution outside the range turns the result into NaN, not a wrapped sum."""
    g = torch.Generator().manual_seed(41)
    scale = 2.0 ** torch.linspace(-50, 36, 16, dtype=F64)
    x = (torch.randn(5, 16, generator=g, dtype=F64) * scale).float()
    want = torch.tensor([float(sum(map(Fraction, x[:, j].double().tolist()))) for j in range(16)], dtype=F64)
    sums = []
    for rows in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        acc, flag, got = _exact_sum(x[rows])
        assert flag.item() == 0
        assert ((got - want).abs() <= 5 * 2.0**-68 + 2**-52 * want.abs()).all(), (got - want).abs().max()
        sums.append(acc)
    assert torch.equal(sums[0], sums[1]), "the integer sums depend on the order"
    for bad in (2.0**43 / 5, float("nan"), float("-inf")):
        y = x.clone()
        y[2, 7] = bad
        _, flag, got = _exact_sum(y)
        assert flag.item() == 1 and got.isnan().all(), f"{bad} was not reported"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU schedule")
def test_scan_backward_deterministic_on_gpu():
    args, dout = _det_scan_inputs()
    args, dout = [t.cuda() for t in args], dout.cuda()
    first = scan.selective_scan_bwd(*args, True, dout, deterministic=True)
    for _ in range(5):
        again = scan.selective_scan_bwd(*args, True, dout, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# --------------------------------------------------------------------------- launches, grids, offsets

def test_launches_run_under_the_inputs_device(monkeypatch):
    """Every launch of the four backend functions happens inside device_guard(input.device)
    (triton launches on the *current* device: a model on cuda:1 in a process whose current
    device is 0 would otherwise launch on GPU 0 with GPU 1 pointers). The guard is replaced by
    a recorder, each kernel's run by a probe of the guard stack at launch time."""
    active: list[torch.device] = []
    guarded_launches: list[tuple[str, list]] = []

    @contextlib.contextmanager
    def recording_guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(_common, "device_guard", recording_guard)
    for name, kernel in [("scan_fwd", scan._scan_fwd_kernel), ("scan_bwd", scan._scan_bwd_kernel),
                         ("conv_fwd", conv._conv_fwd_kernel), ("conv_bwd", conv._conv_bwd_kernel)]:
        def probe(*args, _run=kernel.run, _name=name, **kwargs):
            guarded_launches.append((_name, list(active)))
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", probe)

    x = _scan_inputs(1, 2, 5, 2, 1)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    scan.selective_scan_fwd(*args, True)
    scan.selective_scan_bwd(*args, True, torch.ones_like(x["u"]))
    w, b = torch.ones(2, 3, dtype=F64), torch.zeros(2, dtype=F64)
    conv.causal_conv1d_fwd(x["u"], w, b, True)
    conv.causal_conv1d_bwd(x["u"], w, b, True, torch.ones_like(x["u"]))
    assert [n for n, _ in guarded_launches] == ["scan_fwd", "scan_bwd", "conv_fwd", "conv_bwd"]
    for name, stack in guarded_launches:
        assert stack == [x["u"].device], f"{name} launched under guards {stack}, expected [{x['u'].device}]"


def test_device_guard_selects_the_tensor_device():
    # Constructing (not entering) the guard needs no GPU: it must target the given index.
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_scan_and_conv_on_second_gpu_while_first_is_current():
    x = _scan_inputs(1, 4, 300, 4, 1)
    torch.cuda.set_device(0)
    args1 = [x[k].float().to("cuda:1") for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out, _ = scan.selective_scan_fwd(*args1, True)
    ref, _ = scan.selective_scan_fwd(*[a.to("cuda:0") for a in args1], True)
    assert out.device == torch.device("cuda:1") and torch.equal(out.cpu(), ref.cpu())
    w, b = torch.randn(4, 4, device="cuda:1"), torch.randn(4, device="cuda:1")
    torch.testing.assert_close(conv.causal_conv1d_fwd(args1[0], w, b, True).cpu(),
                               conv.causal_conv1d_fwd(args1[0].cuda(0), w.cuda(0), b.cuda(0), True).cpu())


@pytest.mark.parametrize("L", [64**3, 256**3, 1024**3], ids=["64^3", "256^3", "1024^3"])
def test_grids_stay_within_cuda_limits(L):
    """A 256^3 volume has 16.7M tokens: cdiv(L, BLOCK_L) step blocks must not sit on a 65535-limited
    axis. Checked for every config, GPU ones included (the module's configs may be the
    interpreter's here, so the GPU block sizes are listed as well)."""
    for block_d, block_l in {(1, 256), (1, 1024), (2, 512), (4, 256)} | {
            (c.kwargs["BLOCK_D"], c.kwargs["BLOCK_L"]) for c in conv.CONFIGS}:
        g = conv.grid(2, 768, L, block_d, block_l)
        assert all(0 < n <= lim for n, lim in zip(g, _common.GRID_LIMITS)), f"conv grid {g} at L={L}"
        tiles = (2, -(-768 // block_d), -(-L // block_l))
        assert sorted(g) == sorted(tiles), f"conv grid {g}: not one program per tile {tiles}"
    for block_d in (1, 2):
        g = scan.grid(2, 96 * 1024, block_d)  # 98304 channels: more blocks than a 65535-limited axis takes
        assert all(0 < n <= lim for n, lim in zip(g, _common.GRID_LIMITS)), f"scan grid {g}"


@triton.jit
def _offset_probe(out_ptr, base, n, L, slices, s, SLICED: tl.constexpr):
    tl.store(out_ptr + 0, scan.bc_row(base, n, L))
    tl.store(out_ptr + 1, _common.as_i64(n) * L)
    tl.store(out_ptr + 2, _common.slice_position(s, L, slices, SLICED).to(tl.int64))


@pytest.mark.parametrize("n,L", [(15, 2**28), (1, 2**31 - 1), (15, 1_000_000_007)])
def test_offsets_are_64_bit(n, L):
    """The B/C row offset n * L of the scan (row n of a group's block) passes 2^31 once
    (N - 1) * L does (L = 143M tokens at N = 16). The kernels' own offset helpers, run here
    with the int32 scalars a launch passes, must give the exact values (an int32 product
    wraps, under the interpreter as on a GPU)."""
    out = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    base, s = 3 * 2**31 + 5, L - 2
    S = 1 if L % 7 else 7
    _offset_probe[(1,)](out, base, n, L, S, s, SLICED=S > 1)
    assert out[0].item() == base + n * L and out[1].item() == n * L
    assert out[2].item() == (s % S) * (L // S) + s // S


# --------------------------------------------------------------------------- autotuning keys

@pytest.mark.parametrize("kernel", [scan._scan_fwd_kernel, scan._scan_bwd_kernel, conv._conv_fwd_kernel,
                                    conv._conv_bwd_kernel], ids=lambda k: k.fn.fn.__name__)
def test_autotune_keys_cover_every_untuned_constexpr(kernel):
    """A config tuned for one specialisation (e.g. without softplus, or width 2) must not be reused
    for another: every constexpr that is not a tuned tile size is part of the tuning key, and so
    is the slice count (inter-slice gathers have their own best tile)."""
    tuned = {k for c in kernel.configs for k in c.kwargs}
    params = inspect.signature(kernel.fn.fn).parameters.values()  # the Python function, compiled or interpreted
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert {"BLOCK_D", "BLOCK_L"} <= constexprs
    missing = constexprs - tuned - set(kernel.keys)
    assert not missing, f"{kernel.fn.fn.__name__}: constexprs {sorted(missing)} are not in the autotune key"
    assert "slices" in kernel.keys and "L" in kernel.keys


def test_grid_beyond_cuda_limits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"axis 2 has 70000 programs, CUDA allows at most 65535"):
        conv.grid(70000, 96, 4096, 1, 1024)
