"""model.scan_blocks: one nn.scan over the Transformer blocks, seen from outside in the unrolled parameter layout.

Checkpoints, fine-tuning initialisation and PyTorch conversion read ``transformer/block_i``; the scanned stack must
store, initialise and differentiate exactly that tree, and compute what the unrolled stack computes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medmae_jax.models.mae import MAE
from medmae_jax.models.unetr import UNETR
from medmae_jax.models.vit import ViT

TINY = dict(width=48, depth=3, num_heads=2, mlp_dim=64)  # 48: a 3-D sin-cos table needs width % 6 == 0


def _boxed_layout(variables):
    """Paths, shapes and logical axis names of a (boxed) variable tree."""
    leaves = jax.tree_util.tree_leaves_with_path(variables, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return {jax.tree_util.keystr(path): (np.shape(nn.meta.unbox(leaf)), getattr(leaf, "names", None))
            for path, leaf in leaves}


def _max_rel(a, b):
    return max(float(jnp.abs(x - y).max() / (jnp.abs(x).max() + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("spatial,patch", [((16, 16), (4, 4)), ((8, 8, 8), (4, 4, 4))])
@pytest.mark.slow
def test_vit_scanned_equals_unrolled_in_layout_outputs_and_gradients(spatial, patch):
    x = jax.random.normal(jax.random.key(1), (2, *spatial, 2))
    unrolled, scanned = ViT(patch, **TINY), ViT(patch, **TINY, scan_blocks=True)
    v_unrolled, v_scanned = unrolled.init(jax.random.key(0), x), scanned.init(jax.random.key(0), x)
    layout = _boxed_layout(v_unrolled)
    assert "['params']['transformer']['block_2']['mlp']['fc1']['kernel']" in {k.replace('"', "'") for k in layout}
    assert _boxed_layout(v_scanned) == layout   # same paths, shapes and partition names: one checkpoint format
    params = nn.unbox(v_unrolled)
    (out_u, inter_u), (out_s, inter_s) = unrolled.apply(params, x), scanned.apply(params, x)
    np.testing.assert_allclose(out_s, out_u, atol=1e-5)
    assert len(inter_s) == len(inter_u) == TINY["depth"]
    for a, b in zip(inter_s, inter_u):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # A random projection, not sum(out**2): the final LayerNorm makes that constant and its gradient rounding noise.
    probe = jax.random.normal(jax.random.key(2), out_u.shape)
    grad = lambda model: jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] * probe))(params)  # noqa: E731
    assert _max_rel(grad(scanned), grad(unrolled)) < 1e-4


def test_scanned_training_uses_per_layer_drop_path():
    x = jnp.ones((64, 16, 16, 1))
    model = ViT((4, 4), **TINY, drop_path=0.5, scan_blocks=True)
    params = nn.unbox(model.init(jax.random.key(0), x))
    out, inter = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(1), "droppath": jax.random.key(2)})
    det, _ = model.apply(params, x)
    # Block 0 has rate 0 (linear schedule): identical to the deterministic pass; the last block drops examples.
    np.testing.assert_allclose(inter[0], model.apply(params, x, method=lambda m, x: m(x)[1][0]), atol=1e-6)
    assert not np.allclose(out, det)
    assert np.all(np.isfinite(out))


@pytest.mark.slow
def test_mae_with_scanned_encoder_and_decoder_loads_unrolled_parameters():
    encoder = dict(patch_size=(4, 4), **TINY)
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 1))
    unrolled = MAE(encoder=encoder, decoder_width=16, decoder_depth=2, decoder_heads=2)
    scanned = MAE(encoder={**encoder, "scan_blocks": True}, decoder_width=16, decoder_depth=2, decoder_heads=2)
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(4)}
    v_unrolled = unrolled.init(rngs, images)
    assert _boxed_layout(scanned.init(rngs, images)) == _boxed_layout(v_unrolled)
    params = nn.unbox(v_unrolled)
    pred_u, _ = unrolled.apply(params, images, rngs={"masking": jax.random.key(5)})
    pred_s, _ = scanned.apply(params, images, rngs={"masking": jax.random.key(5)})
    np.testing.assert_allclose(pred_s, pred_u, atol=1e-5)


@pytest.mark.slow
def test_unetr_with_scanned_encoder_matches_unrolled():
    enc = dict(patch_size=16, width=32, depth=4, num_heads=2, mlp_dim=64)
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
    unrolled = UNETR(out_channels=3, encoder=enc, feature_size=8, skip_layers=(0, 1, 2))
    scanned = UNETR(out_channels=3, encoder={**enc, "scan_blocks": True}, feature_size=8, skip_layers=(0, 1, 2))
    v_unrolled = unrolled.init(jax.random.key(0), x)
    assert _boxed_layout(scanned.init(jax.random.key(0), x)) == _boxed_layout(v_unrolled)
    params = nn.unbox(v_unrolled)
    np.testing.assert_allclose(scanned.apply(params, x), unrolled.apply(params, x), atol=1e-4)
