"""A user's folder of 2-D images (PNG/JPEG, 8/16-bit, RGBA) with an optional multi-label CSV, as a TFDS data set.

Images are decoded and resized once at build time by the ChestX-ray14 rules (:mod:`medmae_jax.data.png`: alpha
dropped, colour -> luma, 16-bit scaled by the image's range, shorter side resized then centre crop). The CSV names
each image (``--image-column``, default ``Image Index`` or ``image``) and gives its labels either as 0/1 columns
(``--label-columns a,b``) or as one ``|``-separated findings column (``--findings-column``, default
``Finding Labels``; ``No Finding`` = no label), as ChestX-ray14 does. Images the CSV does not name are unlabeled
(pre-training only). ``--patient-column`` keeps every patient's images in one split.

``<data_dir>/<NAME>/``: ``splits.json``, ``collection.json`` and the TFDS files (``image_folder/1.0.0``).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from medmae_jax.data import png
from medmae_jax.data.datasets import collection_splits, tfds_utils
from medmae_jax.data.datasets.collection_info import INFO_FILE, digest, refuse_stale_reuse
from medmae_jax.data.datasets.nifti_collection import Collection, CollectionCase
from medmae_jax.errors import DataError

TFDS_NAME = "image_folder"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NO_FINDING = "No Finding"


def find_images(root: str) -> dict[str, str]:
    """Relative path -> full path of every PNG/JPEG below ``root`` (a CSV may name the path or the file name)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."):
                full = os.path.join(dirpath, f)
                out[os.path.relpath(full, root)] = full
    if not out:
        raise DataError(root, "no .png/.jpg/.jpeg image found")
    return out


def read_labels(path: str, images: dict[str, str], *, image_column: Optional[str] = None,
                label_columns: Sequence[str] = (), findings_column: Optional[str] = None,
                patient_column: Optional[str] = None) -> tuple[list[str], dict[str, np.ndarray], dict[str, str]]:
    """(class names, image -> multi-hot labels, image -> patient) from the CSV; rows naming no image are errors."""
    by_name = {}
    for rel in images:
        by_name.setdefault(os.path.basename(rel), rel)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(path, "the label CSV has no row")
    columns = list(rows[0])
    defaults = ("Image Index", "image", "Image", "filename")
    image_column = image_column or next((c for c in defaults if c in columns), None)
    if image_column not in columns:
        raise DataError(path, f"no image column (--image-column); columns are {columns}")
    for c in (*label_columns, patient_column):
        if c and c not in columns:
            raise DataError(path, f"column {c!r} not in the CSV; columns are {columns}")
    if not label_columns:
        findings_column = findings_column or ("Finding Labels" if "Finding Labels" in columns else None)
        if findings_column not in columns:
            raise DataError(path, f"give --label-columns or a findings column (--findings-column); "
                                  f"columns are {columns}")
        names = sorted({x.strip() for r in rows for x in r[findings_column].split("|")} - {NO_FINDING, ""})
    else:
        names = list(label_columns)
    labels, patients = {}, {}
    for i, row in enumerate(rows, start=2):
        key = row[image_column]
        rel = key if key in images else by_name.get(key)
        if rel is None:
            raise DataError(path, f"line {i}: image {key!r} not found under the image folder")
        if rel in labels:
            raise DataError(path, f"line {i}: duplicate image {key!r}")
        if label_columns:
            try:
                labels[rel] = np.asarray([float(row[c]) for c in label_columns], np.float32)
            except ValueError as e:
                raise DataError(path, f"line {i}: label columns must be 0/1 ({e})") from e
        else:
            found = {x.strip() for x in row[findings_column].split("|")} - {NO_FINDING, ""}
            labels[rel] = np.asarray([n in found for n in names], np.float32)
        patients[rel] = row[patient_column] if patient_column else rel
    return names, labels, patients


def as_collection(root: str, images: dict[str, str], labels: dict, patients: dict,
                  csv_path: Optional[str]) -> Collection:
    """The images as collection cases (labeled: named by the CSV) so the NIfTI split rules apply unchanged."""
    cases = tuple(CollectionCase(rel, (full,), csv_path if rel in labels else None, rel,
                                 "training" if rel in labels else "unlabeled", patients.get(rel, rel))
                  for rel, full in images.items())
    return Collection(root, "images", cases, ("gray",), {})


class ImageFolder(tfds_utils.QuietPrepare, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """2-D images resized at build time, multi-hot labels; splits from ``splits.json``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8-bit gray PNG resized at build time; pretrain/train/validation."}

    def __init__(self, *, images=None, labels=None, splits=None, image_size: int = 256, num_classes: int = 0, **kwargs):
        self._images, self._labels, self._splits = images, labels, splits
        self._size, self._num_classes = image_size, num_classes
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(self._size, self._size, 1), dtype=np.uint8, encoding_format="png",
                                         doc="8-bit gray, resized at build time"),
            "labels": tfds_utils.array_feature((None,), np.float32, doc="multi-hot in collection.json class order"),
            "has_label": tfds.features.Scalar(dtype=np.bool_),
            "image_name": tfds.features.Text(),
        }
        return tfds_utils.dataset_info(self, features, __doc__)

    def _split_generators(self, dl_manager):
        splits = tfds_utils.non_empty_splits(TFDS_NAME, dict(self._splits))
        return {name: self._generate_examples(items) for name, items in splits.items()}

    def _generate_examples(self, items):
        for rel in items:
            gray = png.resize_square(png.read_png_gray(self._images[rel]), self._size)
            labels = self._labels.get(rel)
            yield rel, {"image": png.encode_png(gray),  # PNG bytes: no TensorFlow needed to encode
                        "labels": labels if labels is not None else np.zeros((self._num_classes,), np.float32),
                        "has_label": labels is not None, "image_name": rel}


def build_image_folder(manual_dir: str, data_dir: str, name: str, *, labels_csv: Optional[str] = None,
                       image_size: int = 256, rule: collection_splits.SplitRule = collection_splits.SplitRule(),
                       overwrite: bool = False, **csv_kwargs) -> tfds.core.DatasetBuilder:
    """Finds the images, reads the CSV, fixes the splits (``NAME/splits.json``), writes ``NAME/collection.json``
    and builds into ``data_dir/NAME``; returns the builder."""
    root = os.path.abspath(os.fspath(manual_dir))
    if not os.path.isdir(root):
        raise DataError(root, "folder not found (--manual-dir)")
    images = find_images(root)
    names, labels, patients = ([], {}, {}) if labels_csv is None else read_labels(labels_csv, images, **csv_kwargs)
    collection = as_collection(root, images, labels, patients, labels_csv)
    dataset_dir = os.path.join(os.fspath(data_dir), name)
    splits = collection_splits.load_or_make_splits(collection, rule, dataset_dir)
    info = {"name": name, "layout": "images", "root": root, "num_channels": 1, "channel_names": ["gray"],
            "num_classes": len(names), "class_names": names, "image_size": image_size,
            "splits": {k: len(v) for k, v in splits.items()}}
    info["build"] = {"image_size": image_size, "class_names": names, "splits": digest(splits),
                     "labels": digest({k: np.asarray(v).tolist() for k, v in labels.items()})}
    refuse_stale_reuse(dataset_dir, TFDS_NAME, info["build"], overwrite)
    tmp = os.path.join(dataset_dir, INFO_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(dataset_dir, INFO_FILE))
    return tfds_utils.build(ImageFolder, root, dataset_dir, overwrite=overwrite,
                            builder_kwargs={"images": images, "labels": labels, "splits": splits,
                                            "image_size": image_size, "num_classes": len(names)})
