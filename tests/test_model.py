"""SegMamba model (segmamba.models): token orders, tri-orientated Mamba against a slow
per-direction implementation, the recomputing op, backends, autocast, compile, registry."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import segmamba_kernels as sk
from segmamba.models import (MODEL_NAMES, MambaLayer, SegMamba, TriOrientedMamba, build_model, min_multiple,
                             model_config, roi_size_error)
import segmamba.models.mamba as mamba_module
from segmamba_kernels import ORDERS, from_order, to_order
from segmamba.models.ssm_path import direction_path, ssm_direction

CPU_BUILT, CPU_WHY = sk.backend_status()["cpu"]
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason=f"cpu backend not available: {CPU_WHY}")
TINY = dict(feat_size=(8, 16, 32, 64), hidden_size=64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- token orders

def explicit_order(order: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Flat token index visited at each scan step, spelled out over (depth, height, width)."""
    depth, height, width = shape
    flat = lambda d, h, w: (d * height + h) * width + w  # noqa: E731
    if order == "forward":
        idx = [flat(d, h, w) for d in range(depth) for h in range(height) for w in range(width)]
    elif order == "reverse":
        idx = [flat(d, h, w) for d in reversed(range(depth)) for h in reversed(range(height))
               for w in reversed(range(width))]
    else:  # inter-slice: for each in-slice position, walk through all slices
        idx = [flat(d, h, w) for h in range(height) for w in range(width) for d in range(depth)]
    return torch.tensor(idx)


@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 4, 3), (4, 1, 1), (1, 1, 1), (2, 3, 3)])
@pytest.mark.parametrize("order", ORDERS)
def test_orders_match_explicit_index_and_invert(order, shape):
    L = math.prod(shape)
    t = torch.randn(2, 3, L)
    idx = explicit_order(order, shape)
    ordered = to_order(t, order, n_slices=shape[0])
    assert torch.equal(ordered, t[..., idx])
    assert torch.equal(from_order(ordered, order, n_slices=shape[0]), t)
    if order == "inter_slice" and shape[0] > 1 and L > shape[0]:
        assert not torch.equal(ordered, t)  # the permutation is not silently the identity


def test_orders_reject_bad_arguments():
    t = torch.randn(1, 2, 12)
    with pytest.raises(ValueError, match="order: expected one of"):
        to_order(t, "sideways", 3)
    with pytest.raises(ValueError, match="n_slices: expected a positive divisor of the sequence length L = 12, got 5"):
        from_order(t, "inter_slice", 5)


# --------------------------------------------------------------------------- ToM vs a slow implementation

def slow_direction(xz: torch.Tensor, direction, order: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """One ToM direction from the reference ops, gathering and scattering tokens by explicit index."""
    idx = explicit_order(order, shape)
    d_inner, n_state = direction.A_log.shape
    rank = direction.dt_proj.in_features
    x, z = xz[:, :d_inner, idx], xz[:, d_inner:, idx]
    xc = sk.causal_conv1d_ref(x, direction.conv1d.weight[:, 0, :], direction.conv1d.bias, activation="silu")
    proj = torch.einsum("kd,bdl->bkl", direction.x_proj.weight, xc)
    dt = torch.einsum("dr,brl->bdl", direction.dt_proj.weight, proj[:, :rank])
    y = sk.selective_scan_ref(xc, dt, -torch.exp(direction.A_log), proj[:, rank:rank + n_state],
                              proj[:, rank + n_state:], direction.D, z, delta_bias=direction.dt_proj.bias,
                              delta_softplus=True)
    out = torch.empty_like(y)
    out[:, :, idx] = y
    return out


@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 4, 3), (4, 1, 1), (1, 1, 1)])
def test_tom_directions_and_sum_match_slow_implementation(shape):
    torch.manual_seed(0)
    tom = TriOrientedMamba(8, d_state=4, backend="reference").double()
    tokens = torch.randn(2, math.prod(shape), 8, dtype=torch.float64)
    xz = torch.einsum("ec,blc->bel", tom.in_proj.weight, tokens)
    expected = 0
    for direction, order in zip(tom.directions, ORDERS):
        slow = slow_direction(xz, direction, order, shape)
        got = direction(xz, order, shape[0], "reference")
        torch.testing.assert_close(got, slow, rtol=1e-10, atol=1e-12)
        expected = expected + slow
    expected = torch.einsum("cd,bdl->blc", tom.out_proj.weight, expected)
    torch.testing.assert_close(tom(tokens, n_slices=shape[0]), expected, rtol=1e-10, atol=1e-12)


def test_directions_differ_so_each_one_is_tested():
    # Identical weights make the forward and reverse directions differ only by order.
    torch.manual_seed(0)
    tom = TriOrientedMamba(8, d_state=4, backend="reference").double()
    tom.directions[1].load_state_dict(tom.directions[0].state_dict())
    tom.directions[2].load_state_dict(tom.directions[0].state_dict())
    xz = torch.randn(1, 32, 24, dtype=torch.float64)
    outs = [d(xz, o, 2, "reference") for d, o in zip(tom.directions, ORDERS)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - outs[2]).abs().max() > 1e-3


# --------------------------------------------------------------------------- the recomputing op

def direction_args(d_inner=6, rank=2, n_state=3, batch=2, L=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_()  # noqa: E731
    return [r(batch, 2 * d_inner, L), r(d_inner, 4, scale=0.5), r(d_inner), r(rank + 2 * n_state, d_inner, scale=0.5),
            r(d_inner, rank, scale=0.5), r(d_inner, scale=0.5),
            torch.log(torch.arange(1, n_state + 1, dtype=dtype)).repeat(d_inner, 1).requires_grad_(), r(d_inner)]


@pytest.mark.parametrize("order", ORDERS)
def test_recomputing_op_gradients_equal_plain_composition(order):
    args = direction_args()
    dy = torch.randn(2, 6, 12, dtype=torch.float64)
    plain = direction_path(*args, order, 3, "reference")
    recomputed = ssm_direction(*args, order, 3, "reference")
    torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)
    g_plain = torch.autograd.grad(plain, args, dy)
    g_rec = torch.autograd.grad(recomputed, args, dy)
    for name, a, b in zip(["xz", "conv_w", "conv_b", "x_proj", "dt_proj_w", "dt_proj_b", "A_log", "D"], g_rec, g_plain):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_recomputing_op_computes_only_requested_gradients():
    args = direction_args()
    for a in args[1:]:
        a.requires_grad_(False)
    out = ssm_direction(*args, "reverse", 1, "reference")
    (gx,) = torch.autograd.grad(out.sum(), args[0])
    (gx_plain,) = torch.autograd.grad(direction_path(*args, "reverse", 1, "reference").sum(), args[0])
    torch.testing.assert_close(gx, gx_plain, rtol=1e-12, atol=1e-12)


def test_recompute_under_autocast_matches_plain_autograd(monkeypatch):
    """Issue 17: the recomputing op redoes its forward in the backward under the autocast state the
    forward ran in, so a MambaLayer's gradients under bf16 autocast are those of plain autograd
    through direction_path (nothing recomputed) under the same autocast. (Recomputed outside
    autocast, the conv and the projections ran in float32 instead: relative errors 1e-3 to 1e-2.)"""
    torch.manual_seed(0)
    layer = MambaLayer(16, backend="reference")
    plain_layer = copy.deepcopy(layer)
    x = torch.randn(1, 16, 4, 4, 4)

    def grads(model: torch.nn.Module) -> dict:
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi)
        out.float().square().sum().backward()
        return {"x": xi.grad, **{n: p.grad for n, p in model.named_parameters()}}

    recomputed = grads(layer)
    monkeypatch.setattr(mamba_module, "ssm_direction", direction_path)
    plain = grads(plain_layer)
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        assert rel_err(recomputed[name], g) < 1e-5, (name, rel_err(recomputed[name], g))


@needs_cpu
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("order", ORDERS)
def test_direction_path_makes_no_layout_copy(order, batch, record_ops):
    """The conv and the scan walk the order themselves, the projections write their outputs in
    their layout, and the cpu backend reads the x and z halves of xz (and B, C) where they are,
    whatever their batch stride: a direction's forward and backward run no flip, permute copy,
    clone or contiguous copy (autograd still assembles the gradients of the halves)."""
    args = direction_args(batch=batch, L=24)
    with record_ops() as ops:
        y = direction_path(*args, order, 3, "cpu")
        torch.autograd.grad(y, args, torch.randn_like(y))
    copies = [op for op in ops.seen if any(k in op for k in ("flip", "clone", "copy", "contiguous", "permute"))]
    assert "segmamba.selective_scan_bwd.default" in ops.seen and not copies, copies


def saved_activation_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of module(x), not counting parameters."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def test_mamba_layer_keeps_only_a_few_token_tensors_for_backward():
    torch.manual_seed(0)
    C, shape = 8, (4, 4, 4)
    layer = MambaLayer(C, d_state=16, backend="reference")
    x = torch.randn(1, C, *shape, requires_grad=True)
    per_token_channel = x.numel() * 4  # bytes of one (L, C) float32 tensor
    kept = saved_activation_bytes(layer, x)
    # x, LayerNorm output, xz (4C, shared by the three directions) and the direction sum (2C),
    # plus per-token LayerNorm statistics. Storing the intermediates of each direction would
    # add about 3 x 6 x 2C.
    assert kept <= 8 * per_token_channel + 2 * 4 * math.prod(shape), kept / per_token_channel


# --------------------------------------------------------------------------- the whole model

def test_default_parameter_count_is_the_papers():
    model = SegMamba()
    assert sum(p.numel() for p in model.parameters()) == 67_416_196
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) and m.affine for m in model.modules())


def test_initialisation_of_every_direction():
    model = SegMamba(**TINY)
    tom = model.encoder.stages[1][0].mixer  # C = 16: d_inner 32, dt_rank 1
    for direction in tom.directions:
        dt = F.softplus(direction.dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
        assert dt.max() / dt.min() > 5  # spread over the range, not one value
        bound = direction.dt_proj.in_features ** -0.5
        assert direction.dt_proj.weight.abs().max() <= bound and direction.dt_proj.in_features == 1
        torch.testing.assert_close(direction.A_log.detach().exp(), torch.arange(1.0, 17.0).repeat(32, 1))
        assert torch.equal(direction.D.detach(), torch.ones(32))
    assert tom.in_proj.bias is None and tom.out_proj.bias is None


@pytest.mark.parametrize("shape", [(16, 32, 16), (32, 16, 48), (16, 16, 32)])
def test_output_shapes_reference_backend(shape):
    torch.manual_seed(0)
    model = SegMamba(**TINY, depths=(1, 1, 1, 1), backend="reference").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, *shape)).shape == (1, 4, *shape)


@needs_cpu
def test_output_shapes_large_non_cubic_crop_and_training_step():
    torch.manual_seed(0)
    model = SegMamba(**TINY, out_chans=3, backend="cpu")
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 4, 80, 96, 64)).shape == (1, 3, 80, 96, 64)
    out = model.train()(torch.randn(2, 4, 32, 16, 48))  # depth 1 at the deepest stage, batch 2
    assert out.shape == (2, 3, 32, 16, 48)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_rejects_bad_input_and_arguments():
    model = SegMamba(**TINY, backend="reference")
    with pytest.raises(ValueError, match=r"x: expected spatial sides that are multiples of 16, got \(16, 24, 16\)"):
        model(torch.randn(1, 4, 16, 24, 16))
    with pytest.raises(ValueError, match=r"x: expected at least one side of 32 or more .*got \(16, 16, 16\)"):
        model(torch.randn(1, 4, 16, 16, 16))
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 4, D, H, W\), got \(1, 3, 16, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="backend: expected one of"):
        SegMamba(**TINY, backend="gpu")
    with pytest.raises(ValueError, match="depths: expected 4"):
        SegMamba(**TINY, depths=(2, 2, 2))


def tiny_pair(backend_a: str, backend_b: str):
    torch.manual_seed(0)
    a = SegMamba(feat_size=(4, 8, 8, 16), hidden_size=16, depths=(1, 1, 1, 1), backend=backend_a).eval()
    b = SegMamba(feat_size=(4, 8, 8, 16), hidden_size=16, depths=(1, 1, 1, 1), backend=backend_b).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@needs_cpu
def test_reference_and_cpu_backends_agree_on_outputs_and_gradients():
    # float64 end to end, so the comparison tests the kernels, not float32 summation order.
    ref, cpu = (m.double() for m in tiny_pair("reference", "cpu"))
    x = torch.randn(1, 4, 16, 16, 32, dtype=torch.float64)
    out_ref, out_cpu = ref(x), cpu(x)
    assert rel_err(out_cpu, out_ref) < 1e-10
    dy = torch.randn_like(out_ref)
    g_ref = torch.autograd.grad(out_ref, list(ref.parameters()), dy)
    g_cpu = torch.autograd.grad(out_cpu, list(cpu.parameters()), dy)
    names = [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_cpu, g_ref):
        if "mixer" in name:
            assert rel_err(a, b) < 1e-9, (name, rel_err(a, b))
    assert rel_err(torch.cat([g.flatten() for g in g_cpu]), torch.cat([g.flatten() for g in g_ref])) < 1e-9


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if CPU_BUILT else []))
def test_autocast_bf16_runs_and_stays_close_to_fp32(backend):
    torch.manual_seed(0)
    model = SegMamba(**TINY, depths=(1, 1, 1, 1), backend=backend).eval()
    x = torch.randn(1, 4, 16, 16, 32)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 5e-2
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_torch_compile_fullgraph_tom_forward_and_backward_reference():
    torch._dynamo.reset()
    torch.manual_seed(0)
    tom = TriOrientedMamba(8, d_state=4, backend="reference")
    tokens = torch.randn(1, 12, 8, requires_grad=True)
    eager = tom(tokens, 3)
    eager_grads = torch.autograd.grad(eager.square().sum(), [tokens, *tom.parameters()])
    compiled = torch.compile(tom, fullgraph=True, backend="aot_eager")(tokens, 3)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), [tokens, *tom.parameters()])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_cpu
def test_torch_compile_fullgraph_model_cpu_backend():
    torch._dynamo.reset()
    eager_model, model = tiny_pair("cpu", "cpu")
    x = torch.randn(1, 4, 16, 16, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # inductor: ~12 min here
    out = compiled(x)
    torch.testing.assert_close(out, eager_model(x), rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    eager_model(x).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- registry

TINY_BASELINES = {
    "segmamba": dict(feat_size=(4, 8, 8, 16), depths=(1, 1, 1, 1), hidden_size=16),
    "segmamba_nomamba": dict(feat_size=(4, 8, 8, 16), hidden_size=16),
    "unetr": dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2),
    "swinunetr": dict(feature_size=12, depths=(1, 1, 1, 1)),
    "swinunetr_v2": dict(feature_size=12, depths=(1, 1, 1, 1)),
    "segresnet": dict(init_filters=8),
    "mednext": dict(init_filters=4),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_builds_runs_and_rebuilds_from_config(name):
    torch.manual_seed(0)
    crop = (32, 64, 32) if min_multiple(name) == 32 else (32, 32, 32)
    assert roi_size_error(name, crop) is None
    cfg = model_config(name, in_chans=4, out_chans=3, roi_size=crop, **TINY_BASELINES[name])
    assert json.loads(json.dumps(cfg)) == cfg  # plain data
    model = build_model(**cfg).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, *crop)).shape == (1, 3, *crop)
    rebuilt = build_model(**json.loads(json.dumps(cfg)))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_registry_defaults_and_errors():
    assert MODEL_NAMES == ("segmamba", "segmamba_nomamba", "unetr", "swinunetr", "swinunetr_v2", "segresnet", "mednext")
    assert sum(p.numel() for p in build_model("segmamba").parameters()) == 67_416_196
    assert model_config("swinunetr")["feature_size"] == 48
    assert model_config("swinunetr_v2")["use_v2"] is True
    assert model_config("unetr", roi_size=(64, 96, 64))["roi_size"] == [64, 96, 64]
    assert [min_multiple(n) for n in MODEL_NAMES] == [16, 16, 16, 32, 32, 8, 16]
    assert "multiples of 32" in roi_size_error("swinunetr", 48)
    assert "more than one voxel at its deepest stage" in roi_size_error("swinunetr", 32)
    assert "more than one voxel" in roi_size_error("segmamba", (16, 16, 16))
    assert roi_size_error("segmamba", (16, 32, 16)) is None and roi_size_error("unetr", 16) is None
    assert roi_size_error("segmamba", (80, 96, 64)) is None
    with pytest.raises(ValueError, match="name: expected one of .*segmamba.*mednext.*got 'vnet'"):
        build_model("vnet")
    with pytest.raises(ValueError, match=r"overrides: segmamba does not take \['width'\]"):
        model_config("segmamba", width=3)
    with pytest.raises(ValueError, match=r"\['img_size'\] are set from in_chans/out_chans/roi_size"):
        build_model("unetr", img_size=(64, 64, 64))
    with pytest.raises(ValueError, match="roi_size: expected 3 positive ints"):
        model_config("segmamba", roi_size=(64, 64))
