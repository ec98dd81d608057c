"""Channels-last 3D models on the CPU: oneDNN's fast layout, kept by our instance norm and convolution.

oneDNN's 3D convolutions are fastest with channels-last (NDHWC) tensors: measured at 64^3, 48
channels, one core, forward 0.51 -> 0.31 s, backward 0.58 -> 0.44 s (benchmarks/RESULTS.md). Three
things in PyTorch undo that layout between the convolutions; the classes here fix them without
changing the function (no new parameters or buffers, so state dicts are unchanged):

- for a batch of one with a 3x3x3 kernel, PyTorch sends small inputs (batch * C * D * H <= 20480:
  the 4-channel image at 64^3, every level at 4^3 and 8^3) to its own `slow_conv3d`, which returns
  NCDHW; the next convolution then copies the whole tensor back to channels-last, and the
  channels-last weights are copied to NCDHW at every call. :class:`Conv3d` keeps such inputs on
  oneDNN (measured: 4 -> 48 channels at 64^3, forward + backward 240 -> 179 ms; 384 -> 768 channels
  at 4^3, 42 -> 29 ms; both before counting the copies they no longer cause);
- `nn.InstanceNorm3d` (no affine, no running statistics: MONAI's "instance" and SegMamba's own)
  converts a channels-last input to NCDHW and returns NCDHW. PyTorch's channels-last group norm is
  no way out: it computes the variance as E[x^2] - E[x]^2 in float32 and loses all precision when
  the mean is large against the spread. Here a channels-last sample is what its memory holds, a
  (voxels, channels) matrix, and the batch norm of that matrix is the instance norm, written
  straight into a channels-last output;
- `nn.InstanceNorm3d` returns a *view* of its result, and the blocks after it apply their
  activation in place; an in-place op on a view costs autograd a copy of the whole gradient and one
  back (CopySlices) in each backward. Both paths here return a tensor of their own (for NCDHW
  input: `group_norm` with one group per channel, the same normalisation).

Precision (tests/test_channels_last.py, against float64): gradients as PyTorch's (relative 1e-5);
the channels-last forward accumulates in float32 rows, so where a channel's mean is 100 to 300 times
its spread its output is off by up to 1e-3 (PyTorch's instance norm: 1e-4; float32 rounding of such
an input alone: 3e-5), and by 3e-6 for centred data.

Other inputs (dtypes other than float32/64, e.g. under bf16 autocast; other layouts; unbatched;
torch.compile tracing, which fuses norms itself) take nn.InstanceNorm3d's own path, and
nn.Conv3d's own path likewise. :func:`to_channels_last` converts a model: its norms, its
convolutions, its weights, and its inputs (a forward pre-hook), so callers pass ordinary tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHANNELS_LAST = torch.channels_last_3d
_FAST_DTYPES = (torch.float32, torch.float64)


def _as_rows(t: Tensor) -> Tensor:
    """(N, C, D, H, W) channels-last -> (N, D*H*W, C) view of the same memory."""
    n, c = t.shape[:2]
    return t.permute(0, 2, 3, 4, 1).view(n, -1, c)


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        n, c = x.shape[:2]
        rows = _as_rows(x)
        out = torch.empty_like(x, memory_format=CHANNELS_LAST)
        out_rows = _as_rows(out)
        mean, invstd = x.new_empty(n, c), x.new_empty(n, c)
        for i in range(n):
            torch.ops.aten.native_batch_norm.out(rows[i], None, None, None, None, True, 0.0, eps,
                                                 out=out_rows[i], save_mean=mean[i], save_invstd=invstd[i])
        ctx.save_for_backward(x, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous(memory_format=CHANNELS_LAST)
        rows, grad_rows = _as_rows(x), _as_rows(grad)
        dx_rows = [torch.ops.aten.native_batch_norm_backward(grad_rows[i], rows[i], None, None, None, mean[i],
                                                             invstd[i], True, ctx.eps, [True, False, False])[0]
                   for i in range(x.shape[0])]
        n, c = x.shape[:2]
        # (N, voxels, C) rows are channels-last memory; one sample needs no copy to get there.
        dx = dx_rows[0][None] if n == 1 else torch.stack(dx_rows)
        return dx.view(n, *x.shape[2:], c).permute(0, 4, 1, 2, 3), None


class InstanceNorm3d(nn.InstanceNorm3d):
    """nn.InstanceNorm3d whose output is a tensor of its own, in the input's memory format (module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.affine or self.track_running_stats or x.dim() != 5 or x.dtype not in _FAST_DTYPES
                or torch.compiler.is_compiling()):
            return super().forward(x)
        if x.is_contiguous():
            return F.group_norm(x, x.shape[1], eps=self.eps)
        if x.is_contiguous(memory_format=CHANNELS_LAST):
            return _ChannelsLastInstanceNorm.apply(x, self.eps)
        return super().forward(x)


def use_instance_norm_without_views(model: nn.Module) -> nn.Module:
    """Replace, in place, every plain nn.InstanceNorm3d of `model` without parameters or buffers by
    :class:`InstanceNorm3d` (the same function, and no state, so state dicts are unchanged); returns `model`."""
    for name, child in list(model.named_children()):
        if type(child) is nn.InstanceNorm3d and not child.affine and not child.track_running_stats:
            setattr(model, name, InstanceNorm3d(child.num_features, eps=child.eps, momentum=child.momentum))
        else:
            use_instance_norm_without_views(child)
    return model


class Conv3d(nn.Conv3d):
    """nn.Conv3d that runs channels-last float32 CPU inputs on oneDNN whatever their size (module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.dim() == 5 and x.is_contiguous(memory_format=CHANNELS_LAST)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                # autocast casts F.conv3d's inputs but not a direct aten call; compile has its own plan
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)


def use_onednn_convolutions(model: nn.Module) -> nn.Module:
    """Make, in place, every plain nn.Conv3d of `model` a :class:`Conv3d`; returns `model`. The class
    of each module is swapped rather than the module replaced, so parameters (and any optimiser or
    hook holding them) stay the same objects."""
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = Conv3d
    return model


def _inputs_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    if args and isinstance(args[0], Tensor) and args[0].dim() == 5:
        return (args[0].contiguous(memory_format=CHANNELS_LAST),) + tuple(args[1:])
    return args


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert `model` in place to run channels-last 3D (module doc); returns it. Outputs are
    channels-last too; state dicts keep their keys and values."""
    use_instance_norm_without_views(model)
    use_onednn_convolutions(model)
    model.to(memory_format=CHANNELS_LAST)
    model.register_forward_pre_hook(_inputs_to_channels_last)
    return model
