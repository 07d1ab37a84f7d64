"""Procedural, seeded stand-ins for the real data sets: the embedded default.

``SyntheticChest2D`` draws chest-radiograph-like images (body, lung fields,
ribs, heart, optional findings) with 14-way multi-hot labels in the
ChestX-ray14 order; ``SyntheticPhantom3D`` draws abdominal-CT-like volumes
(body, liver, spleen, kidneys, aorta, spine) already windowed to [0, 1], with a
label map in BTCV numbering. Both are random-access data sources (``len`` and
``__getitem__``) whose example ``i`` depends only on ``(seed, i)``, so they go
through the same loader as the TFDS data sources of the real data sets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medmae_jax.data.labels import BTCV_LABELS, BTCV_NUM_CLASSES, CXR14_LABELS

# BTCV numbering of the organs the phantom draws.
PHANTOM_ORGANS = {name: value for value, name in BTCV_LABELS.items() if value in (1, 2, 3, 6, 8)}
PHANTOM_NUM_CLASSES = BTCV_NUM_CLASSES  # background + the 13 BTCV organs, so configs match the real data set


def _example_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5EED]))


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] per axis, broadcastable (open grid)."""
    return list(np.ogrid[tuple(slice(-1.0, 1.0, complex(0, s)) for s in shape)])


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], scale: int) -> np.ndarray:
    """Low-frequency noise: coarse Gaussian grid upsampled by repetition and box-smoothed."""
    coarse = rng.standard_normal([max(s // scale, 2) for s in shape])
    for axis, s in enumerate(shape):
        coarse = np.repeat(coarse, int(np.ceil(s / coarse.shape[axis])), axis=axis)
    out = coarse[tuple(slice(0, s) for s in shape)]
    for axis in range(len(shape)):
        out = (out + np.roll(out, 1, axis) + np.roll(out, -1, axis)) / 3.0
    return out


class SyntheticChest2D:
    """Chest-X-ray-like grayscale images (S, S, 1) uint8 with 14 multi-hot labels.

    ``noise`` scales the unpredictable part (fine mottle and pixel noise); ``shading`` > 0 adds a smooth exposure
    ramp of that amplitude across the image in a random direction (as an X-ray tube's heel effect), structure that
    continues from patch to patch, so an MAE can infer it for hidden patches from the visible ones.
    """

    def __init__(self, num_examples: int = 512, image_size: int = 64, seed: int = 0, noise: float = 1.0,
                 shading: float = 0.0):
        self.num_examples, self.image_size, self.seed = int(num_examples), int(image_size), int(seed)
        self.noise, self.shading = float(noise), float(shading)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} outside [0, {self.num_examples})")
        rng = _example_rng(self.seed, index)
        s = self.image_size
        y, x = _grid((s, s))
        labels = np.zeros(len(CXR14_LABELS), np.float32)
        img = np.full((s, s), 0.05)
        body = _ellipsoid((y, x), (0.05, 0.0), (1.05, 0.85 + 0.05 * rng.standard_normal()))
        img = np.where(body, 0.55, img)
        lung_r = 0.30 + 0.03 * rng.standard_normal()
        for side in (-1, 1):
            lung = _ellipsoid((y, x), (-0.05, side * 0.38), (0.62 + 0.04 * rng.standard_normal(), lung_r))
            img = np.where(lung, 0.18, img)
        # Ribs: bright curved bands over the lungs.
        phase = rng.uniform(0, np.pi)
        ribs = 0.5 + 0.5 * np.cos(14.0 * (y + 0.25 * x**2) + phase)
        img = img + 0.12 * ribs * body
        heart_scale = rng.uniform(0.22, 0.36)
        heart = _ellipsoid((y, x), (0.25, 0.08), (heart_scale, heart_scale * 1.25))
        img = np.where(heart, 0.62, img)
        if heart_scale > 0.32:
            labels[CXR14_LABELS.index("Cardiomegaly")] = 1
        if rng.random() < 0.3:  # nodules / mass: small or large bright blobs in a lung field
            big = rng.random() < 0.4
            c = (rng.uniform(-0.5, 0.3), rng.choice([-1, 1]) * rng.uniform(0.25, 0.5))
            r = rng.uniform(0.10, 0.16) if big else rng.uniform(0.03, 0.06)
            img = np.where(_ellipsoid((y, x), c, (r, r)), 0.7, img)
            labels[CXR14_LABELS.index("Mass" if big else "Nodule")] = 1
        if rng.random() < 0.25:  # effusion: lower lung zone fills up
            side = rng.choice([-1, 1])
            level = rng.uniform(0.2, 0.45)
            fill = _ellipsoid((y, x), (-0.05, side * 0.38), (0.62, lung_r)) & (y > level)
            img = np.where(fill, 0.5, img)
            labels[CXR14_LABELS.index("Effusion")] = 1
        if rng.random() < 0.2:  # infiltration: diffuse haze in one lung
            side = rng.choice([-1, 1])
            haze = _ellipsoid((y, x), (0.0, side * 0.38), (0.5, 0.25)) * np.clip(_smooth_noise(rng, (s, s), 4), 0, None)
            img = img + 0.25 * haze
            labels[CXR14_LABELS.index("Infiltration")] = 1
        img = img + self.noise * (0.04 * _smooth_noise(rng, (s, s), max(s // 16, 2))
                                  + 0.015 * rng.standard_normal((s, s)))
        if self.shading > 0:  # drawn last: the images without shading stay as they were
            angle = rng.uniform(0, 2 * np.pi)
            img = img + 0.5 * self.shading * (np.cos(angle) * y + np.sin(angle) * x)
        image = np.clip(img * 255.0, 0, 255).astype(np.uint8)[..., None]
        return {"image": image, "labels": labels, "index": np.int64(index)}


class SyntheticPhantom3D:
    """Abdominal-CT-like volumes (D, H, W, 1) float32 in [0, 1] with BTCV-numbered label maps (D, H, W) uint8."""

    def __init__(self, num_examples: int = 64, volume_shape: Sequence[int] = (64, 64, 64), seed: int = 0):
        self.num_examples, self.seed = int(num_examples), int(seed)
        self.volume_shape = tuple(int(v) for v in volume_shape)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} outside [0, {self.num_examples})")
        rng = _example_rng(self.seed, index)
        shape = self.volume_shape
        z, y, x = _grid(shape)  # axis 0 ~ right->left, 1 ~ posterior->anterior, 2 ~ inferior->superior
        jitter = lambda scale=0.05: scale * rng.standard_normal()  # noqa: E731
        vol = np.full(shape, 0.0, np.float32)
        label = np.zeros(shape, np.uint8)

        def paint(mask, value, organ=None):
            nonlocal vol, label
            vol = np.where(mask, value + 0.03 * rng.standard_normal(), vol)
            if organ is not None:
                label = np.where(mask, np.uint8(organ), label)

        body = _ellipsoid((z, y, x), (jitter(), jitter(), 0.0), (0.9 + jitter(), 0.7 + jitter(), 2.0))
        paint(body, 0.42)
        fat = body & ~_ellipsoid((z, y, x), (0.0, 0.0, 0.0), (0.8, 0.6, 2.0))
        paint(fat, 0.25)
        paint(_ellipsoid((z, y, x), (-0.35 + jitter(), 0.05 + jitter(), 0.25 + jitter()),
                         (0.38 + jitter(), 0.32 + jitter(), 0.45 + jitter())), 0.58, PHANTOM_ORGANS["liver"])
        paint(_ellipsoid((z, y, x), (0.45 + jitter(), -0.15 + jitter(), 0.3 + jitter()),
                         (0.14 + jitter(0.02), 0.12, 0.22)), 0.55, PHANTOM_ORGANS["spleen"])
        for organ, side in (("right_kidney", -1), ("left_kidney", 1)):
            paint(_ellipsoid((z, y, x), (side * 0.3 + jitter(), -0.35 + jitter(), -0.1 + jitter()),
                             (0.1 + jitter(0.02), 0.1, 0.2)), 0.68, PHANTOM_ORGANS[organ])
        paint(_ellipsoid((z, y, x), (0.0, -0.45 + jitter(0.02), 0.0), (0.1, 0.1, 2.0)), 0.92)  # spine (unlabelled bone)
        paint(_ellipsoid((z, y, x), (0.08 + jitter(0.02), -0.28 + jitter(0.02), 0.0), (0.06, 0.06, 2.0)), 0.75,
              PHANTOM_ORGANS["aorta"])
        # A smooth intensity ramp (scanner-like shading) in a random direction, low-frequency texture, and a
        # little voxel noise: mostly predictable from visible neighbours, as real soft tissue is.
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        vol = vol + 0.12 * (direction[0] * z + direction[1] * y + direction[2] * x) * body
        vol = vol + 0.01 * _smooth_noise(rng, shape, max(shape[0] // 8, 2)) + 0.003 * rng.standard_normal(shape)
        vol = np.clip(vol, 0.0, 1.0).astype(np.float32)
        return {"image": vol[..., None], "label": label, "index": np.int64(index)}
