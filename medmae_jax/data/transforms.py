"""Numpy transforms for 3-D volumes (channels-last: image ``(X, Y, Z, C)``, label ``(X, Y, Z)``).

Deterministic ones (intensity window, z-score, foreground crop) run once when a data set is
built; random ones (pos/neg crops, flips, rot90, intensity scale/shift) run per example in the
input pipeline, every choice drawn from the ``numpy.random.Generator`` that grain's ``random_map``
passes per example (seeded from the config, so a restarted run replays the same stream). Semantics follow
the MONAI transforms named in each docstring. All operations are vectorised numpy.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def rng_for(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, example index): same triple, same draws."""
    for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(index)])))


# --------------------------------------------------------------------------------------------
# intensity


def scale_intensity_range(x: np.ndarray, a_min: float, a_max: float, b_min: float = 0.0, b_max: float = 1.0,
                          clip: bool = True) -> np.ndarray:
    """Maps [a_min, a_max] linearly to [b_min, b_max] (MONAI ScaleIntensityRange), clipped if ``clip``.

    For CT, ``a_min=-175, a_max=250`` is the abdominal HU window used for BTCV.
    """
    if a_max == a_min:
        raise ValueError(f"a_min and a_max must differ, got {a_min}")
    x = np.asarray(x, np.float32)
    out = (x - np.float32(a_min)) / np.float32(a_max - a_min)
    out = out * np.float32(b_max - b_min) + np.float32(b_min)
    if clip:
        np.clip(out, min(b_min, b_max), max(b_min, b_max), out=out)
    return out.astype(np.float32, copy=False)


def normalize_nonzero(x: np.ndarray, channel_axis: Optional[int] = -1) -> np.ndarray:
    """Z-score over the non-zero voxels of each channel; zeros stay zero (MONAI NormalizeIntensity
    with ``nonzero=True, channel_wise=True``; population std, a std of 0 counts as 1).

    ``channel_axis=None`` treats the whole array as one channel.
    """
    x = np.asarray(x, np.float32)
    if channel_axis is None:
        return normalize_nonzero(x[..., None], -1)[..., 0]
    x = np.moveaxis(x, channel_axis, -1)
    axes = tuple(range(x.ndim - 1))
    nonzero = x != 0
    count = np.maximum(np.count_nonzero(nonzero, axis=axes), 1)
    mean = (x.sum(axis=axes, dtype=np.float64) / count).astype(np.float32)  # zeros add nothing
    out = np.subtract(x, mean, dtype=np.float32)
    out *= nonzero
    flat = out.reshape(-1, out.shape[-1])
    std = np.sqrt(np.einsum("nc,nc->c", flat, flat, dtype=np.float64) / count)
    std[std == 0] = 1.0
    out /= std.astype(np.float32)
    return np.moveaxis(out, -1, channel_axis)


def scale_intensity(x: np.ndarray, factor: float) -> np.ndarray:
    """``x * (1 + factor)`` (MONAI ScaleIntensity with ``factor``)."""
    return (np.asarray(x, np.float32) * np.float32(1.0 + factor)).astype(np.float32, copy=False)


def shift_intensity(x: np.ndarray, offset: float) -> np.ndarray:
    """``x + offset``."""
    return (np.asarray(x, np.float32) + np.float32(offset)).astype(np.float32, copy=False)


def random_scale_intensity(rng: np.random.Generator, x: np.ndarray, factors: float = 0.1,
                           prob: float = 0.1) -> np.ndarray:
    """With probability ``prob``, ``x * (1 + f)``, f ~ U(-factors, factors) (MONAI RandScaleIntensity)."""
    apply, f = rng.random() < prob, rng.uniform(-factors, factors)
    return scale_intensity(x, f) if apply else x


def random_shift_intensity(rng: np.random.Generator, x: np.ndarray, offsets: float = 0.1,
                           prob: float = 0.1) -> np.ndarray:
    """With probability ``prob``, ``x + o``, o ~ U(-offsets, offsets) (MONAI RandShiftIntensity)."""
    apply, o = rng.random() < prob, rng.uniform(-offsets, offsets)
    return shift_intensity(x, o) if apply else x


# --------------------------------------------------------------------------------------------
# foreground crop and padding


def foreground_box(source: np.ndarray, *, threshold: float = 0.0, margin: int | Sequence[int] = 0,
                   spatial_dims: int = 3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box ``(start, stop)`` of voxels where any channel is ``> threshold`` (MONAI
    CropForeground with the default ``select_fn``), grown by ``margin`` and clipped to the array.

    A volume with no foreground gives the whole array (MONAI would give an empty crop; an
    empty example is never useful, so nothing is dropped).
    """
    source = np.asarray(source)
    shape = source.shape[:spatial_dims]
    mask = source > threshold
    if mask.ndim > spatial_dims:
        mask = mask.reshape(shape + (-1,)).any(axis=-1)
    if not mask.any():
        return (0,) * spatial_dims, tuple(int(s) for s in shape)
    margin = np.broadcast_to(np.asarray(margin, int), (spatial_dims,))
    start, stop = [], []
    for a in range(spatial_dims):
        other = tuple(b for b in range(spatial_dims) if b != a)
        hit = np.flatnonzero(mask.any(axis=other))
        start.append(int(max(hit[0] - margin[a], 0)))
        stop.append(int(min(hit[-1] + 1 + margin[a], shape[a])))
    return tuple(start), tuple(stop)


def crop(x: np.ndarray, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """``x[start:stop]`` on the leading spatial axes (a view)."""
    return x[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))]


def crop_case_to_foreground(image: np.ndarray, label, geometry, source=None):
    """Crops a case to the foreground box of ``source`` (default: the image) grown to hold every labelled voxel.

    Returns ``(image, label, geometry)``; the geometry records the crop so predictions map back to the file.
    """
    start, stop = foreground_box(image if source is None else source)
    if label is not None and label.any():
        lstart, lstop = foreground_box(label)
        start, stop = np.minimum(start, lstart), np.maximum(stop, lstop)
    label = None if label is None else crop(label, start, stop)
    return crop(image, start, stop), label, geometry.with_crop(start, stop)


def crop_foreground(source: np.ndarray, *arrays: np.ndarray, threshold: float = 0.0, margin: int = 0):
    """Crops ``source`` and every array in ``arrays`` to the foreground box of ``source``.

    Returns ``(cropped_source, *cropped_arrays, (start, stop))``.
    """
    start, stop = foreground_box(source, threshold=threshold, margin=margin)
    return (crop(source, start, stop), *[crop(a, start, stop) for a in arrays], (start, stop))


def pad_to_shape(x: np.ndarray, shape: Sequence[int], value=0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pads the leading spatial axes symmetrically up to at least ``shape`` (MONAI SpatialPad,
    ``method="symmetric"``: half before, the rest after). Returns ``(padded, pad_before)``."""
    shape = tuple(int(s) for s in shape)
    cur = x.shape[: len(shape)]
    need = [max(s - c, 0) for s, c in zip(shape, cur)]
    if not any(need):
        return x, (0,) * len(shape)
    widths = [(n // 2, n - n // 2) for n in need] + [(0, 0)] * (x.ndim - len(shape))
    return np.pad(x, widths, mode="constant", constant_values=value), tuple(w[0] for w in widths[: len(shape)])


# --------------------------------------------------------------------------------------------
# random crops


def fg_bg_indices(label: np.ndarray, image: Optional[np.ndarray] = None, image_threshold: float = 0.0):
    """Flat indices of foreground (label > 0) and background (label == 0) voxels; with ``image``,
    only voxels where some channel of the image is ``> image_threshold`` count (MONAI FgBgToIndices).
    Compute once per volume and pass to :func:`pos_neg_crop_centers` to save time."""
    label = np.asarray(label)
    fg, bg = label > 0, label == 0
    if image is not None:
        valid = np.asarray(image) > image_threshold
        if valid.ndim > label.ndim:
            valid = valid.reshape(label.shape + (-1,)).any(axis=-1)
        fg &= valid
        bg &= valid
    return np.flatnonzero(fg), np.flatnonzero(bg)


def valid_center(center: np.ndarray, roi: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Moves crop centres so the ROI ``[c - roi//2, c - roi//2 + roi)`` lies inside ``shape``."""
    roi, shape = np.asarray(roi), np.asarray(shape)
    lo, hi = roi // 2, shape - roi + roi // 2
    return np.clip(center, lo, np.maximum(hi, lo))


def pos_neg_crop_centers(
    rng: np.random.Generator,
    label: np.ndarray,
    roi: Sequence[int],
    num_samples: int,
    *,
    pos: float = 1.0,
    neg: float = 1.0,
    image: Optional[np.ndarray] = None,
    image_threshold: float = 0.0,
    indices: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop centres ``(num_samples, 3)`` centred on a foreground voxel with probability
    ``pos / (pos + neg)``, else on a background voxel (MONAI RandCropByPosNegLabel), moved inside
    the volume. Also returns which samples were drawn as positive. With no foreground (or no
    background) every centre comes from the other set, as in MONAI.
    """
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ValueError(f"pos and neg must be >= 0 and not both 0, got {pos}, {neg}")
    shape = label.shape[:3]
    fg, bg = indices if indices is not None else fg_bg_indices(label, image, image_threshold)
    if len(fg) == 0 and len(bg) == 0:
        raise ValueError("no voxel to centre a crop on (label and image are empty)")
    ratio = pos / (pos + neg)
    if len(fg) == 0:
        ratio = 0.0
    elif len(bg) == 0:
        ratio = 1.0
    positive = rng.random(num_samples) < ratio
    pick_fg = fg[rng.integers(0, max(len(fg), 1), num_samples)] if len(fg) else np.zeros(num_samples, np.intp)
    pick_bg = bg[rng.integers(0, max(len(bg), 1), num_samples)] if len(bg) else np.zeros(num_samples, np.intp)
    flat = np.where(positive, pick_fg, pick_bg)
    centers = np.stack(np.unravel_index(flat, shape), -1)
    return valid_center(centers, roi, shape), positive


def crops_at(x: np.ndarray, centers: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Stacks the ROI crops of ``x`` (spatial axes first) around each centre: ``(N, *roi, ...)``."""
    roi = np.asarray(roi, int)
    starts = np.asarray(centers, int) - roi // 2
    return np.stack([x[tuple(slice(s, s + r) for s, r in zip(st, roi))] for st in starts], 0)


def rand_crop_by_pos_neg_label(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    roi: Sequence[int],
    num_samples: int = 1,
    *,
    pos: float = 1.0,
    neg: float = 1.0,
    image_threshold: Optional[float] = 0.0,
    indices: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` ROI crops of ``image`` (X, Y, Z, C) and ``label`` (X, Y, Z) with the
    positive:negative centre ratio ``pos:neg`` (MONAI RandCropByPosNegLabeld with
    ``image_key``/``image_threshold``; ``image_threshold=None`` ignores the image). A volume
    smaller than the ROI is first zero-padded symmetrically (MONAI SpatialPadd), so the crops
    always have the ROI shape. Returns ``(images (N, *roi, C), labels (N, *roi))``.
    """
    roi = tuple(int(r) for r in roi)
    if label.shape[:3] != image.shape[:3]:
        raise ValueError(f"image {image.shape} and label {label.shape} differ in spatial shape")
    if any(s < r for s, r in zip(label.shape, roi)):
        image, _ = pad_to_shape(image, roi)
        label, _ = pad_to_shape(label, roi)
        indices = None
    centers, _ = pos_neg_crop_centers(
        rng, label, roi, num_samples, pos=pos, neg=neg,
        image=None if image_threshold is None else image,
        image_threshold=0.0 if image_threshold is None else image_threshold, indices=indices)
    return crops_at(image, centers, roi), crops_at(label, centers, roi)


# --------------------------------------------------------------------------------------------
# flips and rotations (exact voxel permutations, the same for image and label)


def random_flip(rng: np.random.Generator, arrays: Sequence[np.ndarray], prob: float = 0.1,
                axes: Sequence[int] = (0, 1, 2)) -> list[np.ndarray]:
    """Flips every array along each axis in ``axes`` independently with probability ``prob``
    (MONAI RandFlipd once per spatial axis)."""
    draws = rng.random(len(axes)) < prob
    flip = tuple(int(a) for a, d in zip(axes, draws) if d)
    if not flip:
        return list(arrays)
    return [np.flip(a, axis=flip) for a in arrays]


def random_rot90(rng: np.random.Generator, arrays: Sequence[np.ndarray], prob: float = 0.1, max_k: int = 3,
                 axes: tuple[int, int] = (0, 1)) -> list[np.ndarray]:
    """With probability ``prob``, rotates every array by ``k * 90`` degrees in the plane ``axes``,
    ``k`` uniform in ``1..max_k`` (MONAI RandRotate90d)."""
    apply, k = rng.random() < prob, int(rng.integers(1, max_k + 1))
    if not apply:
        return list(arrays)
    return [np.rot90(a, k, axes=axes) for a in arrays]
