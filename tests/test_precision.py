"""Accelerator precision: 'auto' dtype per backend, float32 weight gradients under bfloat16 compute, named remat
policies, the attention implementation switch, and bfloat16 training that follows the float32 loss curve."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_pretrain_config

from medmae_jax.config_loading import load_config
from medmae_jax.errors import ConfigError
from medmae_jax.models import precision
from medmae_jax.models.vit import ViT


def test_auto_dtype_is_bfloat16_on_accelerators_only():
    assert precision.resolve_dtype("auto", "cpu") == jnp.float32
    assert precision.resolve_dtype("auto", "gpu") == jnp.bfloat16
    assert precision.resolve_dtype("auto", "tpu") == jnp.bfloat16
    assert precision.dtype_name("auto", "tpu") == "bfloat16"
    assert precision.resolve_dtype("float16") == jnp.float16
    assert precision.resolve_dtype("auto") == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        precision.resolve_dtype("fp8")


def test_float64_needs_x64_and_at_least_float32_keeps_it():
    with jax.enable_x64(False):
        with pytest.raises(ConfigError, match="'float64' needs 64-bit JAX"):
            precision.resolve_dtype("float64")
    for dtype, want in ((jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float32), (jnp.uint8, jnp.float32),
                        (jnp.float32, jnp.float32)):
        assert precision.at_least_float32(jnp.zeros(2, dtype)).dtype == want
    with jax.enable_x64(True):
        assert precision.resolve_dtype("float64") == jnp.float64
        assert precision.at_least_float32(jnp.zeros(2, jnp.float64)).dtype == jnp.float64
        assert precision.at_least_float32(jnp.zeros(2, jnp.bfloat16)).dtype == jnp.float32


def test_dropout_masks_are_flax_masks_and_do_not_depend_on_x64():
    key = {"dropout": jax.random.key(0)}
    x = jnp.ones((8, 5, 64))
    ours = precision.Dropout(0.3, broadcast_dims=(1,)).apply({}, x, deterministic=False, rngs=key)
    np.testing.assert_array_equal(ours, nn.Dropout(0.3, broadcast_dims=(1,)).apply({}, x, deterministic=False,
                                                                                   rngs=key))
    with jax.enable_x64(True):
        wide = precision.Dropout(0.3, broadcast_dims=(1,)).apply({}, jnp.ones((8, 5, 64), jnp.float64),
                                                                 deterministic=False, rngs=key)
        assert wide.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(wide) != 0, np.asarray(ours) != 0)


def test_every_paper_config_computes_in_auto_dtype():
    for name in ("cxr14_mae", "cxr14_finetune", "btcv_mae3d", "btcv_unetr", "brats_mae3d", "brats_unetr"):
        config = load_config(f"{REPO}/configs/{name}.py")
        assert config.model.dtype == "auto" and config.model.param_dtype == "float32", name


def test_attention_implementation_per_backend():
    assert precision.resolve_attention("auto", jnp.bfloat16, 64, "gpu") == "cudnn"
    assert precision.resolve_attention("auto", jnp.float32, 64, "gpu") is None      # cuDNN attention is 16-bit
    assert precision.resolve_attention("auto", jnp.bfloat16, 64, "tpu") is None
    assert precision.resolve_attention("auto", jnp.bfloat16, 60, "gpu") is None     # head dim not a multiple of 8
    assert precision.resolve_attention("xla", jnp.bfloat16, 64, "gpu") is None
    assert precision.resolve_attention("cudnn", jnp.float32, 64, "cpu") == "cudnn"  # explicit choice is kept
    with pytest.raises(ValueError, match="unknown attention"):
        precision.resolve_attention("flash", jnp.float32, 64)


@pytest.mark.parametrize("features,num_in_axes,x_shape", [(24, 1, (2, 5, 16)), ((3, 2, 8), 1, (2, 5, 16)),
                                                         (16, 2, (2, 5, 2, 8))])
def test_dense_equals_flax_dense_in_float32(features, num_in_axes, x_shape):
    """Same parameter tree, initial values and outputs as nn.Dense / nn.DenseGeneral: checkpoints are unaffected."""
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    ours = precision.Dense(features, num_in_axes=num_in_axes, kernel_init=nn.initializers.xavier_uniform())
    axis = tuple(range(-num_in_axes, 0))
    ref = nn.DenseGeneral(features, axis=axis, kernel_init=nn.initializers.xavier_uniform())
    p_ours, p_ref = ours.init(jax.random.PRNGKey(1), x), ref.init(jax.random.PRNGKey(1), x)
    jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)
    np.testing.assert_allclose(ours.apply(p_ours, x), ref.apply(p_ref, x), rtol=1e-6, atol=1e-6)


def _grads(module, params, x):
    return jax.grad(lambda p: jnp.sum(jnp.square(module.apply(p, x).astype(jnp.float32))))(params)


@pytest.mark.slow
def test_bfloat16_compute_gives_float32_weight_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 40, 64))
    mixed = precision.Dense((3, 4, 16), dtype=jnp.bfloat16)
    params = mixed.init(jax.random.PRNGKey(1), x)
    grads = _grads(mixed, params, x)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    # The weight gradient is produced by a matmul that accumulates in and returns float32 from bfloat16 inputs.
    jaxpr = str(jax.make_jaxpr(lambda p: _grads(mixed, p, x))(params))
    assert "f32[64,192] = dot_general" in jaxpr and "preferred_element_type=float32" in jaxpr
    # Closer to the float32 gradients than flax's bf16 path, which rounds the gradient to bfloat16 first.
    exact = _grads(precision.Dense((3, 4, 16)), params, x)
    plain = _grads(nn.DenseGeneral((3, 4, 16), dtype=jnp.bfloat16), params, x)

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    for name in ("kernel", "bias"):
        ours, theirs = rel(grads["params"][name], exact["params"][name]), rel(plain["params"][name],
                                                                               exact["params"][name])
        assert ours < 0.01 and ours < theirs, (name, ours, theirs)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable", True])
@pytest.mark.slow
def test_remat_policies_keep_the_gradients(policy):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    kw = dict(patch_size=(8, 8), width=32, depth=2, num_heads=2, mlp_dim=64)
    plain, remat = ViT(**kw), ViT(**kw, remat=policy)
    params = plain.init(jax.random.PRNGKey(1), x)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] ** 2)))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(remat), grads(plain))
    assert "remat" in str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(remat.apply(p, x)[0])))(params))


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
        precision.remat_policy_name("sometimes")
    assert precision.remat_policy_name(False) == "none" and precision.remat_policy_name("True") == "full"


def _loss_curve(config, workdir):
    from medmae_jax.train.trainer import train_and_evaluate
    return np.asarray(train_and_evaluate(config, str(workdir)).losses)


def _assert_follows(bf16, f32, tolerance=0.02):
    for part in (slice(0, 10), slice(-10, None)):
        ratio = bf16[part].mean() / f32[part].mean()
        assert abs(ratio - 1) <= tolerance, (part, bf16[part].mean(), f32[part].mean())
    assert bf16[-10:].mean() < bf16[:10].mean()  # and both learn


@pytest.mark.slow
def test_bfloat16_mae_follows_the_float32_loss_curve(tmp_path):
    curves = {}
    for name in ("float32", "bfloat16"):
        config = tiny_pretrain_config(2, steps=30)
        config.optimizer.base_lr, config.optimizer.warmup_steps = 0.05, 5
        config.eval_every_steps = -1
        config.model.dtype = name
        curves[name] = _loss_curve(config, tmp_path / name)
    _assert_follows(curves["bfloat16"], curves["float32"])


@pytest.mark.slow
def test_bfloat16_unetr_follows_the_float32_loss_curve(tmp_path):
    curves = {}
    for name in ("float32", "bfloat16"):
        config = load_config(f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic")
        config.num_train_steps, config.batch_size, config.data.num_eval = 24, 1, 1
        config.checkpoint.async_save = False
        config.eval_every_steps = -1
        config.model.dtype = name
        curves[name] = _loss_curve(config, tmp_path / name)
    _assert_follows(curves["bfloat16"], curves["float32"])
