"""Figures in the style of the paper's Figure 2: original / masked input / MAE reconstruction.

Predictions of a norm-pix model are mapped back to intensities with each
patch's own mean and variance (as the official MAE visualisation does), and
the visible patches are pasted from the input, so the figure shows what the
model inferred for the hidden ones. As that restoration borrows the true
patch mean (the trivial predictor's whole answer), a norm-pix figure adds a row
with the raw prediction of the hidden patches: the texture the model itself drew.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medmae_jax.models.vit import patchify, unpatchify  # noqa: E402


def reconstruction_views(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch_size: Sequence[int],
                         norm_pix: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original, masked input, reconstruction with visible patches pasted), each shaped like ``images``."""
    images = np.asarray(images, np.float32)
    spatial, channels = images.shape[1:-1], images.shape[-1]
    target = np.asarray(patchify(images, patch_size))
    pred = np.asarray(pred, np.float32)
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        std = np.sqrt(target.var(-1, keepdims=True) + 1e-6)
        pred = pred * std + mean
    m = np.asarray(mask, np.float32)[..., None]
    masked = np.asarray(unpatchify(target * (1 - m), patch_size, spatial, channels))
    recon = np.asarray(unpatchify(target * (1 - m) + pred * m, patch_size, spatial, channels))
    return images, masked, recon


def save_reconstruction_figure(path: str, images, pred, mask, patch_size: Sequence[int], norm_pix: bool,
                               title: str = "", max_examples: int = 4) -> str:
    """Writes a PNG with rows original / masked / reconstruction (and, with ``norm_pix``, the raw prediction of
    the hidden patches); 3-D inputs as three central slices."""
    images = np.asarray(images)[:max_examples]
    pred, mask = np.asarray(pred)[:max_examples], np.asarray(mask)[:max_examples]
    original, masked, recon = reconstruction_views(images, pred, mask, patch_size, norm_pix)
    spatial, channels = images.shape[1:-1], images.shape[-1]
    mask_pixels = np.asarray(unpatchify(np.repeat(mask[..., None], int(np.prod(patch_size)) * channels, -1),
                                        patch_size, spatial, channels))
    vmin, vmax = float(np.percentile(original, 0.5)), float(np.percentile(original, 99.5))
    rows = [("original", original), ("masked input", masked),
            ("reconstruction\n(true patch mean/std)" if norm_pix else "reconstruction", recon)]
    ranges = {}
    if norm_pix:  # the prediction itself, in normalised units, hidden patches only (visible ones drawn blue)
        raw = np.asarray(unpatchify(pred * mask[..., None], patch_size, spatial, channels), np.float32)
        rows.append(("raw prediction\n(norm-pix units)", raw))
        bound = float(np.percentile(np.abs(raw[mask_pixels > 0.5]), 99.5)) if mask.any() else 1.0
        ranges[len(rows) - 1] = (-max(bound, 1e-6), max(bound, 1e-6))
    if len(spatial) == 2:
        columns = [(i, None) for i in range(len(images))]
    else:
        columns = [(i, axis) for i in range(min(len(images), 2)) for axis in range(3)]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.27 * len(rows)),
                             squeeze=False)
    cmap = plt.get_cmap("gray").with_extremes(bad="#3a5f8f")  # hidden patches drawn in blue
    for r, (name, volume) in enumerate(rows):
        for c, (i, axis) in enumerate(columns):
            img, hidden = volume[i, ..., 0], mask_pixels[i, ..., 0]
            if axis is not None:
                centre = img.shape[axis] // 2
                img, hidden = np.take(img, centre, axis), np.take(hidden, centre, axis)
            ax = axes[r, c]
            if name == "masked input":
                shown = np.ma.masked_where(hidden > 0.5, img)
            elif r in ranges:
                shown = np.ma.masked_where(hidden < 0.5, img)
            else:
                shown = img
            low, high = ranges.get(r, (vmin, vmax))
            ax.imshow(shown, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(f"#{i}" if axis is None else f"#{i} axis {axis}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
