"""Tri-orientated Mamba (ToM) and the Mamba layer of the SegMamba encoder (docs/design.md §4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from segmamba_kernels import BACKENDS, ORDERS

from .ssm_path import project, ssm_direction

# dt = softplus(dt_proj.bias) starts log-uniform in this range, as in Mamba.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
# Which directions get that dt initialisation: "all" (ours), or "forward_only" as in the public
# SegMamba code, whose reverse and inter-slice dt_proj keep nn.Linear's default init.
DT_INITS = ("all", "forward_only")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
    return backend


def check_dt_init(dt_init: str) -> str:
    if dt_init not in DT_INITS:
        raise ValueError(f"dt_init: expected one of {DT_INITS}, got {dt_init!r}")
    return dt_init


class MambaDirection(nn.Module):
    """The weights one scan direction owns: conv, x_proj, dt_proj, A_log and D."""

    def __init__(self, d_inner: int, dt_rank: int, d_state: int, d_conv: int, init_dt: bool = True) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # S4D-real: A[d, n] = -(n + 1), stored as its log so that A stays negative.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        if init_dt:
            self._init_dt()

    @torch.no_grad()
    def _init_dt(self) -> None:
        dt_rank = self.dt_proj.in_features
        bound = dt_rank ** -0.5
        self.dt_proj.weight.uniform_(-bound, bound)
        log_dt = torch.rand(self.dt_proj.out_features) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = log_dt.exp().clamp(min=DT_FLOOR)
        # inverse of softplus: softplus(dt + log(1 - exp(-dt))) = dt
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, xz: Tensor, order: str, n_slices: int, backend: str) -> Tensor:
        return ssm_direction(xz, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight,
                             self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, order, n_slices, backend)


class TriOrientedMamba(nn.Module):
    """ToM: one shared in_proj and out_proj around forward, reverse and inter-slice scans."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str = "auto", dt_init: str = "all") -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.backend = check_backend(backend)
        dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        check_dt_init(dt_init)
        self.directions = nn.ModuleList(
            MambaDirection(self.d_inner, dt_rank, d_state, d_conv, init_dt=dt_init == "all" or order == "forward")
            for order in ORDERS)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, tokens: Tensor, n_slices: int) -> Tensor:
        """tokens: (batch, L, d_model) in flattened (depth, height, width) order, depth =
        ``n_slices``. Returns (batch, L, d_model), as a transposed view of a channel-major tensor."""
        # W @ tokens^T gives the channel-major (batch, 2 * d_inner, L) layout the kernels scan.
        xz = project(self.in_proj.weight, tokens.transpose(1, 2))
        y = None
        for direction, order in zip(self.directions, ORDERS):
            out = direction(xz, order, n_slices, self.backend)
            y = out if y is None else y.add_(out)
        return project(self.out_proj.weight, y).transpose(1, 2)


class MambaLayer(nn.Module):
    """x + ToM(LayerNorm(x)) over the flattened tokens of a (batch, C, D, H, W) feature map."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, backend: str = "auto",
                 dt_init: str = "all") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = TriOrientedMamba(dim, d_state, d_conv, expand, backend, dt_init)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return x + self.mixer(tokens, n_slices=x.shape[2]).transpose(1, 2).view_as(x)
