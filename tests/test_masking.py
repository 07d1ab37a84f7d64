import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from medmae_jax.models import masking
from medmae_jax.models.mae import mae_loss, patch_targets, trivial_loss


@pytest.mark.parametrize("num_tokens,ratio", [(196, 0.75), (216, 0.75), (512, 0.9), (64, 0.5), (10, 0.33)])
def test_exact_keep_count_per_sample(num_tokens, ratio):
    m = jax.jit(masking.random_masking, static_argnums=(1, 2, 3))(jax.random.key(0), 16, num_tokens, ratio)
    keep = int(num_tokens * (1 - ratio))
    assert m.keep_indices.shape == (16, keep)
    np.testing.assert_array_equal(np.asarray(m.mask).sum(1), num_tokens - keep)
    # Each sample keeps distinct tokens, and those are exactly the unmasked ones.
    for b in range(16):
        kept = np.asarray(m.keep_indices[b])
        assert len(set(kept.tolist())) == keep
        np.testing.assert_array_equal(np.sort(kept), np.flatnonzero(np.asarray(m.mask[b]) == 0))


def test_restore_of_shuffle_is_identity():
    m = masking.random_masking(jax.random.key(3), 8, 100, 0.75)
    tokens = jnp.arange(8 * 100, dtype=jnp.float32).reshape(8, 100, 1)
    noise = jax.random.uniform(jax.random.key(3), (8, 100))
    shuffle = jnp.argsort(noise, axis=1)
    shuffled = masking.gather_tokens(tokens, shuffle)
    restored = masking.gather_tokens(shuffled, m.restore_indices)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(shuffle[:, :25]), np.asarray(m.keep_indices))


def test_masks_differ_between_samples_and_keys():
    a = masking.random_masking(jax.random.key(0), 4, 64, 0.75).mask
    b = masking.random_masking(jax.random.key(1), 4, 64, 0.75).mask
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_loss_sees_exactly_the_masked_tokens():
    key = jax.random.key(0)
    m = masking.random_masking(key, 4, 49, 0.75)
    pred = jax.random.normal(jax.random.key(1), (4, 49, 12))
    target = jax.random.normal(jax.random.key(2), (4, 49, 12))
    grad = jax.grad(mae_loss)(pred, target, m.mask)
    touched = np.asarray(jnp.abs(grad).sum(-1) > 0)
    np.testing.assert_array_equal(touched, np.asarray(m.mask) > 0)
    # Changing visible predictions leaves the loss unchanged.
    changed = jnp.where(m.mask[..., None] > 0, pred, pred + 100.0)
    np.testing.assert_allclose(float(mae_loss(changed, target, m.mask)), float(mae_loss(pred, target, m.mask)))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_trivial_loss_is_the_patch_mean_predictor(norm_pix):
    """norm-pix: mean of var / (var + eps) over masked patches (predicting zeros); raw: mean patch variance."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    images[0, :4, :4] = 0.5  # a flat patch: trivial loss 0 there
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    patches = images.reshape(2, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(2, 4, 16).astype(np.float64)
    var = patches.var(-1)
    per_patch = var / (var + 1e-6) if norm_pix else var
    expected = (per_patch * mask).sum() / mask.sum()
    target = patch_targets(jnp.asarray(images), (4, 4), norm_pix)
    np.testing.assert_allclose(float(trivial_loss(target, jnp.asarray(mask))), expected, rtol=1e-5)
    if norm_pix:  # and it is mae_loss of an all-zero prediction
        np.testing.assert_allclose(float(mae_loss(jnp.zeros_like(target), target, jnp.asarray(mask))), expected,
                                   rtol=1e-5)


def test_ratio_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="mask ratio"):
        masking.random_masking(jax.random.key(0), 2, 10, 1.0)


def test_same_masks_on_one_and_eight_devices(tmp_path):
    code = """
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from medmae_jax.models.masking import random_masking
    assert len(jax.devices()) == {n}
    mesh = jax.make_mesh(({n},), ("data",))
    out = NamedSharding(mesh, P("data"))
    fn = jax.jit(lambda k: random_masking(k, 16, 196, 0.75), out_shardings=out)
    m = fn(jax.random.key(42))
    assert len(m.mask.sharding.device_set) == {n}
    np.savez("{path}", mask=np.asarray(m.mask), keep=np.asarray(m.keep_indices), restore=np.asarray(m.restore_indices))
    """
    for n in (1, 8):
        run_python(code.format(n=n, path=tmp_path / f"m{n}.npz"), devices=n)
    one, eight = np.load(tmp_path / "m1.npz"), np.load(tmp_path / "m8.npz")
    for k in ("mask", "keep", "restore"):
        np.testing.assert_array_equal(one[k], eight[k])
