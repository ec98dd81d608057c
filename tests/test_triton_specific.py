"""Triton-backend specifics: chunk boundaries of the scan and conv tiles, config choice,
float64 and extreme decays. The backend-parametrised correctness tests are in test_kernels.py.

Under TRITON_INTERPRET=1 (tests/conftest.py, no GPU) the kernels run on CPU tensors in
Python, so every shape here is tiny; the chunk lengths come from the configs in use, so
the boundaries tested are the ones the kernels actually cross.
"""

from __future__ import annotations

import pytest
import torch

import segmamba_kernels as sk

if not sk.backend_status()["triton"][0]:
    pytest.skip(f"triton backend unavailable: {sk.backend_status()['triton'][1]}", allow_module_level=True)

from segmamba_kernels.triton import conv, scan  # noqa: E402
from segmamba_kernels.triton._common import INTERPRET  # noqa: E402

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
