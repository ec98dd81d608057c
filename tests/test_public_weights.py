"""Weights of the public SegMamba code in our model, and its dt initialisation as an option.

The public state dict is built here from the public code's module names and shapes (facts of
github.com/ge-xing/SegMamba: model_segmamba/segmamba.py and its vendored mamba_ssm Mamba), and
its encoder is computed here functionally from those names, as the public code computes it. Loading
must then reproduce that computation: a swapped pair of same-shaped weights (proj3/proj4, the
_b/_s directions, x/z) changes the output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import segmamba_kernels as sk
from segmamba import convert_public
from segmamba.models import SegMamba, build_model, model_config
from segmamba.models.mamba import DT_MAX, DT_MIN
from segmamba.models.public_weights import (PublicWeightsError, convert_public_checkpoint, load_public_state_dict,
                                            public_model_config, public_to_ours, read_public_checkpoint)

CFG = dict(in_chans=2, out_chans=3, depths=(1, 2, 0, 1), feat_size=(8, 16, 24, 32), hidden_size=40)
D_STATE, D_CONV, EXPAND = 4, 4, 2
# Depth 32 and H = W = 16: the inter-slice grid is not square at any stage.
SHAPE = (1, CFG["in_chans"], 32, 16, 16)


def _public_shapes(model: SegMamba) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the public SegMamba's state dict for CFG; the decoder (encoder1..5,
    decoder1..5, out) is the same MONAI blocks under the same names in both codes."""
    f, cin = CFG["feat_size"], CFG["in_chans"]
    s = {"vit.downsample_layers.0.0.weight": (f[0], cin, 7, 7, 7), "vit.downsample_layers.0.0.bias": (f[0],)}
    for i in (1, 2, 3):
        s[f"vit.downsample_layers.{i}.1.weight"] = (f[i], f[i - 1], 2, 2, 2)
        s[f"vit.downsample_layers.{i}.1.bias"] = (f[i],)
    for i, c in enumerate(f):
        for proj, k in (("proj", 3), ("proj2", 3), ("proj3", 1), ("proj4", 1)):
            s[f"vit.gscs.{i}.{proj}.weight"], s[f"vit.gscs.{i}.{proj}.bias"] = (c, c, k, k, k), (c,)
        d_inner, dt_rank = EXPAND * c, math.ceil(c / 16)
        for j in range(CFG["depths"][i]):
            p = f"vit.stages.{i}.{j}"
            s[f"{p}.norm.weight"], s[f"{p}.norm.bias"] = (c,), (c,)
            s[f"{p}.mamba.in_proj.weight"], s[f"{p}.mamba.out_proj.weight"] = (2 * d_inner, c), (c, d_inner)
            for x in ("", "_b", "_s"):
                s[f"{p}.mamba.conv1d{x}.weight"], s[f"{p}.mamba.conv1d{x}.bias"] = (d_inner, 1, D_CONV), (d_inner,)
                s[f"{p}.mamba.x_proj{x}.weight"] = (dt_rank + 2 * D_STATE, d_inner)
                s[f"{p}.mamba.dt_proj{x}.weight"], s[f"{p}.mamba.dt_proj{x}.bias"] = (d_inner, dt_rank), (d_inner,)
                s[f"{p}.mamba.A{x}_log"], s[f"{p}.mamba.D{x}"] = (d_inner, D_STATE), (d_inner,)
        s[f"vit.mlps.{i}.fc1.weight"], s[f"vit.mlps.{i}.fc1.bias"] = (2 * c, c, 1, 1, 1), (2 * c,)
        s[f"vit.mlps.{i}.fc2.weight"], s[f"vit.mlps.{i}.fc2.bias"] = (c, 2 * c, 1, 1, 1), (c,)
    decoder = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder5.", "decoder", "out.")
    s.update({k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(decoder)})
    return s


def _model(**kw) -> SegMamba:
    return SegMamba(**{**CFG, **kw}, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND, backend="reference")


def _public_state_dict(model: SegMamba, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.3 * torch.randn(shape, generator=g) for k, shape in _public_shapes(model).items()}
    for k in sd:  # A = -exp(A_log) must stay moderate; dt bias near Mamba's range
        if k.endswith("_log"):
            sd[k] = torch.log(torch.rand(sd[k].shape, generator=g) * 4 + 0.5)
    return sd


# ------------------------------------------------------------ the public encoder, functionally

def _inner(xz, sd, p, x, n_slices=None):
    """mamba_inner_fn_no_out_proj of direction suffix x on xz (batch, 2 d_inner, L), the
    inter-slice one reordered by chunking into n_slices slices as the public code does."""
    batch, _, L = xz.shape
    if x == "_b":
        xz = xz.flip(-1)
    if x == "_s":
        xz = torch.stack(xz.chunk(n_slices, dim=-1), dim=-1).flatten(-2)
    u, z = xz.chunk(2, dim=1)
    w = sd[f"{p}.conv1d{x}.weight"]
    u = F.silu(F.conv1d(u, w, sd[f"{p}.conv1d{x}.bias"], padding=w.shape[-1] - 1, groups=w.shape[0])[..., :L])
    dt_rank, n = sd[f"{p}.dt_proj{x}.weight"].shape[1], sd[f"{p}.A{x}_log"].shape[1]
    dt, B, C = torch.einsum("od,bdl->bol", sd[f"{p}.x_proj{x}.weight"], u).split([dt_rank, n, n], dim=1)
    delta = torch.einsum("dr,brl->bdl", sd[f"{p}.dt_proj{x}.weight"], dt)
    y = sk.selective_scan(u, delta, -torch.exp(sd[f"{p}.A{x}_log"]), B, C, sd[f"{p}.D{x}"], z=z,
                          delta_bias=sd[f"{p}.dt_proj{x}.bias"], delta_softplus=True, backend="reference")
    if x == "_b":
        y = y.flip(-1)
    if x == "_s":
        y = y.reshape(batch, -1, L // n_slices, n_slices).permute(0, 1, 3, 2).flatten(-2)
    return y


def _public_encoder(x, sd):
    inorm = F.instance_norm
    outs = []
    for i in range(4):
        if i == 0:
            x = F.conv3d(x, sd["vit.downsample_layers.0.0.weight"], sd["vit.downsample_layers.0.0.bias"], 2, 3)
        else:
            down = f"vit.downsample_layers.{i}.1"
            x = F.conv3d(inorm(x), sd[f"{down}.weight"], sd[f"{down}.bias"], 2)
        g = f"vit.gscs.{i}"

        def conv(t, name, pad):
            return F.conv3d(t, sd[f"{g}.{name}.weight"], sd[f"{g}.{name}.bias"], padding=pad)
        x1 = F.relu(inorm(conv(F.relu(inorm(conv(x, "proj", 1))), "proj2", 1)))
        x2 = F.relu(inorm(conv(x, "proj3", 0)))
        x = F.relu(inorm(conv(x1 + x2, "proj4", 0))) + x
        for j in range(CFG["depths"][i]):
            p = f"vit.stages.{i}.{j}"
            b, c = x.shape[:2]
            flat = x.reshape(b, c, -1).transpose(1, 2)
            tokens = F.layer_norm(flat, (c,), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"])
            xz = torch.einsum("oc,blc->bol", sd[f"{p}.mamba.in_proj.weight"], tokens)
            y = sum(_inner(xz, sd, f"{p}.mamba", s, n_slices=x.shape[2]) for s in ("", "_b", "_s"))
            out = torch.einsum("cd,bdl->blc", sd[f"{p}.mamba.out_proj.weight"], y)
            x = out.transpose(1, 2).reshape(x.shape) + x
        h = F.gelu(F.conv3d(inorm(x), sd[f"vit.mlps.{i}.fc1.weight"], sd[f"vit.mlps.{i}.fc1.bias"]))
        outs.append(F.conv3d(h, sd[f"vit.mlps.{i}.fc2.weight"], sd[f"vit.mlps.{i}.fc2.bias"]))
    return outs


# ------------------------------------------------------------ tests

def test_every_tensor_lands_where_the_public_code_uses_it():
    torch.manual_seed(0)
    model = _model().double()
    sd = {k: v.double() for k, v in _public_state_dict(model).items()}
    load_public_state_dict(model, sd)
    ours = model.state_dict()
    # Every public tensor is in our model exactly once, and nothing of ours is left out.
    renamed = public_to_ours(model, sd)
    assert sorted(renamed) == sorted(ours) and len(renamed) == len(sd)
    for name, tensor in renamed.items():
        assert torch.equal(ours[name], tensor), name
    # Spot checks of the mapping (same-shaped pairs that a mix-up would not reveal by shape).
    pairs = {"vit.gscs.1.proj3.weight": "encoder.gscs.1.pointwise.0.weight",
             "vit.gscs.1.proj4.weight": "encoder.gscs.1.gate.0.weight",
             "vit.stages.1.1.mamba.dt_proj_b.bias": "encoder.stages.1.1.mixer.directions.1.dt_proj.bias",
             "vit.stages.1.1.mamba.A_s_log": "encoder.stages.1.1.mixer.directions.2.A_log",
             "vit.stages.3.0.mamba.D": "encoder.stages.3.0.mixer.directions.0.D",
             "vit.mlps.2.fc2.bias": "encoder.outputs.2.3.bias",
             "decoder3.transp_conv.conv.weight": "decoder3.transp_conv.conv.weight"}
    for public, our in pairs.items():
        assert torch.equal(ours[our], sd[public]), public

    # The forward: our encoder computes the public encoder from the public names, and the whole
    # model equals the public encoder followed by the (shared) decoder blocks.
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        want = _public_encoder(x, sd)
        got = model.encoder(x)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
        enc = [model.encoder1(x)] + [getattr(model, f"encoder{k}")(want[k - 2]) for k in (2, 3, 4)]
        dec = model.decoder5(model.encoder5(want[3]), enc[3])
        for k, skip in zip((4, 3, 2), (enc[2], enc[1], enc[0])):
            dec = getattr(model, f"decoder{k}")(dec, skip)
        torch.testing.assert_close(model(x), model.out(model.decoder1(dec)), rtol=1e-9, atol=1e-9)


def test_public_model_config_reads_the_architecture():
    sd = _public_state_dict(_model())
    cfg = public_model_config(sd)
    assert cfg == {**CFG, "depths": list(CFG["depths"]), "feat_size": list(CFG["feat_size"]),
                   "d_state": D_STATE, "d_conv": D_CONV, "expand": EXPAND}
    load_public_state_dict(SegMamba(**cfg), sd)  # the model built from it takes the weights
    with pytest.raises(PublicWeightsError, match="missing 'out.conv.conv.weight'"):
        public_model_config({k: v for k, v in _public_state_dict(_model()).items() if not k.startswith("out.")})


def test_missing_unexpected_and_misshapen_keys_are_errors_and_change_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = _public_state_dict(model)
    missing = dict(sd)
    del missing["vit.stages.1.1.mamba.x_proj_s.weight"]
    with pytest.raises(PublicWeightsError, match=r"missing \(1\): vit\.stages\.1\.1\.mamba\.x_proj_s\.weight"):
        load_public_state_dict(model, missing)
    extra = {**sd, "vit.norm0.running_mean": torch.zeros(8)}
    with pytest.raises(PublicWeightsError, match=r"unexpected \(1\): vit\.norm0\.running_mean"):
        load_public_state_dict(model, extra)
    bad = {**sd, "vit.gscs.0.proj.weight": torch.zeros(8, 8, 1, 1, 1)}
    with pytest.raises(PublicWeightsError, match=r"shape mismatch \(1\): vit\.gscs\.0\.proj\.weight: "
                                                 r"\(8, 8, 1, 1, 1\) \(ours \(8, 8, 3, 3, 3\)\)"):
        load_public_state_dict(model, bad)
    ddp = {f"module.{k}": v for k, v in sd.items()}
    with pytest.raises(PublicWeightsError, match="read_public_checkpoint"):
        load_public_state_dict(model, ddp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_public_checkpoint_converts_for_predict(tmp_path, capsys):
    from segmamba.predict import load_model

    model = _model(out_chans=4)  # BraTS labels 0..3, what a converted checkpoint declares
    sd = _public_state_dict(model, seed=7)
    # Saved from DistributedDataParallel under a "module" key, as the public trainer may do.
    torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "public.pt")
    assert read_public_checkpoint(tmp_path / "public.pt").keys() == sd.keys()
    convert_public.main([str(tmp_path / "public.pt"), "--out", str(tmp_path / "ours.pt"), "--roi", "32",
                         "--modalities", "t2f", "t1c"])
    net, tcfg = load_model(tmp_path / "ours.pt")
    assert tcfg["roi_size"] == [32, 32, 32] and tcfg["modalities"] == ["t2f", "t1c"]
    load_public_state_dict(model, sd)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        # The loaded net runs the registry's instance norm and the compiled kernels, `model` the
        # reference backend and torch's norm: the same function, float32 rounding apart.
        torch.testing.assert_close(net.to(torch.float32)(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(PublicWeightsError, match="modalities: the model takes 2 channels, got 4"):
        convert_public_checkpoint(tmp_path / "public.pt", tmp_path / "x.pt", (32, 32, 32))
    torch.save(_public_state_dict(_model()), tmp_path / "three.pt")
    with pytest.raises(PublicWeightsError, match="out_chans: a converted checkpoint is for the 4 BraTS labels, got 3"):
        convert_public_checkpoint(tmp_path / "three.pt", tmp_path / "x.pt", (32, 32, 32), ("t2f", "t1c"))
    with pytest.raises(SystemExit) as exit_:
        convert_public.main([str(tmp_path / "three.pt"), "--out", str(tmp_path / "x.pt"), "--modalities", "t2f", "t1c"])
    assert exit_.value.code == 2 and "out_chans" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def _dt(direction) -> torch.Tensor:
    return F.softplus(direction.dt_proj.bias.detach())


def test_dt_init_forward_only_is_the_public_initialisation():
    torch.manual_seed(0)
    for dt_init, inited in (("all", (True, True, True)), ("forward_only", (True, False, False))):
        model = SegMamba(**CFG, dt_init=dt_init)
        for stage in model.encoder.stages:
            for layer in stage:
                for direction, want in zip(layer.mixer.directions, inited):
                    dt = _dt(direction)
                    in_range = bool(((dt >= DT_MIN * 0.999) & (dt <= DT_MAX * 1.001)).all())
                    assert in_range == want, (dt_init, dt)
                    if not want:
                        # nn.Linear's default: bias uniform in +-1/sqrt(fan_in), so dt around log 2.
                        bound = direction.dt_proj.in_features ** -0.5
                        assert direction.dt_proj.bias.abs().max() <= bound
    cfg = model_config("segmamba", in_chans=2, out_chans=3, feat_size=[8, 16, 24, 32], hidden_size=40,
                       dt_init="forward_only")
    assert build_model(**cfg).encoder.stages[0][0].mixer.directions[1].dt_proj.bias.abs().max() <= 1.0
    with pytest.raises(ValueError, match=r"dt_init: expected one of \('all', 'forward_only'\), got 'none'"):
        SegMamba(**CFG, dt_init="none")
