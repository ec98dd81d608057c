"""Channels-last models (segmamba.models.channels_last): the instance norm against float64 references,
in both memory formats and through the in-place activations that follow it in the models, and whole
models converted to channels-last against themselves in NCDHW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmamba.models import SegMamba, build_model
from segmamba.models.channels_last import CHANNELS_LAST, Conv3d, InstanceNorm3d, to_channels_last, use_onednn_convolutions

FORMATS = {"ncdhw": torch.contiguous_format, "channels_last": CHANNELS_LAST}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 3, 1, 5, 7), (2, 5, 3, 4, 5), (3, 16, 6, 5, 4), (1, 48, 16, 16, 16)])
@pytest.mark.parametrize("shift, scale, out_tol", [(0.0, 1.0, 5e-6), (3.0, 0.01, 1e-3), (100.0, 1.0, 1e-3)])
def test_instance_norm_matches_float64_reference(fmt: str, shape, shift: float, scale: float, out_tol: float) -> None:
    """Centred data and channels whose mean is 100-300 times their spread (see the module's precision note)."""
    torch.manual_seed(0)
    x64 = torch.randn(shape, dtype=torch.float64) * scale + shift
    ref_x = x64.clone().requires_grad_(True)
    ref = F.instance_norm(ref_x, eps=1e-5)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    x = x64.float().contiguous(memory_format=FORMATS[fmt]).requires_grad_(True)
    y = InstanceNorm3d(shape[1])(x)
    assert y.is_contiguous(memory_format=FORMATS[fmt]) and not y._is_view()
    y.backward(grad.float())
    assert (y.double() - ref).abs().max() < out_tol
    assert ((x.grad.double() - ref_x.grad).abs().max() / ref_x.grad.abs().max()) < 2e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_instance_norm_then_inplace_activation(fmt: str) -> None:
    """MONAI's blocks activate the norm's output in place: it must be allowed and differentiate right."""
    torch.manual_seed(1)
    x64 = torch.randn(2, 8, 5, 6, 7, dtype=torch.float64)
    ref_x = x64.clone().requires_grad_(True)
    ref = F.leaky_relu(F.instance_norm(ref_x), 0.01)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    x = x64.float().contiguous(memory_format=FORMATS[fmt]).requires_grad_(True)
    out = F.leaky_relu(InstanceNorm3d(8)(x), 0.01, inplace=True)
    out.backward(grad.float())
    assert (out.double() - ref).abs().max() < 5e-6
    assert ((x.grad.double() - ref_x.grad).abs().max() / ref_x.grad.abs().max()) < 2e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_instance_norm_gradcheck(fmt: str) -> None:
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=FORMATS[fmt]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: InstanceNorm3d(4)(t), (x,))


def test_instance_norm_falls_back_to_pytorch_elsewhere() -> None:
    x = torch.randn(2, 4, 3, 4, 5).to(torch.bfloat16)
    assert torch.equal(InstanceNorm3d(4)(x), nn.InstanceNorm3d(4)(x))
    unbatched = torch.randn(4, 3, 4, 5)
    assert torch.equal(InstanceNorm3d(4)(unbatched), nn.InstanceNorm3d(4)(unbatched))
    strided = torch.randn(2, 4, 6, 4, 5)[:, :, ::2]
    assert torch.allclose(InstanceNorm3d(4)(strided), nn.InstanceNorm3d(4)(strided), atol=1e-6)


@pytest.mark.parametrize("cin, cout, side, stride, groups", [
    (4, 48, 17, 1, 1),   # PyTorch's own slow_conv3d path for a batch of one (batch * C * D * H <= 20480)
    (24, 12, 4, 1, 1),
    (6, 6, 5, 2, 3),
    (3, 5, 40, 1, 1),    # big enough for oneDNN either way
])
def test_conv3d_matches_pytorch_and_keeps_channels_last(cin: int, cout: int, side: int, stride: int, groups: int) -> None:
    torch.manual_seed(2)
    ref = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, groups=groups).double()
    conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, groups=groups)
    conv.load_state_dict(ref.state_dict())
    weight = conv.weight
    use_onednn_convolutions(conv).to(memory_format=CHANNELS_LAST)
    assert type(conv) is Conv3d and conv.weight is weight
    x64 = torch.randn(1, cin, side, side + 1, side - 1, dtype=torch.float64, requires_grad=True)
    y_ref = ref(x64)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    x = x64.detach().float().contiguous(memory_format=CHANNELS_LAST).requires_grad_(True)
    y = conv(x)
    y.backward(grad.float())
    assert y.is_contiguous(memory_format=CHANNELS_LAST)
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() <= 1e-5 * scale
    for got, want in [(x.grad, x64.grad), (conv.weight.grad, ref.weight.grad), (conv.bias.grad, ref.bias.grad)]:
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_conv3d_leaves_autocast_and_other_inputs_to_pytorch() -> None:
    torch.manual_seed(3)
    conv = use_onednn_convolutions(nn.Conv3d(4, 8, 3, padding=1)).to(memory_format=CHANNELS_LAST)
    x = torch.randn(1, 4, 6, 6, 6).contiguous(memory_format=CHANNELS_LAST)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # autocast applied: PyTorch's path
    ncdhw = torch.randn(1, 4, 6, 6, 6)
    assert torch.equal(conv(ncdhw), nn.functional.conv3d(ncdhw, conv.weight, conv.bias, padding=1))


def test_registry_models_use_it_and_keep_their_state_dicts() -> None:
    for name, kw in [("segmamba", dict(feat_size=(4, 8, 8, 16), depths=(1, 1, 1, 1), hidden_size=16)),
                     ("swinunetr", dict(feature_size=12, depths=(1, 1, 1, 1)))]:
        model = build_model(name, roi_size=(32, 64, 32), **kw)
        norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
        assert norms and all(type(m) is InstanceNorm3d for m in norms), name
    direct = SegMamba(feat_size=(4, 8, 8, 16), depths=(1, 1, 1, 1), hidden_size=16)  # PyTorch's norms
    assert any(type(m) is nn.InstanceNorm3d for m in direct.modules())
    registry = build_model("segmamba", roi_size=32, feat_size=(4, 8, 8, 16), depths=(1, 1, 1, 1), hidden_size=16)
    assert sorted(direct.state_dict()) == sorted(registry.state_dict())


@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last_model_matches_ncdhw(batch: int) -> None:
    torch.manual_seed(0)
    kw = dict(feat_size=(4, 8, 8, 16), depths=(1, 1, 1, 1), hidden_size=16)
    ref = build_model("segmamba", roi_size=32, **kw)
    cl = build_model("segmamba", roi_size=32, **kw)
    cl.load_state_dict(ref.state_dict())
    to_channels_last(cl)
    assert cl.encoder.downsample[0].weight.is_contiguous(memory_format=CHANNELS_LAST)
    assert all(type(m) is not nn.Conv3d for m in cl.modules())
    assert sorted(cl.state_dict()) == sorted(ref.state_dict())
    x = torch.randn(batch, 4, 32, 32, 32)
    target = torch.randint(0, 4, (batch, 32, 32, 32))
    losses = []
    for model in (ref, cl):
        out = model(x)  # an ordinary NCDHW input: the model's hook converts it
        loss = F.cross_entropy(out, target)
        loss.backward()
        losses.append((out, loss))
    (out_ref, loss_ref), (out_cl, loss_cl) = losses
    assert torch.allclose(out_cl, out_ref, atol=1e-4, rtol=1e-4)
    for (name, p_ref), p_cl in zip(ref.named_parameters(), cl.parameters()):
        scale = p_ref.grad.abs().max()
        if scale > 1e-6:  # conv biases before an instance norm have a gradient of exactly 0 (rounding here)
            assert (p_cl.grad - p_ref.grad).abs().max() <= 1e-3 * scale, name
