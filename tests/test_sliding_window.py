"""Sliding-window inference in JAX alone: identity, shapes, coverage, jit behaviour, the flax wrapper."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medmae_jax.evaluate import sliding_window as sw


def _cache_size() -> int:
    """Compiled variants of the blending program (-1 where this JAX has no such counter)."""
    return sw.compiled_variants()


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape,roi", [((2, 23, 17, 9, 2), (8, 8, 8)),   # 3-D, not divisible
                                       ((1, 5, 6, 3, 1), (8, 8, 4)),      # smaller than the roi (padding)
                                       ((3, 30, 21, 3), (16, 8))])        # 2-D
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_identity_predictor_returns_input(shape, roi, mode):
    x = _x(shape)
    out = sw.sliding_window_inference(x, lambda w: w, roi, sw_batch_size=4, overlap=0.5, mode=mode)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), x, rtol=1e-5, atol=1e-6)


def test_plan_covers_every_voxel_and_stays_inside():
    for image, roi, ov in [((23, 17, 9), (8, 8, 8), 0.25), ((5, 40), (8, 8), 0.5), ((96, 96, 96), (96, 96, 96), 0.5)]:
        plan = sw.window_plan(image, roi, ov)
        cover = np.zeros(plan.padded_size, int)
        for s in plan.starts:
            assert np.all(s >= 0) and np.all(s + np.array(plan.roi_size) <= plan.padded_size)
            cover[tuple(slice(a, a + r) for a, r in zip(s, plan.roi_size))] += 1
        assert cover.min() >= 1
        assert plan.padded_size == tuple(max(a, b) for a, b in zip(image, roi))
    assert sw.window_plan((96, 96, 96), 96, 0.5).num_windows == 1
    plan = sw.window_plan((100, 50), (None, -1), 0.5)          # None / non-positive -> whole axis
    assert plan.roi_size == (100, 50) and plan.num_windows == 1


def test_output_channels_and_window_batches():
    x = _x((2, 19, 13, 2))
    seen = []

    def predictor(w):
        seen.append(w.shape)                  # traced once: the window batch shape
        return jnp.concatenate([w, w[..., :1] * 2, jnp.ones_like(w[..., :1])], axis=-1)

    out = sw.sliding_window_inference(x, predictor, (8, 8), sw_batch_size=5, overlap=0.25)
    assert out.shape == (2, 19, 13, 4)
    assert all(s == (5, 8, 8, 2) for s in seen)
    np.testing.assert_allclose(np.asarray(out[..., 2]), 2 * x[..., 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out[..., 3]), 1.0, rtol=1e-6)


def test_position_dependent_predictor_blends_windows():
    """Output = mean over the windows covering a voxel of each window's own value (constant mode)."""
    x = np.zeros((1, 20, 9, 1), np.float32)
    plan = sw.window_plan((20, 9), (8, 9), 0.5)
    out = np.asarray(sw.sliding_window_inference(x, lambda w: w + jnp.arange(8.0)[None, :, None, None], (8, 9),
                                                 overlap=0.5))
    acc, cnt = np.zeros((20, 9)), np.zeros((20, 9))
    for s in plan.starts:
        acc[s[0]:s[0] + 8] += np.arange(8.0)[:, None]
        cnt[s[0]:s[0] + 8] += 1
    np.testing.assert_allclose(out[0, ..., 0], acc / cnt, rtol=1e-6)


def test_inside_outer_jit_and_predictor_args():
    x = _x((1, 17, 15, 11, 1))
    w = jnp.asarray(_x((1, 3), seed=1))

    def predictor(win, weight):
        return jnp.tanh(win @ weight) + jnp.cumsum(win, axis=1)

    eager = sw.sliding_window_inference(x, predictor, (8, 8, 8), sw_batch_size=3, predictor_args=(w,),
                                        mode="gaussian")
    jitted = jax.jit(lambda v, weight: sw.sliding_window_inference(v, lambda win: predictor(win, weight),
                                                                   (8, 8, 8), sw_batch_size=3, mode="gaussian"))
    np.testing.assert_allclose(np.asarray(jitted(x, w)), np.asarray(eager), rtol=1e-6, atol=1e-6)
    # new predictor_args values reuse the compiled program
    before = _cache_size()
    sw.sliding_window_inference(x, predictor, (8, 8, 8), sw_batch_size=3, predictor_args=(w * 2,), mode="gaussian")
    assert _cache_size() == before


class _TinySeg(nn.Module):
    classes: int = 3

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Conv(self.classes, (3, 3, 3))(x)


def test_predict_volume_flax_wrapper():
    model = _TinySeg()
    x = _x((1, 14, 12, 10, 1))
    variables = model.init(jax.random.key(0), x[:, :8, :8, :8])
    probs = sw.predict_volume(model.apply, variables, x, (8, 8, 8), sw_batch_size=2, activation="softmax",
                              deterministic=True)
    logits = sw.sliding_window_inference(x, lambda w: model.apply(variables, w), (8, 8, 8), sw_batch_size=2,
                                         overlap=0.5)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(logits, -1)), rtol=1e-5, atol=1e-6)
    labels = sw.predict_volume(model.apply, variables, x[0], (8, 8, 8), activation="softmax", argmax=True)
    assert labels.shape == x.shape[1:-1] and labels.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(jnp.argmax(probs[0], -1)))
    masks = sw.predict_volume(model.apply, variables, x, (8, 8, 8), activation="sigmoid", threshold=0.5)
    assert masks.dtype == jnp.uint8 and masks.shape == x.shape[:-1] + (3,)
    # new parameters: same compiled program
    before = _cache_size()
    sw.predict_volume(model.apply, jax.tree.map(lambda a: -a, variables), x, (8, 8, 8), sw_batch_size=2,
                      activation="softmax", deterministic=True)
    assert _cache_size() == before


def test_gaussian_map_shape_and_floor():
    w = sw.importance_map((16, 12, 8), "gaussian")
    assert w.shape == (16, 12, 8) and w.dtype == np.float32
    # even sizes: the peak sits half a voxel from the centre on each axis; sigma = 0.125 * size
    peak = np.prod([np.exp(-0.5 * (0.5 / (0.125 * r)) ** 2) for r in (16, 12, 8)])
    assert w.max() == pytest.approx(peak, rel=1e-6)
    corner = np.prod([np.exp(-0.5 * ((r - 1) / 2 / (0.125 * r)) ** 2) for r in (16, 12, 8)])
    assert corner < 1e-3 and w.min() == pytest.approx(1e-3)      # MONAI's floor
    np.testing.assert_array_equal(sw.importance_map((4, 4), "constant"), np.ones((4, 4), np.float32))


def test_memory_estimate_for_a_whole_ct():
    est = sw.memory_estimate(1, (512, 512, 200), 1, 14, (96, 96, 96), sw_batch_size=4)
    assert est["accumulator"] == 512 * 512 * 200 * 14 * 4
    assert est["total"] < 8 * 2**30


def test_bad_arguments():
    x = _x((1, 8, 8, 1))
    with pytest.raises(ValueError, match="overlap"):
        sw.sliding_window_inference(x, lambda w: w, (4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        sw.sliding_window_inference(x, lambda w: w, (4, 4), mode="triangle")
    with pytest.raises(ValueError, match="roi_size"):
        sw.sliding_window_inference(x, lambda w: w, (4, 4, 4))
    with pytest.raises(ValueError, match="channels-last"):
        sw.sliding_window_inference(x[0], lambda w: w, (4, 4))
    with pytest.raises(ValueError, match="same window size"):
        sw.sliding_window_inference(x, lambda w: w[:, ::2], (4, 4))
    with pytest.raises(ValueError, match="roi_weight_map"):
        sw.sliding_window_inference(x, lambda w: w, (4, 4), roi_weight_map=np.ones((3, 3)))
