"""Per-example random augmentation for pre-training (numpy, runs in the loader threads).

2-D: random resized crop (scale 0.2-1, as the official MAE) + horizontal flip.
3-D: random crop of the model's input size (zero-padded when the volume is
smaller) + flips on each axis. Evaluation: resize/centre crop, deterministic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image


def _resize_2d(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W, C) uint8/float -> (size, C) with bilinear (antialiased) resampling, dtype kept."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    chans = [np.asarray(Image.fromarray(image[..., c]).resize((size[1], size[0]), Image.BILINEAR))
             for c in range(image.shape[-1])]
    return np.stack(chans, -1).astype(image.dtype)


def random_resized_crop(image: np.ndarray, size: Sequence[int], rng: np.random.Generator,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = int(round(np.sqrt(target / aspect))), int(round(np.sqrt(target * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return _resize_2d(image[top:top + ch, left:left + cw], size)
    return center_crop_resize(image, size)


def center_crop_resize(image: np.ndarray, size: Sequence[int], crop_fraction: float = 224 / 256) -> np.ndarray:
    """Evaluation view: resize so the crop is ``size``, then take the centre (256 -> 224 protocol)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    h, w = image.shape[:2]
    side = int(round(min(h, w) * crop_fraction))
    top, left = (h - side) // 2, (w - side) // 2
    return _resize_2d(image[top:top + side, left:left + side], size)


def pad_to(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Zero-pad the leading spatial axes symmetrically up to ``size``."""
    pads = [(max(s - v, 0) // 2, max(s - v, 0) - max(s - v, 0) // 2) for v, s in zip(volume.shape, size)]
    pads += [(0, 0)] * (volume.ndim - len(size))
    return np.pad(volume, pads) if any(p != (0, 0) for p in pads) else volume


def random_crop(volume: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    volume = pad_to(volume, size)
    starts = [rng.integers(0, v - s + 1) for v, s in zip(volume.shape, size)]
    return volume[tuple(slice(a, a + s) for a, s in zip(starts, size))]


def center_crop(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    volume = pad_to(volume, size)
    starts = [(v - s) // 2 for v, s in zip(volume.shape, size)]
    return volume[tuple(slice(a, a + s) for a, s in zip(starts, size))]


def pretrain_transform(config) -> Callable[[dict, np.random.Generator], dict]:
    size = tuple(config.model.input_size)
    if config.model.spatial_dims == 2:
        def transform(example, rng):
            image = random_resized_crop(example["image"], size, rng)
            if rng.random() < 0.5:
                image = image[:, ::-1]
            return {"image": np.ascontiguousarray(image)}
    else:
        def transform(example, rng):
            image = random_crop(example["image"], size, rng)
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            if flips:
                image = np.flip(image, flips)
            return {"image": np.ascontiguousarray(image)}
    return transform


def eval_transform(config) -> Callable[[dict], dict]:
    size = tuple(config.model.input_size)
    if config.model.spatial_dims == 2:
        return lambda example: {"image": center_crop_resize(example["image"], size)}
    return lambda example: {"image": np.ascontiguousarray(center_crop(example["image"], size))}
