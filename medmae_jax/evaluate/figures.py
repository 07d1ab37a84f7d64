"""Segmentation overlays in the style of the paper's Figures 3 (BTCV) and 4 (MSD): image, ground truth, predictions.

One row per axial slice (RAS array axis 2, shown radiologically: anterior up, patient right
on the left), columns: the image, the ground truth and each prediction as coloured label
overlays. Several predictions (e.g. ``{"scratch": ..., "MAE": ...}``) give the paper's
side-by-side comparison. Slices default to the quartiles of the ground truth's extent.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from medmae_jax.data.labels import SegmentationLabels  # noqa: E402


def label_colormap(num_labels: int) -> ListedColormap:
    """Distinct colours for labels 1..num_labels-1 (tab20 cycled); label 0 is never drawn."""
    base = plt.get_cmap("tab20").colors
    colours = [(0, 0, 0)] + [base[(2 * i) % 20 if i < 10 else (2 * (i - 10) + 1) % 20] for i in range(num_labels - 1)]
    return ListedColormap(colours)


def _display(slice2d: np.ndarray) -> np.ndarray:
    """(X, Y) slice of a RAS array -> image rows anterior-to-posterior, columns patient right-to-left."""
    return np.rot90(slice2d)[:, ::-1]


def pick_slices(label: np.ndarray, num: int = 3, axis: int = 2) -> list[int]:
    """``num`` slice indices along ``axis`` spread over the labelled extent (over the volume if none is labelled)."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    present = np.flatnonzero(np.asarray(label).any(axis=other)) if label.size else np.zeros(0, int)
    if present.size == 0:
        n = label.shape[axis]
        return sorted(set(int(round(q * (n - 1))) for q in np.linspace(0.25, 0.75, num)))
    lo, hi = int(present[0]), int(present[-1])
    return sorted(set(int(round(lo + q * (hi - lo))) for q in np.linspace(0.2, 0.8, num)))


def save_segmentation_figure(path: str, image: np.ndarray, label: Optional[np.ndarray],
                             predictions: Mapping[str, np.ndarray], *, class_names: Sequence[str] = (),
                             slices: Optional[Sequence[int]] = None, axis: int = 2, channel: int = 0,
                             title: str = "", alpha: float = 0.5) -> str:
    """Writes a PNG: rows = slices, columns = image, ground truth (if given), each prediction.

    ``image`` is ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (``channel`` is shown); ``label`` and the
    predictions are integer label maps of the same spatial shape; ``class_names[k - 1]`` names label k
    in the legend.
    """
    image = np.asarray(image, np.float32)
    if image.ndim == 4:
        image = image[..., channel]
    maps = {}
    if label is not None:
        maps["ground truth"] = np.asarray(label)
    for name, pred in predictions.items():
        maps[name] = np.asarray(pred)
    for name, m in maps.items():
        if m.shape != image.shape:
            raise ValueError(f"{name}: label map shape {m.shape} differs from the image's {image.shape}")
    if slices is None:
        slices = pick_slices(maps.get("ground truth", next(iter(maps.values()), np.zeros(0))), 3, axis)
    num_labels = int(max([m.max(initial=0) for m in maps.values()] + [len(class_names)])) + 1
    cmap = label_colormap(max(num_labels, 2))
    vmin, vmax = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    columns = ["image"] + list(maps)
    fig, axes = plt.subplots(len(slices), len(columns), figsize=(2.6 * len(columns), 2.6 * len(slices) + 0.6),
                             squeeze=False)
    for r, index in enumerate(slices):
        img = _display(np.take(image, index, axis))
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if name != "image":
                lab = _display(np.take(maps[name], index, axis))
                ax.imshow(np.ma.masked_where(lab == 0, lab), cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=alpha,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"slice {index}", fontsize=9)
    present = sorted(set(int(v) for m in maps.values() for v in np.unique(m) if v > 0))
    if present:
        handles = [Patch(color=cmap(v), label=class_names[v - 1] if v - 1 < len(class_names) else f"label {v}")
                   for v in present]
        ncol = max(len(columns), 2)
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title)
    legend_rows = -(-len(present) // max(len(columns), 2)) if present else 0
    fig.tight_layout(rect=(0, min(0.2 * legend_rows / fig.get_figheight(), 0.4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_case_figure(path: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
                     conventions: SegmentationLabels, *, title: str = "",
                     others: Optional[Mapping[str, np.ndarray]] = None) -> str:
    """Overlay figure of one evaluated case: the prediction, then ``others`` (``{column name: prediction}``);
    region masks are drawn as label maps of the data set's numbering."""
    preds = {"prediction": conventions.label_map(pred)}
    preds.update({name: conventions.label_map(p) for name, p in (others or {}).items()})
    return save_segmentation_figure(path, image, label, preds, class_names=conventions.figure_class_names(),
                                    title=title)
