"""Evaluation metrics on the host (numpy/scipy): Dice, HD95, BTCV/MSD summaries, per-class ROC-AUC.

Segmentation metrics follow MONAI's definitions so numbers compare with published ones:
``compute_dice(include_background=False, ignore_empty=True)`` and
``compute_hausdorff_distance(percentile=95)`` (surface = mask XOR its binary erosion,
exact Euclidean distance from each surface voxel of one mask to the other's surface,
HD95 = max of the two directed 95th percentiles). ROC-AUC is the rank (Mann-Whitney)
form, equal to scikit-learn's ``roc_auc_score`` including tied scores; scikit-learn is
not needed at run time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import ndimage, stats

from medmae_jax.data.labels import BTCV_8_ORGANS, BTCV_13_ORGANS, BTCV_LABELS, REGION_CONVENTIONS, REGIONS

ArrayLike = Union[np.ndarray, Sequence]

# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------

def _as_label_map(x: ArrayLike, what: str) -> np.ndarray:
    """Integer label map from ints, bools or integral floats (NIfTI labels often load as float)."""
    a = np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{what}: label map has non-integer values (dtype {a.dtype}); pass class indices")
        a = a.astype(np.int64)
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}: label map must hold integers, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{what}: label map has negative labels (min {a.min()})")
    return a


def _as_masks(x: ArrayLike, what: str) -> np.ndarray:
    """Binary masks, channels-last (..., C); values must be 0/1 (or bool)."""
    a = np.asarray(x)
    if a.dtype != bool:
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"{what}: one-hot masks must be binary (0/1); threshold or argmax first")
        a = a.astype(bool)
    return a


def _check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {target.shape}")


def _spacing_tuple(spacing, ndim: int) -> Optional[tuple[float, ...]]:
    if spacing is None:
        return None
    s = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if s.size == 1:
        s = np.repeat(s, ndim)
    if s.size != ndim or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"spacing must be one positive number or {ndim} of them, got {spacing!r}")
    return tuple(float(v) for v in s)


def _default_labels(num_classes: Optional[int], pred: np.ndarray, target: np.ndarray) -> tuple[int, ...]:
    if num_classes is None:
        num_classes = int(max(pred.max(initial=0), target.max(initial=0))) + 1
    return tuple(range(1, num_classes))


# --------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------

def _dice_from_counts(inter, n_pred, n_true, ignore_empty: bool) -> np.ndarray:
    inter, n_pred, n_true = (np.asarray(v, dtype=np.float64) for v in (inter, n_pred, n_true))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 2.0 * inter / (n_pred + n_true)
    empty = n_true == 0
    if ignore_empty:
        d[empty] = np.nan
    else:
        d[empty] = np.where(n_pred[empty] == 0, 1.0, 0.0)
    return d


def dice_per_class(pred: ArrayLike, target: ArrayLike, labels: Optional[Sequence[int]] = None, *,
                   num_classes: Optional[int] = None, one_hot: bool = False,
                   ignore_empty: bool = True) -> np.ndarray:
    """Dice of each class in ``labels`` (default 1..num_classes-1: background excluded).

    ``pred``/``target`` are integer label maps of the same shape, or with ``one_hot=True``
    binary masks with the class on the last axis (channel 0 = background). Like MONAI's
    ``compute_dice``: an empty ground truth gives NaN when ``ignore_empty`` (whatever the
    prediction), else 1.0 if the prediction is empty too and 0.0 if not.
    """
    if one_hot:
        p, t = _as_masks(pred, "prediction"), _as_masks(target, "ground truth")
        _check_same_shape(p, t)
        labels = tuple(range(1, p.shape[-1])) if labels is None else tuple(int(c) for c in labels)
        if any(not 0 <= c < p.shape[-1] for c in labels):
            raise ValueError(f"labels {labels} out of range for {p.shape[-1]} one-hot channels")
        axes = tuple(range(p.ndim - 1))
        p, t = p[..., list(labels)], t[..., list(labels)]
        inter = np.sum(p & t, axis=axes)
        return _dice_from_counts(inter, p.sum(axis=axes), t.sum(axis=axes), ignore_empty)
    p, t = _as_label_map(pred, "prediction"), _as_label_map(target, "ground truth")
    _check_same_shape(p, t)
    labels = _default_labels(num_classes, p, t) if labels is None else tuple(int(c) for c in labels)
    if not labels:
        return np.zeros((0,), np.float64)
    n = max(int(p.max(initial=0)), int(t.max(initial=0)), max(labels)) + 1
    p, t = p.ravel(), t.ravel()
    n_pred = np.bincount(p, minlength=n)
    n_true = np.bincount(t, minlength=n)
    inter = np.bincount(t[p == t], minlength=n)
    idx = np.asarray(labels)
    return _dice_from_counts(inter[idx], n_pred[idx], n_true[idx], ignore_empty)


# --------------------------------------------------------------------------------------
# Hausdorff distance (HD95)
# --------------------------------------------------------------------------------------

def _union_box(boxes: Sequence[Optional[tuple[slice, ...]]]) -> Optional[tuple[slice, ...]]:
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(len(boxes[0])))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion (face connectivity, outside the array counts as empty)."""
    return mask & ~ndimage.binary_erosion(mask)


def _directed_hd(dist_to_target: np.ndarray, src_surface: np.ndarray, percentile: Optional[float]) -> float:
    d = dist_to_target[src_surface]
    return float(np.max(d)) if percentile is None else float(np.percentile(d, percentile))


def _hd_pair(p: np.ndarray, t: np.ndarray, spacings: Sequence[Optional[tuple[float, ...]]],
             percentile: Optional[float]) -> list[float]:
    """HD for one (already cropped) pair of binary masks, once per spacing (None = voxels)."""
    p_any, t_any = bool(p.any()), bool(t.any())
    if not (p_any and t_any):
        # MONAI: both empty -> NaN; one empty -> inf for the plain HD, NaN for a percentile HD
        # (its percentile of an all-inf array is NaN). Reported as undefined either way for HD95.
        v = math.inf if (p_any or t_any) and percentile is None else math.nan
        return [v for _ in spacings]
    # one voxel of zero padding so that the erosion sees the outside as empty, as MONAI's crop margin does
    p = np.pad(p, 1)
    t = np.pad(t, 1)
    sp, st = _surface(p), _surface(t)
    out = []
    for spacing in spacings:
        d_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
        d_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
        out.append(max(_directed_hd(d_to_t, sp, percentile), _directed_hd(d_to_p, st, percentile)))
    return out


def _hd_label_maps(p: np.ndarray, t: np.ndarray, labels: Sequence[int], spacings, percentile) -> np.ndarray:
    """(len(spacings), len(labels)) HD, each class cropped to the bounding box of its two masks."""
    out = np.full((len(spacings), len(labels)), np.nan)
    max_label = max(labels) if labels else 0
    boxes_p = ndimage.find_objects(p, max_label=max_label)
    boxes_t = ndimage.find_objects(t, max_label=max_label)
    for j, c in enumerate(labels):
        if c == 0:
            box = tuple(slice(0, s) for s in p.shape)
        else:
            box = _union_box([boxes_p[c - 1], boxes_t[c - 1]])
        if box is None:
            continue  # both empty: NaN
        out[:, j] = _hd_pair(p[box] == c, t[box] == c, spacings, percentile)
    return out


def _hd_masks(p: np.ndarray, t: np.ndarray, channels: Sequence[int], spacings, percentile) -> np.ndarray:
    out = np.full((len(spacings), len(channels)), np.nan)
    for j, c in enumerate(channels):
        pc, tc = p[..., c], t[..., c]
        box = _union_box(ndimage.find_objects((pc | tc).astype(np.uint8)))
        if box is None:
            continue
        out[:, j] = _hd_pair(pc[box], tc[box], spacings, percentile)
    return out


def _check_percentile(percentile: Optional[float]) -> None:
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")


def hausdorff_distance(pred: ArrayLike, target: ArrayLike, labels: Optional[Sequence[int]] = None, *,
                       num_classes: Optional[int] = None, one_hot: bool = False, spacing=None,
                       percentile: Optional[float] = 95.0) -> np.ndarray:
    """Per-class symmetric Hausdorff distance (default HD95), in voxels or, with ``spacing``, in mm.

    Same inputs as :func:`dice_per_class`. Matches MONAI ``compute_hausdorff_distance``:
    ``max(P(d(pred->gt)), P(d(gt->pred)))`` over surface voxels, P the ``percentile`` with
    linear interpolation (``None``: the maximum). A class empty in both masks gives NaN; empty
    in only one gives NaN for a percentile (as MONAI) and inf for the plain maximum.
    """
    _check_percentile(percentile)
    if one_hot:
        p, t = _as_masks(pred, "prediction"), _as_masks(target, "ground truth")
        _check_same_shape(p, t)
        labels = tuple(range(1, p.shape[-1])) if labels is None else tuple(int(c) for c in labels)
        return _hd_masks(p, t, labels, [_spacing_tuple(spacing, p.ndim - 1)], percentile)[0]
    p, t = _as_label_map(pred, "prediction"), _as_label_map(target, "ground truth")
    _check_same_shape(p, t)
    labels = _default_labels(num_classes, p, t) if labels is None else tuple(int(c) for c in labels)
    return _hd_label_maps(p, t, labels, [_spacing_tuple(spacing, p.ndim)], percentile)[0]


# --------------------------------------------------------------------------------------
# Result containers, tables, JSON
# --------------------------------------------------------------------------------------

def _nan_to_none(v: float) -> Optional[float]:
    v = float(v)
    return None if not math.isfinite(v) else v


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    return float(values[ok].mean()) if ok.any() else math.nan


@dataclasses.dataclass(frozen=True)
class SegmentationMetrics:
    """Per-class Dice and HD95 (voxels, and millimetres when a spacing was given); NaN = undefined."""

    labels: tuple[int, ...]
    names: tuple[str, ...]
    dice: np.ndarray
    hd95: np.ndarray
    hd95_mm: Optional[np.ndarray] = None

    def _select(self, labels: Optional[Sequence[int]]) -> np.ndarray:
        if labels is None:
            return np.arange(len(self.labels))
        missing = [c for c in labels if c not in self.labels]
        if missing:
            raise ValueError(f"labels {missing} were not evaluated (have {list(self.labels)})")
        return np.asarray([self.labels.index(c) for c in labels], dtype=np.int64)

    def mean_dice(self, labels: Optional[Sequence[int]] = None) -> float:
        """Mean Dice over ``labels`` (default all), undefined classes left out."""
        return _nanmean(self.dice[self._select(labels)])

    def mean_hd95(self, labels: Optional[Sequence[int]] = None, mm: bool = False) -> float:
        """Mean HD95 over ``labels`` (voxels, or mm with ``mm=True``), undefined classes left out."""
        values = self.hd95_mm if mm else self.hd95
        if values is None:
            raise ValueError("HD95 in mm needs the voxel spacing; pass spacing= to segmentation_metrics")
        return _nanmean(values[self._select(labels)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: per-class values by name (undefined -> None) and the means."""
        out: dict[str, Any] = {"per_class": {}, "mean_dice": _nan_to_none(self.mean_dice()),
                               "mean_hd95": _nan_to_none(self.mean_hd95())}
        if self.hd95_mm is not None:
            out["mean_hd95_mm"] = _nan_to_none(self.mean_hd95(mm=True))
        for i, (label, name) in enumerate(zip(self.labels, self.names)):
            row = {"label": int(label), "dice": _nan_to_none(self.dice[i]), "hd95": _nan_to_none(self.hd95[i])}
            if self.hd95_mm is not None:
                row["hd95_mm"] = _nan_to_none(self.hd95_mm[i])
            out["per_class"][name] = row
        return out

    def table(self) -> str:
        return format_metrics_table(self.names, self.dice, self.hd95, self.hd95_mm)


def segmentation_metrics(pred: ArrayLike, target: ArrayLike, labels: Optional[Sequence[int]] = None, *,
                         names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                         one_hot: bool = False, spacing=None, ignore_empty: bool = True,
                         percentile: Optional[float] = 95.0) -> SegmentationMetrics:
    """Dice and HD95 (voxels; also mm when ``spacing`` is given) of every class in one pass.

    Surfaces are found once per class (inside the bounding box of the two masks) and
    measured both in voxels and with the spacing.
    """
    _check_percentile(percentile)
    if one_hot:
        p, t = _as_masks(pred, "prediction"), _as_masks(target, "ground truth")
        ndim = p.ndim - 1
    else:
        p, t = _as_label_map(pred, "prediction"), _as_label_map(target, "ground truth")
        ndim = p.ndim
    _check_same_shape(p, t)
    if labels is None:
        labels = tuple(range(1, p.shape[-1])) if one_hot else _default_labels(num_classes, p, t)
    labels = tuple(int(c) for c in labels)
    if names is None:
        names = tuple(f"label_{c}" for c in labels)
    names = tuple(str(n) for n in names)
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names given for {len(labels)} labels")
    sp = _spacing_tuple(spacing, ndim)
    spacings = [None] if sp is None else [None, sp]
    dice = dice_per_class(p, t, labels, one_hot=one_hot, ignore_empty=ignore_empty)
    hd = (_hd_masks if one_hot else _hd_label_maps)(p, t, labels, spacings, percentile)
    return SegmentationMetrics(labels, names, dice, hd[0], None if sp is None else hd[1])


def btcv_metrics(pred: ArrayLike, target: ArrayLike, *, spacing=None, ignore_empty: bool = True
                 ) -> SegmentationMetrics:
    """The 13 BTCV organs (label maps 0..13) with their names."""
    return segmentation_metrics(pred, target, BTCV_13_ORGANS, names=[BTCV_LABELS[c] for c in BTCV_13_ORGANS],
                                spacing=spacing, ignore_empty=ignore_empty)


def btcv_summary(result: SegmentationMetrics) -> dict[str, Optional[float]]:
    """BTCV means: all 13 organs and SelfMedMAE's 8 organs (Dice, HD95 voxels, HD95 mm if known)."""
    out = {"dice_mean_13": result.mean_dice(BTCV_13_ORGANS), "dice_mean_8": result.mean_dice(BTCV_8_ORGANS),
           "hd95_mean_13": result.mean_hd95(BTCV_13_ORGANS), "hd95_mean_8": result.mean_hd95(BTCV_8_ORGANS)}
    if result.hd95_mm is not None:
        out["hd95_mm_mean_13"] = result.mean_hd95(BTCV_13_ORGANS, mm=True)
        out["hd95_mm_mean_8"] = result.mean_hd95(BTCV_8_ORGANS, mm=True)
    return {k: _nan_to_none(v) for k, v in out.items()}


def _region_definition(convention) -> dict[str, tuple[int, ...]]:
    if isinstance(convention, str):
        if convention not in REGION_CONVENTIONS:
            raise ValueError(f"unknown region convention {convention!r}; use one of {sorted(REGION_CONVENTIONS)}"
                             " or a dict like {'WT': (1, 2, 3), 'TC': (2, 3), 'ET': (3,)}")
        return REGION_CONVENTIONS[convention]
    return {str(k): tuple(int(v) for v in vs) for k, vs in dict(convention).items()}


def region_masks(label_map: ArrayLike, convention: Union[str, Mapping[str, Sequence[int]]] = "msd",
                 regions: Sequence[str] = REGIONS) -> np.ndarray:
    """Binary region masks, channels-last ``(*spatial, len(regions))``, from a label map."""
    lab = _as_label_map(label_map, "label map")
    definition = _region_definition(convention)
    unknown = [r for r in regions if r not in definition]
    if unknown:
        raise ValueError(f"regions {unknown} not defined by convention {convention!r} (has {list(definition)})")
    return np.stack([np.isin(lab, definition[r]) for r in regions], axis=-1)


def region_metrics(pred: ArrayLike, target: ArrayLike, convention: Union[str, Mapping[str, Sequence[int]]] = "msd",
                   *, regions: Sequence[str] = REGIONS, spacing=None, ignore_empty: bool = True,
                   percentile: Optional[float] = 95.0) -> SegmentationMetrics:
    """Brain-tumour region Dice/HD95 (WT, TC, ET by default).

    ``target`` is a label map in ``convention``; ``pred`` is a label map in the same
    convention or region masks ``(*spatial, len(regions))`` (e.g. thresholded sigmoid
    outputs, in the order of ``regions``).
    """
    t = region_masks(target, convention, regions)
    p_arr = np.asarray(pred)
    if p_arr.shape == t.shape:
        p = _as_masks(p_arr, "prediction")
    elif p_arr.shape == t.shape[:-1]:
        p = region_masks(p_arr, convention, regions)
    else:
        raise ValueError(f"prediction shape {p_arr.shape} is neither the label-map shape {t.shape[:-1]} "
                         f"nor the region-mask shape {t.shape}")
    # every region channel is foreground: evaluate channels 0..R-1 (the result's labels are channel indices)
    return segmentation_metrics(p, t, tuple(range(len(regions))), names=regions, one_hot=True, spacing=spacing,
                                ignore_empty=ignore_empty, percentile=percentile)


def format_metrics_table(names: Sequence[str], dice: ArrayLike, hd95: Optional[ArrayLike] = None,
                         hd95_mm: Optional[ArrayLike] = None, *, mean_row: bool = True) -> str:
    """Plain-text table, one row per class (``-`` for undefined values) and a mean row."""
    cols: list[tuple[str, np.ndarray, str]] = [("Dice", np.asarray(dice, dtype=np.float64), "{:.4f}")]
    if hd95 is not None:
        cols.append(("HD95 (vox)", np.asarray(hd95, dtype=np.float64), "{:.2f}"))
    if hd95_mm is not None:
        cols.append(("HD95 (mm)", np.asarray(hd95_mm, dtype=np.float64), "{:.2f}"))
    for title, values, _ in cols:
        if len(values) != len(names):
            raise ValueError(f"{title}: {len(values)} values for {len(names)} names")
    rows = [["class"] + [c[0] for c in cols]]
    fmt = lambda f, v: f.format(v) if math.isfinite(v) else ("inf" if v == math.inf else "-")  # noqa: E731
    for i, name in enumerate(names):
        rows.append([str(name)] + [fmt(f, float(v[i])) for _, v, f in cols])
    if mean_row:
        rows.append(["mean"] + [fmt(f, _nanmean(v)) for _, v, f in cols])
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if mean_row:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays, dataclasses and NaN/inf (-> None) turned into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _nan_to_none(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------
# Classification: ROC-AUC
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AUCResult:
    """Per-class ROC-AUC (NaN where a label has one class only), their mean, and the labels left out."""

    names: tuple[str, ...]
    per_class: np.ndarray
    mean: float
    skipped: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"mean_auc": _nan_to_none(self.mean),
                "per_class": {n: _nan_to_none(v) for n, v in zip(self.names, self.per_class)},
                "skipped": list(self.skipped)}

    def table(self) -> str:
        cell = lambda v: f"{v:.4f}" if math.isfinite(v) else "-"  # noqa: E731
        w = max([len("class"), len("mean")] + [len(n) for n in self.names])
        rule = "-" * (w + 8)
        lines = [f"{'class'.ljust(w)}  {'AUC':>6}", rule]
        lines += [f"{n.ljust(w)}  {cell(v):>6}" for n, v in zip(self.names, self.per_class)]
        lines += [rule, f"{'mean'.ljust(w)}  {cell(self.mean):>6}"]
        if self.skipped:
            lines.append("undefined (one class only): " + ", ".join(self.skipped))
        return "\n".join(lines)


def binary_roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """ROC-AUC of one binary label; NaN when ``y_true`` holds a single class."""
    return float(roc_auc_per_class(np.asarray(y_true).reshape(-1, 1), np.asarray(y_score).reshape(-1, 1)).per_class[0])


def roc_auc_per_class(y_true: ArrayLike, y_score: ArrayLike, names: Optional[Sequence[str]] = None) -> AUCResult:
    """Per-class ROC-AUC of multi-label targets ``(N, K)`` (0/1) against scores ``(N, K)``.

    AUC = (rank sum of positives - n+(n+ + 1)/2) / (n+ n-) with average ranks for tied
    scores: exactly the trapezoid ROC area scikit-learn computes. A label whose targets are
    all 0 or all 1 is undefined: NaN, left out of the mean, and named in ``skipped``.
    """
    t = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if t.ndim == 1:
        t = t[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if t.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"y_true {np.shape(y_true)} and y_score {np.shape(y_score)} must both be (N, K) or (N,)")
    if t.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    if not np.all((t == 0) | (t == 1)):
        raise ValueError("y_true must be binary (0/1) per label")
    if not np.all(np.isfinite(s)):
        raise ValueError("y_score has NaN or infinite values")
    k = t.shape[1]
    names = tuple(f"label_{i}" for i in range(k)) if names is None else tuple(str(n) for n in names)
    if len(names) != k:
        raise ValueError(f"{len(names)} names given for {k} labels")
    t = t.astype(bool)
    ranks = stats.rankdata(s, method="average", axis=0)
    n_pos = t.sum(axis=0).astype(np.float64)
    n_neg = t.shape[0] - n_pos
    rank_sum = np.where(t, ranks, 0.0).sum(axis=0)
    defined = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc = np.where(defined, auc, np.nan)
    skipped = tuple(n for n, ok in zip(names, defined) if not ok)
    mean = float(auc[defined].mean()) if defined.any() else math.nan
    return AUCResult(names, auc, mean, skipped)

