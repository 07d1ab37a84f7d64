"""Whole-volume evaluation of a segmentation predictor over a split: per-class Dice and HD95 of every case.

Per case: the prediction on the preprocessed (resampled) grid is compared with the stored
label map there (Dice, HD95 in voxels as the references report it, and in mm of that grid);
when the example carries its geometry (built BTCV/MSD data) the prediction is also put back on
the file's own grid (:func:`medmae_jax.data.nifti.to_original`) and compared there with the
original label file (``manual_dir`` given) or, without it, with the stored label mapped back the
same way: Dice and HD95 in millimetres in the original geometry. Summaries follow SelfMedMAE:
per class the mean over cases (undefined values left out), then the mean over classes; BTCV
also gets the 8-organ mean, MSD the WT/TC/ET regions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from medmae_jax.data import nifti
from medmae_jax.data.labels import BTCV_8_ORGANS, SegmentationLabels
from medmae_jax.evaluate import metrics as metrics_lib

log = logging.getLogger(__name__)

#: One volume ``(*spatial, C)`` -> a label map (multiclass) or region masks ``(*spatial, R)`` (regions).
Predictor = Callable[[np.ndarray], np.ndarray]


def _as_str(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _as_str(x.item())
    return str(x)


def _nanmean(values, axis=None):
    v = np.asarray(values, np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(v)
        total = np.where(ok, v, 0.0).sum(axis=axis)
        count = ok.sum(axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _finite_or_none(v) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


@dataclasses.dataclass
class CaseResult:
    """One case: Dice (and HD95) per reported class on the resampled grid, and in the original geometry."""

    case_id: str
    dice: np.ndarray                       # (K,) resampled grid
    hd95_vox: Optional[np.ndarray] = None  # (K,) voxels of the resampled grid
    hd95_mm: Optional[np.ndarray] = None   # (K,) mm on the resampled grid
    dice_original: Optional[np.ndarray] = None    # (K,) original geometry
    hd95_mm_original: Optional[np.ndarray] = None  # (K,) mm in the original geometry
    original_label: Optional[str] = None   # "file" (read from manual_dir) | "mapped back" (stored label resampled back)


@dataclasses.dataclass
class SplitResult:
    """Per-case results of one split and their summaries."""

    split: str
    kind: str
    names: tuple[str, ...]
    cases: list[CaseResult]
    btcv: bool = False
    unlabelled: int = 0

    def _stack(self, field: str) -> Optional[np.ndarray]:
        values = [getattr(c, field) for c in self.cases]
        if not values or any(v is None for v in values):
            return None
        return np.stack(values)

    def per_class(self, field: str = "dice") -> Optional[np.ndarray]:
        """Mean over cases of each class (NaN where no case defines it)."""
        stacked = self._stack(field)
        return None if stacked is None else _nanmean(stacked, axis=0)

    def summary(self) -> dict[str, Optional[float]]:
        out: dict[str, Optional[float]] = {}
        for field, key in (("dice", "dice"), ("hd95_vox", "hd95"), ("hd95_mm", "hd95_mm"),
                           ("dice_original", "dice_original"), ("hd95_mm_original", "hd95_mm_original")):
            per_class = self.per_class(field)
            if per_class is None:
                continue
            out[f"mean_{key}"] = _finite_or_none(_nanmean(per_class))
            if self.btcv:
                idx = [c - 1 for c in BTCV_8_ORGANS]
                out[f"mean_{key}_8"] = _finite_or_none(_nanmean(per_class[idx]))
        return out

    def scalar_metrics(self) -> dict[str, float]:
        """Finite scalars for the metric writer and best-checkpoint keeping (``mean_dice``, ``dice/<class>``)."""
        out = {k: v for k, v in self.summary().items() if v is not None}
        for field, prefix in (("dice", "dice"), ("hd95_vox", "hd95")):
            per_class = self.per_class(field)
            if per_class is None:
                continue
            for name, v in zip(self.names, per_class):
                if math.isfinite(float(v)):
                    out[f"{prefix}/{name}"] = float(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        per_class: dict[str, dict] = {}
        for i, name in enumerate(self.names):
            row = {}
            for field in ("dice", "hd95_vox", "hd95_mm", "dice_original", "hd95_mm_original"):
                values = self.per_class(field)
                if values is not None:
                    row[field] = _finite_or_none(values[i])
            per_class[name] = row
        cases = []
        for c in self.cases:
            row = {"case_id": c.case_id}
            for field in ("dice", "hd95_vox", "hd95_mm", "dice_original", "hd95_mm_original"):
                v = getattr(c, field)
                if v is not None:
                    row[field] = {n: _finite_or_none(x) for n, x in zip(self.names, v)}
            if c.original_label:
                row["original_label"] = c.original_label
            cases.append(row)
        return {"split": self.split, "kind": self.kind, "num_cases": len(self.cases),
                "num_unlabelled_skipped": self.unlabelled, "classes": list(self.names),
                "summary": self.summary(), "per_class": per_class, "cases": cases,
                "notes": {"hd95_vox": "voxels of the preprocessed (resampled) grid, as the references report",
                          "hd95_mm": "millimetres on the preprocessed grid",
                          "*_original": "the prediction put back on each file's own grid (nifti.to_original)"}}

    def table(self) -> str:
        if not self.cases:
            return f"{self.split}: no labelled case ({self.unlabelled} unlabelled skipped)"
        dice = self.per_class("dice")
        hd = self.per_class("hd95_vox")
        hd_mm = self.per_class("hd95_mm_original")
        if hd_mm is None:
            hd_mm = self.per_class("hd95_mm")
        text = metrics_lib.format_metrics_table(self.names, dice, hd, hd_mm)
        s = self.summary()
        lines = [f"{self.split}: {len(self.cases)} case(s), {self.kind}", text]
        if self.btcv:
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"BTCV mean Dice: 13 organs {fmt(s.get('mean_dice'))}, 8 organs {fmt(s.get('mean_dice_8'))}")
        return "\n".join(lines)


def _geometry(example):
    if "original_affine" not in example or "crop_box" not in example:
        return None
    return nifti.Geometry.from_features(example)


def original_label_path(data_name: str, manual_dir: str, image_file: str) -> Optional[str]:
    """The original label file of a built example (BTCV ``img/imgXXXX`` -> ``label/labelXXXX``; MSD ``imagesTr`` ->
    ``labelsTr``), or None when it is not on disk."""
    if not manual_dir or not image_file:
        return None
    candidates = []
    if "btcv" in data_name:
        from medmae_jax.data.datasets import btcv  # its builder imports tensorflow_datasets: only when asked
        try:
            root = btcv.find_training_root(manual_dir)
        except Exception:  # noqa: BLE001 - no BTCV layout there
            root = manual_dir
        name = os.path.basename(image_file).replace("img", "label", 1)
        candidates += [os.path.join(root, "label", name),
                       os.path.join(manual_dir, os.path.dirname(os.path.dirname(image_file)), "label", name)]
    else:
        from medmae_jax.data.datasets import msd_brain_tumour as msd  # tensorflow_datasets, only when asked
        try:
            task_dir = msd.find_task_dir(manual_dir)
        except Exception:  # noqa: BLE001
            task_dir = manual_dir
        candidates.append(os.path.join(task_dir, image_file.replace("imagesTr", "labelsTr")))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _case_metrics(kind: str, pred, target, channels, names, spacing, hd95: bool):
    if kind == "regions":
        p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
        labels = tuple(range(p.shape[-1]))
        one_hot = True
    else:
        p, t = pred, target
        labels = tuple(channels)
        one_hot = False
    if not hd95:
        dice = _region_dice(p, t) if one_hot else metrics_lib.dice_per_class(p, t, labels)
        return dice, None, None
    m = metrics_lib.segmentation_metrics(p, t, labels, names=names, one_hot=one_hot, spacing=spacing)
    return m.dice, m.hd95, m.hd95_mm


def _region_dice(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Dice of every channel of channels-last masks (all channels are foreground), NaN where the truth is empty."""
    axes = tuple(range(p.ndim - 1))
    inter = np.sum(p & t, axis=axes).astype(np.float64)
    n_p, n_t = p.sum(axis=axes).astype(np.float64), t.sum(axis=axes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 2 * inter / (n_p + n_t)
    d[n_t == 0] = np.nan
    return d


def evaluate_split(predict: Predictor, source, conventions: SegmentationLabels, *, split: str,
                   limit: Optional[int] = None, hd95: bool = True, original: Optional[bool] = None,
                   manual_dir: str = "", data_name: str = "", figures_dir: str = "", max_figures: int = 4,
                   compare: Optional[Mapping[str, Predictor]] = None) -> SplitResult:
    """Whole-volume evaluation of the labelled cases of ``source`` (the examples of ``split``).

    ``predict`` maps one volume ``(*spatial, C)`` to the model's prediction: a label map (multiclass) or region masks
    in the model's channel order (regions); ``conventions`` says how predictions and label maps are read and
    reported. ``limit``: at most this many volumes. ``hd95``: also HD95 (voxels; mm when the example has a spacing).
    ``original`` (default: with ``hd95``): also the metrics in each file's original geometry, against the label file
    under ``manual_dir`` (the data set ``data_name``'s download folder) when found. ``figures_dir``: overlays of the
    first ``max_figures`` cases (see :mod:`medmae_jax.evaluate.figures`); ``compare`` (``{name: predictor}``, e.g.
    the from-scratch run) adds their predictions as further columns, like the paper's scratch-vs-MAE figures.
    """
    names, channels = conventions.names, conventions.channels
    n = len(source) if limit is None else min(len(source), int(limit))
    original = hd95 if original is None else original
    cases: list[CaseResult] = []
    unlabelled = 0
    figures = 0
    for i in range(n):
        ex = source[i]
        case_id = _as_str(ex["case_id"]) if "case_id" in ex else f"case{int(ex.get('index', i)):04d}"
        label = np.asarray(ex.get("label", np.zeros((0, 0, 0), np.uint8)))
        if label.size == 0 or ("has_label" in ex and not bool(np.asarray(ex["has_label"]))):
            unlabelled += 1
            continue
        image = np.asarray(ex["image"], np.float32)
        if image.ndim == 3:
            image = image[..., None]
        pred = predict(image)
        pixdim = np.asarray(ex["pixdim"], np.float64) if "pixdim" in ex else None
        spacing = tuple(pixdim) if pixdim is not None and np.all(pixdim > 0) else None
        dice, hd_vox, hd_mm = _case_metrics(conventions.kind, conventions.reported(pred), conventions.targets(label),
                                            channels, names, spacing, hd95)
        result = CaseResult(case_id, np.asarray(dice, np.float64),
                            None if hd_vox is None else np.asarray(hd_vox, np.float64),
                            None if hd_mm is None else np.asarray(hd_mm, np.float64))
        geometry = _geometry(ex) if original else None
        if geometry is not None:
            pred_o = nifti.to_original(pred, geometry, mode="nearest")
            label_file = original_label_path(data_name, manual_dir, _as_str(ex.get("image_file", "")))
            if label_file is not None:
                label_o, _ = nifti.read_label(label_file)
                result.original_label = "file"
            else:
                label_o = nifti.to_original(label, geometry, mode="nearest")
                result.original_label = "mapped back"
            d_o, _, hd_o = _case_metrics(conventions.kind, conventions.reported(pred_o), conventions.targets(label_o),
                                         channels, names, tuple(geometry.spacing), True)
            result.dice_original, result.hd95_mm_original = np.asarray(d_o), np.asarray(hd_o)
        cases.append(result)
        if figures_dir and figures < max_figures:
            from medmae_jax.evaluate.figures import save_case_figure  # matplotlib only when drawing
            os.makedirs(figures_dir, exist_ok=True)
            others = {name: other(image) for name, other in (compare or {}).items()}
            save_case_figure(os.path.join(figures_dir, f"{case_id}.png"), image, label, pred, conventions,
                             title=f"{case_id} ({split})", others=others)
            figures += 1
        log.info("%s %s: mean Dice %.4f", split, case_id, float(_nanmean(result.dice)))
    return SplitResult(split, conventions.kind, names, cases, btcv=conventions.btcv, unlabelled=unlabelled)
