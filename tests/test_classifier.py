"""ViTClassifier: shapes, gap vs cls pooling against a hand computation, gray -> RGB, head init, drop path."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medmae_jax.models.classifier import ViTClassifier
from medmae_jax.models.vit import ViT

ENC = dict(patch_size=(4, 4), width=24, depth=2, num_heads=3, mlp_dim=48)


def _shapes(model, x):
    """The param tree's structure and shapes, without running the model."""
    return nn.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x)))["params"]


def _init(model, x, seed=0):
    return nn.unbox(jax.jit(model.init)({"params": jax.random.key(seed)}, x))["params"]


def _random(model, x, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * scale, jnp.float32), _shapes(model, x))


def _layer_norm(x, scale, bias, eps=1e-6):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize("spatial,channels", [((16, 12), 1), ((8, 8, 12), 2)])
def test_logit_shapes_and_param_tree(spatial, channels):
    enc = dict(ENC, patch_size=(4,) * len(spatial))
    model = ViTClassifier(encoder=enc, num_classes=14)
    x = jnp.ones((3, *spatial, channels))
    params = _random(model, x)
    assert set(params) == {"encoder", "fc_norm", "head"}
    assert "norm" not in params["encoder"]["transformer"]  # gap + fc_norm: the encoder's final norm is off
    assert params["head"]["kernel"].shape == (24, 14)
    logits = jax.jit(model.apply)({"params": params}, x)
    assert logits.shape == (3, 14) and logits.dtype == jnp.float32
    cls_model = ViTClassifier(encoder=enc, num_classes=14, pooling="cls")
    cls_params = _shapes(cls_model, x)
    assert set(cls_params) == {"encoder", "head"} and "norm" in cls_params["encoder"]["transformer"]


@pytest.mark.parametrize("pooling", ["gap", "cls"])
def test_pooling_matches_a_hand_computation(pooling):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 16, 1)), jnp.float32)
    model = ViTClassifier(encoder=ENC, num_classes=5, pooling=pooling)
    params = _random(model, x)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, x))
    vit = ViT(**model.encoder_kwargs())
    tokens, _ = jax.jit(vit.apply)({"params": params["encoder"]}, x)
    tokens = np.asarray(tokens, np.float64)
    if pooling == "gap":
        pooled = _layer_norm(tokens[:, 1:].mean(1), params["fc_norm"]["scale"], params["fc_norm"]["bias"])
    else:
        pooled = tokens[:, 0]
    expected = pooled @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_gray_input_repeated_to_rgb_weights():
    gray = jnp.asarray(np.random.default_rng(1).random((2, 16, 16, 1)), jnp.float32)
    rgb = jnp.repeat(gray, 3, axis=-1)
    model = ViTClassifier(encoder=ENC, num_classes=3, repeat_gray_to_rgb=True)
    params = _random(model, gray)
    assert params["encoder"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 3, 24)  # ImageNet-style 3 channels
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(np.asarray(apply({"params": params}, gray)), np.asarray(apply({"params": params}, rgb)),
                               atol=1e-6)
    one_channel = ViTClassifier(encoder=ENC, num_classes=3)
    assert _shapes(one_channel, gray)["encoder"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 1, 24)


def test_head_init_and_tanh_post_activation():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 1)), jnp.float32)
    tiny = dict(ENC, depth=1)
    zero = ViTClassifier(encoder=tiny, num_classes=4, head_init_std=0.0)
    np.testing.assert_array_equal(np.asarray(_init(zero, x)["head"]["kernel"]), 0.0)
    small = _init(ViTClassifier(encoder=tiny, num_classes=4), x)
    assert 0 < np.abs(small["head"]["kernel"]).max() < 1e-4  # MAE fine-tuning's 2e-5 truncated normal
    plain = ViTClassifier(encoder=ENC, num_classes=4, pooling="cls")
    tanh = ViTClassifier(encoder=ENC, num_classes=4, pooling="cls", post_activation="tanh")
    params = _random(plain, x, scale=1.0)
    both = jax.jit(lambda p, x: (plain.apply({"params": p}, x), tanh.apply({"params": p}, x)))
    raw, squashed = both(params, x)
    assert np.abs(np.asarray(raw)).max() > 1.0  # the activation has something to do
    np.testing.assert_allclose(np.asarray(squashed), np.tanh(np.asarray(raw)), atol=1e-6)
    with pytest.raises(ValueError, match="post_activation"):
        ViTClassifier(encoder=ENC, num_classes=4, post_activation="relu").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cls_token"):
        ViTClassifier(encoder=dict(ENC, cls_token=False), num_classes=4, pooling="cls").init(jax.random.key(0), x)


def test_drop_path_only_in_training():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8, 8, 1)), jnp.float32)
    model = ViTClassifier(encoder=ENC, num_classes=2, drop_path=0.5)
    params = _random(model, x)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply({"params": params}, x, train=False)
    eval_b = apply({"params": params}, x, train=False)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = apply({"params": params}, x, train=True, rngs={"droppath": jax.random.key(0)})
    train_b = apply({"params": params}, x, train=True, rngs={"droppath": jax.random.key(1)})
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))
    assert model.encoder_kwargs()["drop_path"] == 0.5
