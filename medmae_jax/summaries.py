"""Small RGB images (``(H, W, 3)`` uint8) for TensorBoard: MAE reconstructions and segmentation overlays.

Tasks call these from their ``summary_images`` hook at evaluation time; the trainer writes the result.
The panels follow the figures of :mod:`medmae_jax.visualize` (reconstructions) and
:mod:`medmae_jax.evaluate.figures` (overlays), drawn with numpy instead of matplotlib so they are cheap.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from medmae_jax.evaluate.figures import label_colormap, pick_slices
from medmae_jax.models.vit import unpatchify
from medmae_jax.visualize import reconstruction_views

HIDDEN_RGB = np.array([58, 95, 143], np.uint8)  # hidden patches, the blue of visualize.py's figures
SEPARATOR = 24  # grey level of the lines between tiles


def gray(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A 2-D float array as ``(H, W, 3)`` uint8, ``lo``..``hi`` mapped to black..white."""
    scaled = (np.asarray(x, np.float32) - lo) / max(hi - lo, 1e-12)
    g = np.clip(np.nan_to_num(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, -1)


def upscale(image: np.ndarray, min_size: int = 96) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor so the shorter side is at least ``min_size`` pixels."""
    factor = max(1, -(-min_size // max(min(image.shape[:2]), 1)))
    return np.repeat(np.repeat(image, factor, 0), factor, 1) if factor > 1 else image


def tile(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """A grid of RGB tiles (each row's tiles side by side) separated by ``gap``-pixel dark lines."""
    height = max(t.shape[0] for row in rows for t in row)
    width = max(t.shape[1] for row in rows for t in row)
    ncols = max(len(row) for row in rows)
    out = np.full((len(rows) * (height + gap) - gap, ncols * (width + gap) - gap, 3), SEPARATOR, np.uint8)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def _central(volume: np.ndarray, axis: Optional[int]) -> np.ndarray:
    return volume if axis is None else np.take(volume, volume.shape[axis] // 2, axis)


def reconstruction_image(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch_size: Sequence[int],
                         norm_pix: bool, max_examples: int = 4) -> np.ndarray:
    """Rows original / masked input (hidden patches blue) / reconstruction (visible patches pasted), and with
    ``norm_pix`` the raw prediction of every patch in its own normalised units; columns = examples (2-D) or the
    three central slices of each example (3-D, at most two examples). Channel 0 is shown."""
    images = np.asarray(images, np.float32)[:max_examples]
    pred, mask = np.asarray(pred, np.float32)[:len(images)], np.asarray(mask)[:len(images)]
    spatial, channels = images.shape[1:-1], images.shape[-1]
    original, masked, recon = reconstruction_views(images, pred, mask, patch_size, norm_pix)
    hidden = np.asarray(unpatchify(np.repeat(np.asarray(mask, np.float32)[..., None], int(np.prod(patch_size))
                                             * channels, -1), patch_size, spatial, channels))[..., 0] > 0.5
    raw = np.asarray(unpatchify(pred, patch_size, spatial, channels)) if norm_pix else None
    lo, hi = (float(v) for v in np.percentile(original[..., 0], [0.5, 99.5]))
    if len(spatial) == 2:
        columns = [(i, None) for i in range(len(images))]
    else:
        columns = [(i, axis) for i in range(min(len(images), 2)) for axis in range(3)]
    rows = []
    for name in ("original", "masked", "reconstruction", "prediction") if norm_pix else ("original", "masked",
                                                                                         "reconstruction"):
        row = []
        for i, axis in columns:
            if name == "prediction":
                r = _central(raw[i, ..., 0], axis)
                rlo, rhi = np.percentile(r, [0.5, 99.5])
                t = gray(r, float(rlo), float(rhi))
            else:
                volume = {"original": original, "masked": masked, "reconstruction": recon}[name]
                t = gray(_central(volume[i, ..., 0], axis), lo, hi)
                if name == "masked":
                    t[_central(hidden[i], axis)] = HIDDEN_RGB
            row.append(upscale(t))
        rows.append(row)
    return tile(rows)


def _display(slice2d: np.ndarray) -> np.ndarray:
    """(X, Y) slice of a RAS array -> rows anterior-to-posterior, columns patient right-to-left (as figures.py)."""
    return np.rot90(slice2d)[:, ::-1]


def busiest_slice(label: np.ndarray, axis: int = 2) -> int:
    """The slice along ``axis`` with the most labelled voxels (the central one when nothing is labelled)."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    counts = (np.asarray(label) > 0).sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else label.shape[axis] // 2


def overlay_image(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, num_labels: int, *,
                  axis: int = 2, num_slices: int = 1, alpha: float = 0.5) -> np.ndarray:
    """Columns image / ground truth / prediction (label maps blended over the image in the colours of
    :func:`medmae_jax.evaluate.figures.label_colormap`), one row per slice: the slice with the most ground truth
    (``num_slices=1``) or slices spread over the labelled extent.

    ``image`` is ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (channel 0 shown); ``label`` and ``prediction`` are integer
    label maps of the same spatial shape."""
    image = np.asarray(image, np.float32)
    if image.ndim == 4:
        image = image[..., 0]
    label, prediction = np.asarray(label), np.asarray(prediction)
    for name, m in (("label", label), ("prediction", prediction)):
        if m.shape != image.shape:
            raise ValueError(f"{name}: shape {m.shape} differs from the image's {image.shape}")
    colours = (np.asarray(label_colormap(max(int(num_labels), 2)).colors, np.float32) * 255.0)
    lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    rows = []
    slices = [busiest_slice(label, axis)] if num_slices == 1 else pick_slices(label, num_slices, axis)
    for index in slices:
        base = gray(_display(np.take(image, index, axis)), lo, hi)
        row = [upscale(base)]
        for m in (label, prediction):
            lab = _display(np.take(m, index, axis)).astype(np.int64)
            lab = np.clip(lab, 0, len(colours) - 1)
            blended = base.astype(np.float32)
            on = lab > 0
            blended[on] = (1 - alpha) * blended[on] + alpha * colours[lab[on]]
            row.append(upscale(np.clip(blended + 0.5, 0, 255).astype(np.uint8)))
        rows.append(row)
    return tile(rows)
