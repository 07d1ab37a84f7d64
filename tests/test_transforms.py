"""Numpy 3-D transforms: ranges, statistics, crop geometry, seeded randomness, exact permutations."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats

from medmae_jax.data import transforms as T


def _blob_volume(shape=(40, 36, 30), box=((12, 24), (10, 20), (8, 18)), channels=1, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.1, 1.0, size=shape + (channels,)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(a, b) for a, b in box)] = 1
    return image, label


def test_rng_for_is_a_function_of_seed_epoch_index():
    a = T.rng_for(3, 1, 7).random(5)
    assert np.array_equal(a, T.rng_for(3, 1, 7).random(5))
    for other in [(4, 1, 7), (3, 2, 7), (3, 1, 8)]:
        assert not np.array_equal(a, T.rng_for(*other).random(5))
    with pytest.raises(ValueError):
        T.rng_for(-1, 0, 0)


def test_scale_intensity_range_matches_clipped_interpolation():
    x = np.linspace(-1200, 1500, 1001)
    out = T.scale_intensity_range(x, -175, 250, 0.0, 1.0, clip=True)
    np.testing.assert_allclose(out, np.interp(x, [-175, 250], [0, 1]), atol=1e-6)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    unclipped = T.scale_intensity_range(x, -175, 250, clip=False)
    np.testing.assert_allclose(unclipped, (x + 175) / 425, rtol=1e-5, atol=1e-5)


def test_normalize_nonzero_per_channel_stats():
    rng = np.random.default_rng(1)
    x = rng.normal([5.0, -3.0, 100.0], [2.0, 0.5, 30.0], size=(20, 18, 16, 3)).astype(np.float32)
    x[rng.random((20, 18, 16)) < 0.4] = 0.0  # background in every channel
    x[..., 1][:3] = 0.0
    out = T.normalize_nonzero(x)
    for c in range(3):
        nz = x[..., c] != 0
        assert np.all(out[..., c][~nz] == 0)
        expected = scipy.stats.zscore(x[..., c][nz].astype(np.float64))  # population std, like MONAI
        np.testing.assert_allclose(out[..., c][nz], expected, atol=1e-5)
    # a constant channel: std 0 counts as 1, so values become 0 without NaN
    const = np.where(x != 0, 7.0, 0.0).astype(np.float32)
    assert np.all(np.isfinite(T.normalize_nonzero(const)))
    assert np.allclose(T.normalize_nonzero(const), 0.0)


def test_foreground_box_matches_find_objects():
    image, label = _blob_volume(channels=2)
    image[:] = 0
    image[5:9, 7:30, 3:4, 1] = 0.5
    image[20, 2, 25, 0] = 0.1
    start, stop = T.foreground_box(image)
    (sl,) = ndi.find_objects((image > 0).any(-1).astype(np.uint8))
    assert start == tuple(s.start for s in sl) and stop == tuple(s.stop for s in sl)
    m_start, m_stop = T.foreground_box(image, margin=3)
    assert m_start == tuple(max(s.start - 3, 0) for s in sl)
    assert m_stop == tuple(min(s.stop + 3, n) for s, n in zip(sl, image.shape))
    cropped, lab, box = T.crop_foreground(image, label)
    assert cropped.shape[:3] == lab.shape == tuple(b - a for a, b in zip(start, stop)) and box == (start, stop)
    empty = np.zeros((4, 5, 6))
    assert T.foreground_box(empty) == ((0, 0, 0), (4, 5, 6))


def test_crops_have_roi_shape_and_content_and_replay():
    image, label = _blob_volume(channels=2)
    image[..., 1] = np.arange(label.size).reshape(label.shape)  # index-coded channel locates each crop
    roi = (16, 12, 10)
    imgs, labs = T.rand_crop_by_pos_neg_label(T.rng_for(0, 0, 5), image, label, roi, num_samples=6)
    assert imgs.shape == (6,) + roi + (2,) and labs.shape == (6,) + roi
    for im, lb in zip(imgs, labs):
        start = np.unravel_index(int(im[0, 0, 0, 1]), label.shape)
        sl = tuple(slice(s, s + r) for s, r in zip(start, roi))
        assert np.array_equal(im, image[sl]) and np.array_equal(lb, label[sl])
    again = T.rand_crop_by_pos_neg_label(T.rng_for(0, 0, 5), image, label, roi, num_samples=6)
    assert np.array_equal(again[0], imgs) and np.array_equal(again[1], labs)
    other = T.rand_crop_by_pos_neg_label(T.rng_for(0, 1, 5), image, label, roi, num_samples=6)
    assert not np.array_equal(other[0], imgs)


def test_pos_neg_ratio_holds_statistically():
    image, label = _blob_volume()
    n, pos, neg = 4000, 1.0, 3.0
    centers, positive = T.pos_neg_crop_centers(T.rng_for(1, 0, 0), label, (4, 4, 4), n, pos=pos, neg=neg, image=image)
    on_fg = label[tuple(centers.T)] > 0  # small ROI: no centre needs moving, so the centre voxel tells
    assert np.array_equal(on_fg, positive)
    p = pos / (pos + neg)
    assert scipy.stats.binomtest(int(on_fg.sum()), n, p).pvalue > 1e-4
    # no foreground at all: every crop centres on background, as in MONAI
    centers, positive = T.pos_neg_crop_centers(T.rng_for(1, 0, 1), np.zeros_like(label), (4, 4, 4), 50, image=image)
    assert not positive.any()


def test_crop_centres_are_moved_inside_and_small_volumes_padded():
    label = np.zeros((10, 10, 10), np.uint8)
    label[0, 0, 0] = 1
    centers, _ = T.pos_neg_crop_centers(T.rng_for(0, 0, 0), label, (6, 5, 4), 20, pos=1, neg=0)
    assert np.all(centers == [3, 2, 2])  # roi // 2: the crop starts at the corner
    small_img = np.ones((5, 20, 3, 1), np.float32)
    small_lab = np.zeros((5, 20, 3), np.uint8)
    small_lab[2, 10, 1] = 1
    imgs, labs = T.rand_crop_by_pos_neg_label(T.rng_for(0, 0, 0), small_img, small_lab, (8, 8, 8), num_samples=3)
    assert imgs.shape == (3, 8, 8, 8, 1) and labs.shape == (3, 8, 8, 8)
    assert labs.sum() == 3  # the positive voxel is inside every (positive) crop
    padded, before = T.pad_to_shape(small_img, (8, 8, 8))
    assert padded.shape == (8, 20, 8, 1) and before == (1, 0, 2)
    assert padded.sum() == small_img.sum()


def test_flips_and_rot90_are_exact_permutations_applied_alike():
    x = np.arange(6 * 6 * 4 * 2, dtype=np.float32).reshape(6, 6, 4, 2)
    lab = np.arange(6 * 6 * 4).reshape(6, 6, 4)
    fx, fl = T.random_flip(T.rng_for(0, 0, 0), [x, lab], prob=1.0)
    assert np.array_equal(fx, x[::-1, ::-1, ::-1]) and np.array_equal(fl, lab[::-1, ::-1, ::-1])
    same = T.random_flip(T.rng_for(0, 0, 0), [x, lab], prob=0.0)
    assert same[0] is x and same[1] is lab
    seen = set()
    for i in range(40):
        rx, rl = T.random_rot90(T.rng_for(0, 0, i), [x, lab], prob=1.0)
        k = next(k for k in (1, 2, 3) if np.array_equal(rl, np.rot90(lab, k, axes=(0, 1))))
        assert np.array_equal(rx, np.rot90(x, k, axes=(0, 1)))
        assert np.array_equal(np.sort(rx, axis=None), np.sort(x, axis=None))
        seen.add(k)
    assert seen == {1, 2, 3}
    # a random mix of flips: still a permutation of the same voxels, identical for image and label
    for i in range(10):
        mx, ml = T.random_flip(T.rng_for(2, 0, i), [x, lab], prob=0.5)
        assert np.array_equal(mx[..., 0], x[..., 0].reshape(-1)[ml.reshape(-1)].reshape(ml.shape))


def test_intensity_scale_and_shift_ranges():
    x = np.full((4, 4, 4, 1), 2.0, np.float32)
    factors = [T.random_scale_intensity(T.rng_for(0, 0, i), x, 0.1, prob=1.0)[0, 0, 0, 0] / 2.0 - 1 for i in range(200)]
    offsets = [T.random_shift_intensity(T.rng_for(0, 0, i), x, 0.1, prob=1.0)[0, 0, 0, 0] - 2.0 for i in range(200)]
    for v in (factors, offsets):
        v = np.asarray(v)
        assert v.min() >= -0.1 - 1e-6 and v.max() <= 0.1 + 1e-6 and v.min() < -0.05 and v.max() > 0.05
    assert T.random_scale_intensity(T.rng_for(0, 0, 0), x, 0.1, prob=0.0) is x
