"""medmae_jax UNETR against MONAI's UNETR on the same weights and inputs (import and export)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from monai.networks.nets import UNETR as MonaiUNETR  # noqa: E402

from medmae_jax.errors import ConversionError  # noqa: E402
from medmae_jax.interop.monai_unetr import (  # noqa: E402
    MonaiUnetrConfig,
    infer_monai_unetr_config,
    jax_to_monai_unetr,
    monai_unetr_to_jax,
)
from medmae_jax.models.unetr import UNETR  # noqa: E402

pytestmark = pytest.mark.parity

TOL = 1e-4
# Small ViTs (MONAI's UNETR always has 12 blocks and patch 16); each case covers other options.
CASES = [
    dict(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=16, proj_type="conv"),
    dict(in_channels=4, out_channels=2, img_size=(32, 48, 16), feature_size=32, proj_type="perceptron"),
    dict(in_channels=4, out_channels=3, img_size=(64, 48), feature_size=16, proj_type="conv", qkv_bias=True),
    dict(in_channels=1, out_channels=2, img_size=(48, 48), feature_size=32, proj_type="perceptron", qkv_bias=True,
         res_block=False, conv_block=False),
]
VIT = dict(hidden_size=48, mlp_dim=96, num_heads=4)


def _id(case):
    img = "x".join(map(str, case["img_size"]))
    flags = dict(qkv_bias=(True, "-qkvbias"), res_block=(False, "-plainblocks"), conv_block=(False, "-noconvblock"))
    extra = "".join(tag for k, (value, tag) in flags.items() if case.get(k, not value) == value)
    return f"{img}-in{case['in_channels']}-f{case['feature_size']}-{case['proj_type']}{extra}"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random non-zero values everywhere (biases and LayerNorm scales too), so a mis-placed tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "vit.norm.weight":
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            elif "position_embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))


def _monai(case, seed=0):
    kwargs = dict(VIT, **case)
    model = MonaiUNETR(spatial_dims=len(case["img_size"]), **kwargs).eval()
    _randomize(model, seed)
    return model


def _torch_logits(model, x_cl: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.moveaxis(x_cl, -1, 1).copy())
    with torch.no_grad():
        y = model(x).numpy()
    return np.moveaxis(y, 1, -1)


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.slow
def test_import_export_matches_monai(case):
    model = _monai(case)
    sd = _state_dict(model)
    # MONAI >= 1.4 carries unused cross-attention entries; list what this MONAI really emits.
    cross = sorted(k for k in sd if ".cross_attn." in k or ".norm_cross_attn." in k)

    img = case["img_size"]
    cube = len(set(img)) == 1  # non-cubic grids cannot be read from the position table's length
    config = infer_monai_unetr_config(sd, num_heads=VIT["num_heads"], img_size=None if cube else img)
    expected = dict(qkv_bias=False, res_block=True, conv_block=True, spatial_dims=len(case["img_size"]), **VIT)
    expected.update(case)
    assert config.monai_kwargs() == expected
    params, report = monai_unetr_to_jax(sd, strict=True, config=config)
    assert report.clean and not report.unused and not report.missing
    assert sorted(report.ignored) == cross

    rng = np.random.default_rng(1)
    batch = 2 if len(img) == 2 else 1  # instance norm is per sample: 2-D cases check that cheaply
    x = rng.standard_normal((batch, *img, case["in_channels"])).astype(np.float32)
    want = _torch_logits(model, x)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(UNETR(**config.unetr_kwargs()).apply)({"params": params}, jnp.asarray(x)))
    assert got.shape == (batch, *img, case["out_channels"])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)

    # Export -> strict load into a fresh MONAI UNETR -> identical tensors and logits.
    exported = jax_to_monai_unetr(params)
    assert set(exported) == set(sd)
    fresh = _monai(case, seed=123)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for k, v in model.state_dict().items():
        if k not in cross:
            np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    np.testing.assert_allclose(_torch_logits(fresh, x), want, atol=1e-6, rtol=1e-6)


def test_old_monai_cross_attn_keys_are_ignored_and_leftovers_reported():
    case = CASES[0]
    model = _monai(case)
    sd = _state_dict(model)
    # MONAI 1.4 built full (unused) cross-attention blocks: 4 projections (q, k, v without bias) + out bias.
    w = VIT["hidden_size"]
    old = dict(sd)
    for i in range(12):
        for name in ("to_q", "to_k", "to_v", "out_proj"):
            old[f"vit.blocks.{i}.cross_attn.{name}.weight"] = np.full((w, w), 0.3, np.float32)
        old[f"vit.blocks.{i}.cross_attn.out_proj.bias"] = np.full((w,), 0.3, np.float32)
    old["vit.some_new_head.weight"] = np.ones((3, w), np.float32)
    # A DataParallel checkpoint: every key prefixed with "module.".
    old = {f"module.{k}": v for k, v in old.items()}

    params, report = monai_unetr_to_jax(old, num_heads=VIT["num_heads"])
    clean, _ = monai_unetr_to_jax(sd, num_heads=VIT["num_heads"], strict=True)
    jax.tree.map(np.testing.assert_array_equal, params, clean)
    assert report.unused == ["vit.some_new_head.weight"]
    assert not report.missing
    assert len(report.ignored) == 12 * 5 + sum(".norm_cross_attn." in k for k in sd)
    assert all(".cross_attn." in k or ".norm_cross_attn." in k for k in report.ignored)
    with pytest.raises(ConversionError, match="some_new_head"):
        monai_unetr_to_jax(old, num_heads=VIT["num_heads"], strict=True)

    # Export in MONAI 1.4's layout ("full") re-creates those keys with the right shapes.
    full = jax_to_monai_unetr(params, cross_attn_keys="full")
    assert {k for k in full if ".cross_attn." in k} == {k[len("module."):] for k in old if ".cross_attn." in k}
    none = jax_to_monai_unetr(params, cross_attn_keys="none")
    assert not [k for k in none if "cross_attn" in k]
    missing, unexpected = MonaiUNETR(spatial_dims=3, **dict(VIT, **case)).load_state_dict(
        {k: torch.from_numpy(v) for k, v in none.items()}, strict=False)
    assert not unexpected and all("cross_attn" in k for k in missing)


def test_wrong_shapes_name_the_key():
    case = CASES[0]
    sd = _state_dict(_monai(case))
    bad = dict(sd)
    bad["decoder2.conv_block.conv2.conv.weight"] = np.zeros((64, 64, 3, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=r"decoder2\.conv_block\.conv2\.conv\.weight.*\(64, 64, 3, 3, 3\).*"
                                              r"\(16, 16, 3, 3, 3\)"):
        monai_unetr_to_jax(bad, num_heads=4)
    # A config that disagrees with the checkpoint (14 classes vs 3) fails on the output conv.
    config = MonaiUnetrConfig(**{**infer_monai_unetr_config(sd, num_heads=4).__dict__, "out_channels": 14})
    with pytest.raises(ConversionError, match=r"out\.conv\.conv\.weight"):
        monai_unetr_to_jax(sd, config=config)


def test_parameter_count_matches_monai_vit_b():
    """ViT-B UNETR, 96^3, 1 -> 14 classes, feature 16: same count as MONAI less its unused cross-attention norms."""
    with torch.device("meta"):  # shapes only, no memory
        model = MonaiUNETR(in_channels=1, out_channels=14, img_size=96, feature_size=16)
    monai_count = sum(p.numel() for n, p in model.named_parameters() if "cross_attn" not in n)
    shapes = jax.eval_shape(lambda: UNETR(out_channels=14).init(jax.random.key(0), jnp.zeros((1, 96, 96, 96, 1))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert ours == monai_count == 92_784_046
