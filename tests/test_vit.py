import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medmae_jax.models.vit import ViT, parse_variant, patchify, sincos_position_table, unpatchify, vit_kwargs


def count_params(module, shape):
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(variables)))


def block_params(width, mlp, qkv_bias=True):
    qkv = width * 3 * width + (3 * width if qkv_bias else 0)
    return qkv + width * width + width + width * mlp + mlp + mlp * width + width + 4 * width


@pytest.mark.parametrize("shape,patch", [((2, 32, 48, 3), (8, 8)), ((2, 16, 24, 32, 2), (4, 8, 8)),
                                         ((1, 12, 12, 1), (4, 4))])
def test_patchify_round_trip(shape, patch):
    x = jax.random.normal(jax.random.key(0), shape)
    p = patchify(x, patch)
    grid = [s // q for s, q in zip(shape[1:-1], patch)]
    assert p.shape == (shape[0], math.prod(grid), math.prod(patch) * shape[-1])
    np.testing.assert_array_equal(np.asarray(unpatchify(p, patch, shape[1:-1], shape[-1])), np.asarray(x))


def test_patchify_order_is_row_major_grid_and_pqc_within_patch():
    x = np.arange(1 * 4 * 6 * 2, dtype=np.float32).reshape(1, 4, 6, 2)
    p = np.asarray(patchify(jnp.asarray(x), (2, 3)))
    # token 1 = grid cell (row 0, col 1): rows 0-1, cols 3-5; pixels in (p, q, c) order.
    np.testing.assert_array_equal(p[0, 1], x[0, 0:2, 3:6, :].reshape(-1))
    np.testing.assert_array_equal(p[0, 2], x[0, 2:4, 0:3, :].reshape(-1))


def test_vit_b16_2d_parameter_count_matches_timm():
    model = ViT(patch_size=(16, 16), **vit_kwargs("B/16"), pos_embed="learn", cls_token=True, final_norm=True)
    assert count_params(model, (1, 224, 224, 3)) == 85_798_656


def test_vit_b_3d_parameter_count():
    model = ViT(patch_size=(16, 16, 16), **vit_kwargs("B"), pos_embed="learn", cls_token=True)
    width, grid = 768, 6 ** 3
    expected = (16 ** 3 * 1 * width + width) + width + (grid + 1) * width + 12 * block_params(width, 3072) + 2 * width
    assert expected == 88_369_920
    assert count_params(model, (1, 96, 96, 96, 1)) == expected
    # MONAI's UNETR encoder: no cls token, qkv without bias -> 88,340,736 (REFERENCE.md).
    monai_like = ViT(patch_size=(16, 16, 16), **vit_kwargs("B"), pos_embed="learn", cls_token=False, qkv_bias=False)
    assert count_params(monai_like, (1, 96, 96, 96, 1)) == 88_340_736


def test_variant_parsing():
    assert parse_variant("B/16").patch_size == 16 and parse_variant("S").width == 384
    with pytest.raises(ValueError, match="unknown ViT variant"):
        parse_variant("X/16")


@pytest.mark.slow
def test_intermediates_and_shapes_2d_and_3d():
    for shape, patch in [((2, 32, 32, 1), (8, 8)), ((2, 16, 16, 16, 4), (8, 8, 8))]:
        model = ViT(patch_size=patch, width=48, depth=3, num_heads=3, mlp_dim=96)
        variables = model.init(jax.random.key(0), jnp.zeros(shape))
        out, inter = model.apply(variables, jnp.ones(shape))
        tokens = math.prod(s // p for s, p in zip(shape[1:-1], patch))
        assert out.shape == (2, tokens + 1, 48) and len(inter) == 3
        assert all(h.shape == out.shape for h in inter)


def test_keep_indices_select_tokens_after_position_table():
    # depth 0, no final norm: the output is the embedded tokens + table, so selection is checkable exactly.
    model = ViT(patch_size=(8, 8), width=48, depth=0, num_heads=3, mlp_dim=96, cls_token=True,
                pos_embed="sincos", final_norm=False)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    variables = model.init(jax.random.key(1), x)
    keep = jnp.array([[3, 0, 15], [7, 8, 1]])
    full, _ = model.apply(variables, x)
    part, _ = model.apply(variables, x, keep_indices=keep)
    assert part.shape == (2, 4, 48)
    np.testing.assert_allclose(np.asarray(part[:, 0]), np.asarray(full[:, 0]), atol=1e-6)  # cls first
    expected = np.take_along_axis(np.asarray(full[:, 1:]), np.asarray(keep)[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(part[:, 1:]), expected, atol=1e-6)


def test_sincos_tables_follow_mae_2d_layout():
    table = sincos_position_table((3, 4), 16)
    assert table.shape == (12, 16)
    # First half encodes the column, second half the row (official MAE get_2d_sincos_pos_embed).
    col_of = np.tile(np.arange(4), 3)
    row_of = np.repeat(np.arange(3), 4)
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    np.testing.assert_allclose(table[:, :4], np.sin(col_of[:, None] * omega), atol=1e-6)
    np.testing.assert_allclose(table[:, 12:], np.cos(row_of[:, None] * omega), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_position_table((2, 2, 2), 64)


def test_3d_table_follows_selfmedmae_axis_order():
    grid, dim = (2, 3, 4), 24
    coords = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    expected = np.concatenate([f(c.reshape(-1)[:, None] * omega) for c in coords for f in (np.sin, np.cos)], 1)
    np.testing.assert_allclose(sincos_position_table(grid, dim), expected, atol=1e-6)


@pytest.mark.parametrize("grid,dim", [((14, 14), 64), ((6, 6, 6), 96), ((4, 8, 2), 48)])
def test_sincos_tables_equal_monai(grid, dim):
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    from medmae_jax.models.vit import SINCOS_AXIS_ORDER
    ref = build_sincos_position_embedding(list(grid), dim, spatial_dims=len(grid)).detach().numpy()[0]
    order = SINCOS_AXIS_ORDER["monai"] if len(grid) == 3 else None
    np.testing.assert_allclose(sincos_position_table(grid, dim, axis_order=order), ref, atol=2e-5)


def test_bad_input_shape_is_a_clear_error():
    model = ViT(patch_size=(8, 8), width=48, depth=1, num_heads=3, mlp_dim=96)
    with pytest.raises(ValueError, match="divisible by patch"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 1)))
