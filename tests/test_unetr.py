"""UNETR model (JAX only) and the torch-free side of the MONAI UNETR weight exchange."""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medmae_jax.errors import ConversionError
from medmae_jax.interop.monai_unetr import infer_monai_unetr_config, jax_to_monai_unetr, monai_unetr_to_jax
from medmae_jax.models.unetr import MONAI_SKIP_LAYERS, PAPER_SKIP_LAYERS, UNETR, ResBlock, UpConv, instance_norm
from medmae_jax.tasks.segmentation.losses import dice_ce_loss

TINY = dict(width=32, depth=4, num_heads=2, mlp_dim=64)  # skips 3/6/9 need depth 10; tests pass their own


def _tiny(out_channels=3, skips=(0, 1, 2), **kw):
    return UNETR(out_channels=out_channels, encoder=dict(TINY, **kw.pop("encoder", {})), feature_size=8,
                 skip_layers=skips, **kw)


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _normal(shape, seed=0):
    # numpy draws: a jax.random draw of a 4-/5-D shape costs ~2 s of XLA:CPU compile time.
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _random_params(model, x, seed=0):
    """Parameters of the right shapes drawn with numpy: compiling ``init`` (dozens of random draws) is slow on CPU."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]

    def draw(s):
        fan_in = math.prod(s.shape[:-1]) or 1
        return (rng.standard_normal(s.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(draw, shapes)


@pytest.fixture(scope="module")
def tiny3d():
    model = _tiny()
    x = _normal((2, 32, 48, 16, 2), 1)
    return model, _random_params(model, x), x


@pytest.fixture(scope="module")
def tiny3d_out(tiny3d):
    model, params, x = tiny3d
    return jax.jit(model.apply)({"params": params}, x)


def test_vit_b_parameter_count():
    # MONAI's UNETR for BTCV (96^3, 1 -> 14 classes, feature 16, ViT-B/16), shapes only.
    shapes = jax.eval_shape(lambda: UNETR(out_channels=14).init(jax.random.key(0), jnp.zeros((1, 96, 96, 96, 1))))
    params = nn.unbox(shapes)["params"]
    assert _count(params) == 92_784_046
    assert _count(params["vit"]) == 88_340_736
    assert "cls_token" not in params["vit"] and "bias" not in params["vit"]["transformer"]["block_0"]["attn"]["qkv"]


def test_output_shapes_3d_and_2d(tiny3d_out):
    y = tiny3d_out
    assert y.shape == (2, 32, 48, 16, 3) and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    model2d = _tiny(out_channels=4, encoder=dict(patch_embed="perceptron"))
    x2 = _normal((2, 64, 32, 3), 2)
    y2 = jax.jit(model2d.apply)({"params": _random_params(model2d, x2)}, x2)
    assert y2.shape == (2, 64, 32, 4) and np.all(np.isfinite(np.asarray(y2)))


def test_kernels_carry_logical_axis_names(tiny3d):
    model, _, x = tiny3d
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]
    names = {"/".join(str(k.key) for k in path): leaf.names for path, leaf in flat}
    assert all(isinstance(leaf, nn.Partitioned) for _, leaf in flat)
    assert names["decoder5/transp_conv/kernel"] == (None, None, None, "embed", None)
    assert names["encoder2/blocks_0_transp_conv/kernel"] == (None,) * 5
    assert names["decoder2/conv_block/conv1/kernel"] == (None,) * 5
    assert names["vit/transformer/block_0/mlp/fc1/kernel"] == ("embed", "mlp")


def test_skip_layers_select_blocks(tiny3d, tiny3d_out):
    _, params, x = tiny3d
    other = jax.jit(_tiny(skips=(1, 2, 3)).apply)({"params": params}, x)  # same parameters, other skips
    assert np.abs(np.asarray(tiny3d_out - other)).max() > 1e-3
    assert MONAI_SKIP_LAYERS == (3, 6, 9) and PAPER_SKIP_LAYERS == (2, 5, 8)
    with pytest.raises(ValueError, match="skip_layers"):
        _tiny(skips=(3, 6, 9)).init(jax.random.key(0), x)  # depth 4


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="patch size 16"):
        _tiny(encoder=dict(patch_size=8)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 32, 1)))
    with pytest.raises(ValueError, match="divisible"):
        _tiny().init(jax.random.key(0), jnp.zeros((1, 32, 40, 32, 1)))
    with pytest.raises(ValueError, match="channels-last"):
        _tiny().init(jax.random.key(0), jnp.zeros((32, 32, 1)))


def test_dropout_and_drop_path_only_in_training():
    shallow = dict(encoder=dict(depth=2, drop_path=0.3), skips=(0, 1, 1))  # 2-D, 2 blocks: few draws to compile
    # The UNETR fields override the encoder dict (each random draw costs seconds of CPU compile: run drop path only).
    kw = _tiny(dropout=0.2, attn_dropout=0.1, **shallow).encoder_kwargs(2)
    assert (kw["dropout"], kw["attn_dropout"], kw["drop_path"], kw["patch_size"]) == (0.2, 0.1, 0.3, (16, 16))
    base, reg = _tiny(drop_path=0.0, **shallow), _tiny(drop_path=0.5, **shallow)
    x = _normal((2, 32, 32, 1), 3)
    params = _random_params(base, x)

    @jax.jit
    def train_apply(seed):
        rngs = {"dropout": jax.random.key(seed), "droppath": jax.random.key(seed + 1)}
        return reg.apply({"params": params}, x, train=True, rngs=rngs)

    eval_out = jax.jit(reg.apply)({"params": params}, x)
    np.testing.assert_allclose(eval_out, jax.jit(base.apply)({"params": params}, x), atol=1e-6)
    a, b = train_apply(0), train_apply(2)
    assert np.abs(np.asarray(a - eval_out)).max() > 1e-4 and np.abs(np.asarray(a - b)).max() > 1e-4


def test_up_conv_is_a_transposed_conv():
    """UpConv == lax.conv_transpose (kernel 2, stride 2) with the spatial axes of the kernel flipped."""
    x = _normal((2, 3, 4, 2, 5), 0)
    layer = UpConv(6)
    kernel = np.random.default_rng(0).standard_normal((2, 2, 2, 5, 6)).astype(np.float32)
    variables = {"params": {"kernel": kernel}}
    want = jax.lax.conv_transpose(x, jnp.flip(kernel, (0, 1, 2)), (2, 2, 2), "VALID",
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(layer.apply(variables, x), want, atol=1e-5)


def test_instance_norm_matches_flax():
    x = 3.0 + 2.0 * _normal((2, 4, 6, 5, 3), 0)
    ref = nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=False)
    np.testing.assert_allclose(instance_norm(x, 1e-5), ref.apply({}, x), atol=1e-5)


def test_bfloat16_compute():
    """bfloat16 compute, float32 storage (shapes and dtypes only: tracing checks the plumbing)."""
    model = _tiny(dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 32, 32, 16, 1), jnp.float32)
    y, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 32, 32, 16, 3)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))


def test_float64_mode_gives_float64_gradients_that_agree_with_float32():
    """Norms and losses compute in at least float32: float32 stays float32, float64 stays float64 (the gradients
    check's mode), and both give the same gradients to float32 rounding."""
    model = UNETR(out_channels=3, encoder=dict(TINY, depth=1), feature_size=4, skip_layers=(0, 0, 0))
    x = _normal((2, 16, 16, 1), 2)
    labels = np.random.default_rng(3).integers(0, 3, (2, 16, 16))

    def loss(model, p, x):
        return dice_ce_loss(model.apply({"params": p}, x), labels[:, :x.shape[1], :x.shape[2]])[0]

    params = _random_params(model, x, 4)
    # The whole UNETR by tracing (dtypes only); the numbers on one residual block + the loss (compiles in seconds).
    assert {g.dtype for g in jax.tree.leaves(jax.eval_shape(jax.grad(partial(loss, model)), params, x))} == {
        jnp.dtype(jnp.float32)}
    block = ResBlock(3)
    bx = _normal((2, 8, 8, 4), 5)
    bparams = _random_params(block, bx, 6)
    g32 = jax.jit(jax.grad(partial(loss, block)))(bparams, bx)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g32))
    with jax.enable_x64(True):
        m64, b64 = (m.clone(dtype=jnp.float64, param_dtype=jnp.float64) for m in (model, block))
        p64, bp64, x64, bx64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, bparams, x, bx))
        assert jax.eval_shape(partial(m64.apply, {"params": p64}), x64).dtype == jnp.float64
        assert {g.dtype for g in jax.tree.leaves(jax.eval_shape(jax.grad(partial(loss, m64)), p64, x64))} == {
            jnp.dtype(jnp.float64)}
        g64 = jax.jit(jax.grad(partial(loss, b64)))(bp64, bx64)
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(g64))
        g64 = jax.tree.map(np.asarray, g64)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b)))


# --------------------------------------------------------------------------
# Weight exchange without torch: JAX -> MONAI layout -> JAX.
# --------------------------------------------------------------------------
def test_round_trip_through_monai_layout(tiny3d):
    _, params, x = tiny3d
    sd = jax_to_monai_unetr({"params": params})
    assert sd["encoder1.layer.conv1.conv.weight"].shape == (8, 2, 3, 3, 3)        # (out, in, k, k, k)
    assert sd["decoder5.transp_conv.conv.weight"].shape == (32, 64, 2, 2, 2)      # (in, out, k, k, k)
    assert sd["vit.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["vit.patch_embedding.position_embeddings"].shape == (1, 6, 32)
    assert len([k for k in sd if "norm_cross_attn" in k]) == 2 * TINY["depth"]
    config = infer_monai_unetr_config(sd, num_heads=2, img_size=(32, 48, 16))
    assert (config.in_channels, config.out_channels, config.feature_size, config.hidden_size, config.num_layers,
            config.proj_type, config.qkv_bias, config.img_size) == (2, 3, 8, 32, 4, "conv", False, (32, 48, 16))
    back, report = monai_unetr_to_jax(sd, config=config, strict=True)
    assert report.clean and len(report.ignored) == 2 * TINY["depth"]
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    # The inferred config rebuilds the same architecture (same parameter names and shapes).
    rebuilt = UNETR(**config.unetr_kwargs(), skip_layers=(0, 1, 2))
    shapes = nn.unbox(jax.eval_shape(rebuilt.init, jax.random.key(0), x))["params"]
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, params)


def test_conversion_errors(tiny3d):
    _, params, _ = tiny3d
    sd = jax_to_monai_unetr(params, cross_attn_keys="none")
    with pytest.raises(ConversionError, match="pass img_size"):       # 6 patches: not a cube
        infer_monai_unetr_config(sd, num_heads=2)
    with pytest.raises(ConversionError, match="pass num_heads"):      # width 32: no standard head count
        infer_monai_unetr_config(sd, img_size=(32, 48, 16))
    bad = dict(sd, **{"out.conv.conv.bias": np.zeros(5, np.float32)})
    with pytest.raises(ConversionError, match=r"out\.conv\.conv\.bias.*\(5,\).*\(3,\)"):
        monai_unetr_to_jax(bad, num_heads=2, img_size=(32, 48, 16))
    partial = {k: v for k, v in sd.items() if k != "decoder3.conv_block.conv2.conv.weight"}
    got, report = monai_unetr_to_jax(partial, num_heads=2, img_size=(32, 48, 16))
    assert report.missing == ["decoder3.conv_block.conv2.conv.weight"] and "conv2" not in got["decoder3"]["conv_block"]
    with pytest.raises(ConversionError, match="strict"):
        monai_unetr_to_jax(partial, num_heads=2, img_size=(32, 48, 16), strict=True)
    with pytest.raises(ConversionError, match="MONAI UNETR state dict"):
        monai_unetr_to_jax({"encoder.weight": np.zeros(3)})


def test_cls_token_encoder_runs_but_cannot_export():
    model = _tiny(encoder=dict(cls_token=True, pos_embed="sincos"))  # an MAE-style encoder kept as is
    x = _normal((1, 32, 48, 1), 0)
    params = _random_params(model, x)
    assert params["vit"]["cls_token"].shape == (1, 1, 32)
    y = jax.jit(model.apply)({"params": params}, x)
    assert y.shape == (1, 32, 48, 3) and np.all(np.isfinite(np.asarray(y)))
    with pytest.raises(ConversionError, match="cls token"):
        jax_to_monai_unetr({"params": params})
