import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from medmae_jax.models import masking
from medmae_jax.models.mae import mae_loss


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
