"""SegMamba: Mamba encoder over the whole volume, UNETR-style decoder from MONAI blocks (docs/design.md §4)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import Tensor, nn

from .gsc import GSC
from .mamba import MambaLayer, check_backend, check_dt_init

# Stem stride 2 and three stride-2 downsamplers: input sides must be multiples of 16.
SIZE_MULTIPLE = 16


class StageOutput(nn.Sequential):
    """InstanceNorm, then a 1x1x1 MLP C -> 2C -> C with GELU (the skip features of a stage)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.InstanceNorm3d(channels), nn.Conv3d(channels, 2 * channels, 1), nn.GELU(),
                         nn.Conv3d(2 * channels, channels, 1))


class MambaEncoder(nn.Module):
    """Stem + 3 downsamplers; each stage runs GSC then ``depths[i]`` Mamba layers."""

    def __init__(self, in_chans: int, depths: Sequence[int], feat_size: Sequence[int], d_state: int,
                 d_conv: int, expand: int, backend: str, dt_init: str = "all") -> None:
        super().__init__()
        self.downsample = nn.ModuleList([nn.Conv3d(in_chans, feat_size[0], kernel_size=7, stride=2, padding=3)])
        self.downsample.extend(
            nn.Sequential(nn.InstanceNorm3d(c_in), nn.Conv3d(c_in, c_out, kernel_size=2, stride=2))
            for c_in, c_out in zip(feat_size[:-1], feat_size[1:]))
        self.gscs = nn.ModuleList(GSC(c) for c in feat_size)
        self.stages = nn.ModuleList(
            nn.Sequential(*(MambaLayer(c, d_state, d_conv, expand, backend, dt_init) for _ in range(depth)))
            for c, depth in zip(feat_size, depths))
        self.outputs = nn.ModuleList(StageOutput(c) for c in feat_size)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for down, gsc, stage, output in zip(self.downsample, self.gscs, self.stages, self.outputs):
            x = stage(gsc(down(x)))
            outs.append(output(x))
        return outs


def _check_len4(name: str, value: Sequence[int]) -> tuple[int, ...]:
    value = tuple(int(v) for v in value)
    if len(value) != 4 or min(value) < (0 if name == "depths" else 1):
        raise ValueError(f"{name}: expected 4 {'non-negative' if name == 'depths' else 'positive'} ints, got {value}")
    return value


class SegMamba(nn.Module):
    """SegMamba (arXiv 2401.13560) on segmamba_kernels.

    Input (batch, in_chans, D, H, W) with D, H, W multiples of 16 and not all 16 (the deepest
    stage must have more than one voxel), any size otherwise: the inter-slice scan follows the
    actual depth. Output logits (batch, out_chans, D, H, W).
    ``backend`` is passed to every kernel call ("auto", "reference", "cpu", "cuda", "triton").
    ``dt_init``: "all" gives every scan direction Mamba's dt initialisation; "forward_only" gives
    it to the forward direction only, as the public SegMamba code does (the others keep
    nn.Linear's default init of dt_proj).
    """

    def __init__(
        self,
        in_chans: int = 4,
        out_chans: int = 4,
        depths: Sequence[int] = (2, 2, 2, 2),
        feat_size: Sequence[int] = (48, 96, 192, 384),
        hidden_size: int = 768,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        backend: str = "auto",
        dt_init: str = "all",
    ) -> None:
        super().__init__()
        depths, feat_size = _check_len4("depths", depths), _check_len4("feat_size", feat_size)
        self.in_chans, self.out_chans = in_chans, out_chans
        self.encoder = MambaEncoder(in_chans, depths, feat_size, d_state, d_conv, expand, check_backend(backend),
                                    check_dt_init(dt_init))

        def basic(c_in: int, c_out: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, c_in, c_out, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)

        def up(c_in: int, c_out: int) -> UnetrUpBlock:
            return UnetrUpBlock(3, c_in, c_out, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                                res_block=res_block)

        f0, f1, f2, f3 = feat_size
        self.encoder1, self.encoder2, self.encoder3, self.encoder4 = (
            basic(in_chans, f0), basic(f0, f1), basic(f1, f2), basic(f2, f3))
        self.encoder5 = basic(f3, hidden_size)
        self.decoder5, self.decoder4, self.decoder3, self.decoder2 = (
            up(hidden_size, f3), up(f3, f2), up(f2, f1), up(f1, f0))
        self.decoder1 = basic(f0, f0)
        self.out = UnetOutBlock(3, f0, out_chans)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected shape (batch, {self.in_chans}, D, H, W), got {tuple(x.shape)}")
        sides = tuple(x.shape[2:])
        if any(s % SIZE_MULTIPLE for s in sides):
            raise ValueError(f"x: expected spatial sides that are multiples of {SIZE_MULTIPLE}, got {sides}")
        if max(sides) == SIZE_MULTIPLE:
            raise ValueError(f"x: expected at least one side of {2 * SIZE_MULTIPLE} or more (instance norm at "
                             f"the deepest stage needs more than one voxel), got {sides}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        s1, s2, s3, s4 = self.encoder(x)
        enc1 = self.encoder1(x)
        enc2, enc3, enc4 = self.encoder2(s1), self.encoder3(s2), self.encoder4(s3)
        dec = self.decoder5(self.encoder5(s4), enc4)
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec))
