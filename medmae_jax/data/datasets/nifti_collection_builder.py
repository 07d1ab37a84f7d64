"""A user's NIfTI collection as a TFDS array_record data set, preprocessed once at build time.

The same geometry code as the paper data sets (:func:`medmae_jax.data.nifti.load_case`: RAS,
resampling to ``spacing``, exact geometry kept to write predictions back), one intensity rule for
every channel (``ct-window:LO,HI`` -> [0, 1] clipped, ``percentile:P,Q`` -> [0, 1] clipped per
channel, or ``zscore-nonzero``), and a crop to the foreground extended to every labelled voxel.

Layout of ``<data_dir>/<NAME>/``: ``splits.json`` (case ids per split), ``collection.json``
(channel names, class names and values, preprocessing: what configs read), and the TFDS files
under ``nifti_collection/1.0.0`` (read with ``tfds.data_source("nifti_collection", data_dir=<data_dir>/<NAME>)``).
Labels are stored as class indices 0..K-1 in the order of ``collection.json`` ``class_values``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from medmae_jax.data import nifti, transforms
from medmae_jax.data.datasets import collection_splits, tfds_utils
from medmae_jax.data.datasets.collection_info import (
    INFO_FILE,
    digest,
    read_collection_info,  # noqa: F401 (re-exported)
    refuse_stale_reuse,
)
from medmae_jax.data.datasets.nifti_collection import (
    Collection,
    CollectionCase,
    case_channels,
    discover,
    strip_nifti_suffix,
    validate,
)
from medmae_jax.errors import ConfigError, DataError

TFDS_NAME = "nifti_collection"
DEFAULT_INTENSITY = {"ct": "ct-window:-175,250", "mr": "zscore-nonzero"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Build-time preprocessing of every case."""

    spacing: Optional[tuple[float, float, float]] = (1.5, 1.5, 2.0)  # mm; None keeps the file's grid
    intensity: str = "ct-window:-175,250"  # ct-window:LO,HI | percentile:P,Q | zscore-nonzero
    crop_foreground: bool = True  # crop to the image foreground, extended to keep every labelled voxel


def parse_intensity(spec: str) -> tuple[str, tuple[float, ...]]:
    """``"ct-window:-175,250"`` -> ``("ct-window", (-175.0, 250.0))``; a ConfigError for anything else."""
    kind, _, rest = spec.partition(":")
    try:
        values = tuple(float(v) for v in rest.split(",")) if rest else ()
    except ValueError:
        values = None
    ok = (kind in ("ct-window", "percentile") and values is not None and len(values) == 2
          and values[0] < values[1]) or \
         (kind == "zscore-nonzero" and values == ())
    if not ok:
        raise ConfigError(f"--intensity {spec!r}: use ct-window:LO,HI, percentile:P,Q (0 <= P < Q <= 100) or "
                          f"zscore-nonzero")
    if kind == "percentile" and not (0 <= values[0] and values[1] <= 100):
        raise ConfigError(f"--intensity {spec!r}: percentiles must lie in [0, 100]")
    return kind, values


def normalize(image: np.ndarray, intensity: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalized image, foreground mask (X, Y, Z)) under the intensity rule."""
    kind, values = parse_intensity(intensity)
    if kind == "ct-window":
        out = transforms.scale_intensity_range(image, values[0], values[1], 0.0, 1.0, clip=True)
        return out, (out > 0).any(-1)
    if kind == "percentile":
        # MONAI ScaleIntensityRangePerciles(lower, upper, 0, 1, clip=True, channel_wise=True)
        lo, hi = np.percentile(image.reshape(-1, image.shape[-1]), values, axis=0)
        out = np.stack([transforms.scale_intensity_range(image[..., c], lo[c], hi[c] if hi[c] > lo[c] else lo[c] + 1,
                                                         0.0, 1.0)
                        for c in range(image.shape[-1])], -1)
        return out, (out > 0).any(-1)
    return transforms.normalize_nonzero(image, channel_axis=-1), (image != 0).any(-1)


def preprocess(case: CollectionCase, class_values: list[int], prep: Preprocessing) -> dict:
    """One case as an example dict: image (X, Y, Z, C) float32, label class indices (X, Y, Z) uint8, geometry."""
    loaded = [nifti.load_case(f, case.label if i == 0 else None, pixdim=prep.spacing, channels=0,
                              label_values=class_values or None) for i, f in enumerate(case.images)]
    geometry = loaded[0].geometry
    image = np.concatenate([c.image for c in loaded], -1)
    label = loaded[0].label
    image, foreground = normalize(image, prep.intensity)
    if prep.crop_foreground:
        source = foreground if foreground.any() else np.ones_like(foreground)
        image, label, geometry = transforms.crop_case_to_foreground(image, label, geometry,
                                                                    source.astype(np.uint8))
    if label is not None:
        label = (np.searchsorted(np.asarray(class_values), label).astype(np.uint8) if class_values
                 else label.astype(np.uint8))
    else:
        label = np.zeros((0, 0, 0), np.uint8)
    return {"image": np.ascontiguousarray(image, np.float32), "label": np.ascontiguousarray(label),
            "has_label": case.label is not None, **geometry.to_features()}


class NiftiCollection(tfds_utils.QuietPrepare, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Any NIfTI collection (datalist, nnU-Net or plain folder); splits from ``splits.json``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "RAS, chosen spacing and intensity rule, foreground crop; pretrain/train/validation/test."}

    def __init__(self, *, collection: Optional[Collection] = None, splits: Optional[dict] = None,
                 preprocessing: Preprocessing = Preprocessing(), **kwargs):
        self._collection, self._splits, self._prep = collection, splits, preprocessing
        self.volume_shapes: dict[str, list[tuple[int, int, int]]] = {}  # split -> stored spatial shapes (as built)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds_utils.array_feature((None, None, None, None), np.float32, compress=False,
                                              doc="channels last, RAS voxel order, normalized"),
            "label": tfds_utils.array_feature((None, None, None), np.uint8, doc="class index; (0,0,0) if unlabelled"),
            "has_label": tfds.features.Scalar(dtype=np.bool_),
            "case_id": tfds.features.Text(),
            "image_file": tfds.features.Text(),
            **tfds_utils.geometry_features(),
        }
        return tfds_utils.dataset_info(self, features, __doc__)

    def _split_generators(self, dl_manager):
        by_id = {c.case_id: c for c in self._collection.cases}
        splits = tfds_utils.non_empty_splits(TFDS_NAME, {k: [by_id[i] for i in v] for k, v in self._splits.items()})
        values = sorted(self._collection.class_names)
        return {name: self._generate_examples(name, items, values) for name, items in splits.items()}

    def _generate_examples(self, split, items, values):
        for case in items:
            ex = preprocess(case, values, self._prep)
            self.volume_shapes.setdefault(split, []).append(tuple(int(n) for n in ex["image"].shape[:3]))
            ex["case_id"] = case.case_id
            ex["image_file"] = os.path.relpath(case.images[0], self._collection.root)
            yield case.case_id, ex


def build_nifti_collection(manual_dir: str, data_dir: str, name: str, *, datalist: Optional[str] = None,
                           preprocessing: Preprocessing = Preprocessing(),
                           rule: collection_splits.SplitRule = collection_splits.SplitRule(),
                           overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Discovers and checks the collection, fixes its splits (``NAME/splits.json``), writes
    ``NAME/collection.json`` and builds the TFDS data set into ``data_dir/NAME``; returns the builder."""
    collection = discover(manual_dir, datalist)
    channels = validate(collection)
    dataset_dir = os.path.join(os.fspath(data_dir), name)
    splits = collection_splits.load_or_make_splits(collection, rule, dataset_dir)
    values = sorted(collection.class_names)
    info = {
        "name": name, "layout": collection.layout, "root": collection.root,
        "num_channels": channels,
        "channel_names": list(collection.channel_names) if len(collection.channel_names) == channels
        else [f"channel{k}" for k in range(channels)],
        "num_classes": len(values), "class_values": values, "class_names": [collection.class_names[v] for v in values],
        "spacing": None if preprocessing.spacing is None else list(preprocessing.spacing),
        "intensity": preprocessing.intensity, "crop_foreground": preprocessing.crop_foreground,
        "splits": {k: len(v) for k, v in splits.items()},
    }
    info["build"] = {"spacing": info["spacing"], "intensity": info["intensity"],
                     "crop_foreground": info["crop_foreground"], "num_channels": channels, "class_values": values,
                     "splits": digest(splits)}
    refuse_stale_reuse(dataset_dir, TFDS_NAME, info["build"], overwrite)
    previous = _read_info_if_any(dataset_dir)
    _write_info(dataset_dir, info)
    builder = tfds_utils.build(NiftiCollection, manual_dir, dataset_dir, overwrite=overwrite,
                               builder_kwargs={"collection": collection, "splits": splits,
                                               "preprocessing": preprocessing})
    if builder.volume_shapes:  # generated now; a reused build keeps the sizes recorded when it was generated
        info["volume_shapes"] = summarize_shapes(builder.volume_shapes)
    elif "volume_shapes" in previous:
        info["volume_shapes"] = previous["volume_shapes"]
    _write_info(dataset_dir, info)
    return builder


def summarize_shapes(shapes: dict[str, list[tuple[int, int, int]]]) -> dict[str, dict[str, list[int]]]:
    """Per split, the smallest and largest stored volume size per axis (voxels), for the ROI check before training."""
    return {split: {"min": [int(n) for n in np.min(s, 0)], "max": [int(n) for n in np.max(s, 0)]}
            for split, s in shapes.items() if s}


def _read_info_if_any(dataset_dir: str) -> dict:
    path = os.path.join(dataset_dir, INFO_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # unreadable: rewritten below


def _write_info(dataset_dir: str, info: dict) -> None:
    tmp = os.path.join(dataset_dir, INFO_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(dataset_dir, INFO_FILE))


def preprocessing_of(info: dict) -> Preprocessing:
    """The build-time preprocessing recorded in a collection's ``collection.json``."""
    spacing = info.get("spacing")
    return Preprocessing(spacing=None if spacing is None else tuple(float(s) for s in spacing),
                         intensity=info["intensity"], crop_foreground=bool(info.get("crop_foreground", True)))


def preprocess_files(paths, info: dict) -> dict:
    """New image file(s) (one 4-D file or one 3-D file per channel) preprocessed exactly as the collection was."""
    case = CollectionCase(strip_nifti_suffix(os.path.basename(paths[0])), tuple(os.fspath(p) for p in paths), None,
                          "--input", "test", "")
    _, _, channels = case_channels(case)
    if channels != int(info["num_channels"]):
        raise DataError(paths[0], f"{channels} channel(s) given; the collection {info.get('name')!r} has "
                                  f"{info['num_channels']} ({', '.join(info.get('channel_names', []))})")
    return preprocess(case, [], preprocessing_of(info))


def class_indices_to_values(pred: np.ndarray, info: dict) -> np.ndarray:
    """Predicted class indices 0..K-1 -> the collection's own label values (``class_values``)."""
    values = np.asarray(info.get("class_values") or range(int(pred.max()) + 1))
    return values[np.asarray(pred, np.int64)]
