"""Finds and checks the cases of a user's own NIfTI collection before anything is preprocessed.

Three layouts, tried in this order:

- a datalist in the MSD/MONAI ``dataset.json`` form: ``training`` (``{"image", "label"}``, optional
  ``fold`` and ``patient``), optional ``validation`` (same form), ``test`` (images only, as paths
  or ``{"image"}``), optional ``unlabeled`` (images only), ``modality`` (channel names) and
  ``labels`` (value -> class name). An image is one file (3-D, or 4-D with the channels last) or a
  list of 3-D files, one per channel, as MSD and BraTS ship them. Paths are relative to the
  datalist's folder (MONAI's ``load_decathlon_datalist`` default);
- the nnU-Net raw-data folder: ``imagesTr/CASE_0000.nii.gz`` (``_XXXX`` = channel), ``labelsTr/CASE.nii.gz``,
  ``imagesTs/`` (its ``dataset.json`` ``channel_names``/``labels`` are used when present);
- a plain folder: every ``.nii``/``.nii.gz`` below it is one unlabeled case.

:func:`validate` reads headers (and label values) and raises one :class:`DataError` naming the
entry for: missing file, image/label shape or affine mismatch, label values not in ``labels``,
channel count differing between cases, duplicate case, a patient in two datalist splits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import numpy as np

from medmae_jax.data import nifti
from medmae_jax.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclasses.dataclass(frozen=True)
class CollectionCase:
    """One case: its image file(s) (one 4-D file, or one 3-D file per channel) and optional label."""

    case_id: str
    images: tuple[str, ...]
    label: Optional[str]
    entry: str  # where it was listed, e.g. "dataset.json training[3]" or "imagesTr/CASE"
    group: str  # "training" | "validation" | "test" | "unlabeled"
    patient: str
    fold: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Collection:
    """Every case of a collection plus its channel and class names (class names keyed by label value)."""

    root: str
    layout: str  # "datalist" | "nnunet" | "folder"
    cases: tuple[CollectionCase, ...]
    channel_names: tuple[str, ...]
    class_names: dict[int, str]

    @property
    def labeled(self) -> list[CollectionCase]:
        return [c for c in self.cases if c.label is not None]


def strip_nifti_suffix(name: str) -> str:
    """``img0001.nii.gz`` -> ``img0001``."""
    for ext in NIFTI_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _is_nifti(name: str) -> bool:
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def discover(manual_dir: str, datalist: Optional[str] = None) -> Collection:
    """The collection in ``manual_dir``: from ``datalist`` if given (or ``manual_dir/dataset.json``
    with a ``training`` list), else the nnU-Net layout, else every volume as an unlabeled case."""
    manual_dir = os.path.abspath(os.fspath(manual_dir))
    if not os.path.isdir(manual_dir):
        raise DataError(manual_dir, "folder not found (--manual-dir)")
    if datalist is None:
        candidate = os.path.join(manual_dir, "dataset.json")
        if os.path.isfile(candidate) and "training" in _read_json(candidate):
            datalist = candidate
    if datalist is not None:
        return read_datalist(datalist)
    if os.path.isdir(os.path.join(manual_dir, "imagesTr")):
        return read_nnunet(manual_dir)
    return read_plain_folder(manual_dir)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot parse the datalist ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(path, f"expected a JSON object, got {type(meta).__name__}")
    return meta


def _names_by_index(path: str, key: str, table) -> dict[int, str]:
    if not isinstance(table, dict):
        raise DataError(path, f"{key!r} must map an integer to a name, got {table!r}")
    try:
        return {int(k): str(v) for k, v in table.items()}
    except (TypeError, ValueError) as e:
        raise DataError(path, f"{key!r} keys must be integers, got {list(table)}") from e


def read_datalist(path: str) -> Collection:
    """Cases of an MSD/MONAI datalist; every listed file must exist (the error names the entry)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise DataError(path, "datalist not found (--datalist)")
    meta = _read_json(path)
    base = os.path.dirname(path)
    name = os.path.basename(path)
    if "training" not in meta and "unlabeled" not in meta and "test" not in meta:
        raise DataError(path, "datalist has no 'training', 'test' or 'unlabeled' list")
    channels = _names_by_index(path, "modality", meta.get("modality", {"0": "image"}))
    classes = _names_by_index(path, "labels", meta["labels"]) if "labels" in meta else {}
    if "training" in meta and not classes:
        raise DataError(path, "datalist has a 'training' list but no 'labels' (value -> class name)")
    cases = []
    for group, labeled in (("training", True), ("validation", True), ("test", False), ("unlabeled", False)):
        items = meta.get(group, [])
        if not isinstance(items, list):
            raise DataError(path, f"{group!r} must be a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            entry = f"{name} {group}[{i}]"
            cases.append(_datalist_case(base, path, entry, group, item, labeled))
    return Collection(base, "datalist", tuple(cases), tuple(channels[k] for k in sorted(channels)), classes)


def _datalist_case(base: str, path: str, entry: str, group: str, item, labeled: bool) -> CollectionCase:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        raise DataError(path, f"{entry} must be {{'image': ...{', label: ...' if labeled else ''}}}, got {item!r}")
    if labeled and "label" not in item:
        raise DataError(path, f"{entry} has no 'label' (unlabeled images belong in 'test' or 'unlabeled')")
    raw = item["image"] if isinstance(item["image"], list) else [item["image"]]
    images = tuple(_listed(base, path, entry, p) for p in raw)
    label = _listed(base, path, entry, item["label"]) if labeled else None
    case_id = str(item.get("case_id") or strip_nifti_suffix(os.path.basename(images[0])))
    if len(images) > 1:
        case_id = _CHANNEL_SUFFIX.sub(r"\g<case>", case_id)
    fold = item.get("fold")
    if fold is not None and not isinstance(fold, int):
        raise DataError(path, f"{entry} 'fold' must be an integer, got {fold!r}")
    return CollectionCase(case_id, images, label, entry, group, str(item.get("patient", case_id)), fold)


def _listed(base: str, path: str, entry: str, rel) -> str:
    if not isinstance(rel, str):
        raise DataError(path, f"{entry}: expected a file path, got {rel!r}")
    full = os.path.normpath(os.path.join(base, rel))
    if not os.path.isfile(full):
        raise DataError(full, f"listed in {entry} but missing on disk")
    return full


def read_nnunet(root: str) -> Collection:
    """Cases of an nnU-Net raw-data folder (``imagesTr``, ``labelsTr``, ``imagesTs``)."""
    meta_path = os.path.join(root, "dataset.json")
    meta = _read_json(meta_path) if os.path.isfile(meta_path) else {}
    cases = []
    for folder, group in (("imagesTr", "training"), ("imagesTs", "test")):
        for case_id, files in sorted(_channel_files(os.path.join(root, folder)).items()):
            label = None
            if group == "training":
                label = _find_label(os.path.join(root, "labelsTr"), case_id)
                if label is None:
                    raise DataError(os.path.join(root, "labelsTr"),
                                    f"no label for {folder}/{case_id} (expected labelsTr/{case_id}.nii.gz)")
            cases.append(CollectionCase(case_id, files, label, f"{folder}/{case_id}", group, case_id))
    if not cases:
        raise DataError(root, "imagesTr/ and imagesTs/ hold no .nii/.nii.gz file")
    channels = meta.get("channel_names") or meta.get("modality")
    channels = _names_by_index(meta_path, "channel_names", channels) if channels else None
    n = len(cases[0].images)
    names = tuple(channels[k] for k in sorted(channels)) if channels else tuple(f"channel{k}" for k in range(n))
    labels = meta.get("labels")
    classes = {}
    if isinstance(labels, dict) and labels:
        first = next(iter(labels))
        classes = ({int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
                   if not str(first).lstrip("-").isdigit() else _names_by_index(meta_path, "labels", labels))
    return Collection(root, "nnunet", tuple(cases), names, classes)


def _channel_files(folder: str) -> dict[str, tuple[str, ...]]:
    """case id -> its channel files in channel order (``_0000``, ``_0001``, ...)."""
    if not os.path.isdir(folder):
        return {}
    by_case: dict[str, dict[int, str]] = {}
    for fname in sorted(os.listdir(folder)):
        if not _is_nifti(fname):
            continue
        stem = strip_nifti_suffix(fname)
        m = _CHANNEL_SUFFIX.match(stem)
        case_id, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        by_case.setdefault(case_id, {})[channel] = os.path.join(folder, fname)
    out = {}
    for case_id, files in by_case.items():
        if sorted(files) != list(range(len(files))):
            raise DataError(folder,
                            f"case {case_id} has channel files {sorted(files)}; expected _0000.._{len(files) - 1:04d}")
        out[case_id] = tuple(files[k] for k in sorted(files))
    return out


def _find_label(folder: str, case_id: str) -> Optional[str]:
    for ext in NIFTI_SUFFIXES:
        p = os.path.join(folder, case_id + ext)
        if os.path.isfile(p):
            return p
    return None


def read_plain_folder(root: str) -> Collection:
    """Every ``.nii``/``.nii.gz`` below ``root`` as one unlabeled single-file case (id = relative path)."""
    cases = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            if _is_nifti(fname):
                full = os.path.join(dirpath, fname)
                case_id = strip_nifti_suffix(os.path.relpath(full, root)).replace(os.sep, "__")
                cases.append(CollectionCase(case_id, (full,), None, os.path.relpath(full, root), "unlabeled", case_id))
    if not cases:
        raise DataError(root, "no .nii/.nii.gz file found (and no dataset.json or imagesTr/)")
    return Collection(root, "folder", tuple(sorted(cases, key=lambda c: c.case_id)), ("image",), {})


# --------------------------------------------------------------------------------------------
# validation


def case_channels(case: CollectionCase) -> tuple[tuple[int, int, int], np.ndarray, int]:
    """(spatial shape, affine, channel count) of a case from its headers; channel files must share one grid."""
    shape = affine = None
    total = 0
    for f in case.images:
        img = nifti._load_image(f)
        spatial, n = nifti._spatial_and_channels(img.shape, f, 0 if len(case.images) == 1 else None)
        if shape is None:
            shape, affine = spatial, np.asarray(img.affine, np.float64)
        else:
            try:
                nifti.check_same_grid(case.images[0], shape, affine, f, spatial, img.affine)
            except DataError as e:
                raise DataError(f, f"{case.entry}: channel file grid differs from {case.images[0]} "
                                   f"({e.problem.splitlines()[0]})") from e
        total += n
    return shape, affine, total


def validate(collection: Collection, *, check_label_values: bool = True) -> int:
    """Checks every case (headers, grids, label values, duplicates, channel counts, patients);
    returns the channel count shared by all cases."""
    seen: dict[str, str] = {}
    channels = None
    first_entry = None
    for case in collection.cases:
        if case.case_id in seen:
            raise DataError(case.images[0],
                            f"{case.entry}: duplicate case {case.case_id!r} (also {seen[case.case_id]})")
        seen[case.case_id] = case.entry
        shape, affine, n = case_channels(case)
        if channels is None:
            channels, first_entry = n, case.entry
        elif n != channels:
            raise DataError(case.images[0], f"{case.entry}: {n} channel(s) but {first_entry} has {channels}")
        if case.label is not None:
            _check_label(collection, case, shape, affine, check_label_values)
    if (collection.layout == "datalist" and collection.channel_names != ("image",)
            and len(collection.channel_names) != channels):
        raise DataError(collection.root, f"'modality' names {len(collection.channel_names)} channel(s) "
                                         f"{list(collection.channel_names)} but the images hold {channels}")
    check_patients(collection)
    return int(channels)


def _check_label(collection: Collection, case: CollectionCase, shape, affine, check_values: bool) -> None:
    img = nifti._load_image(case.label)
    spatial, _ = nifti._spatial_and_channels(img.shape, case.label, None)
    try:
        nifti.check_same_grid(case.images[0], shape, affine, case.label, spatial, img.affine)
    except DataError as e:
        raise DataError(case.label, f"{case.entry}: {e.problem.splitlines()[0]}") from e
    if check_values and collection.class_names:
        values = np.unique(np.asarray(nifti._read_data(img, case.label)))
        bad = [v for v in values.tolist() if v not in collection.class_names]
        if bad:
            raise DataError(case.label,
                            f"{case.entry}: label values {bad[:10]} not in 'labels' {sorted(collection.class_names)}")


def check_patients(collection: Collection) -> None:
    """A patient may not sit in two datalist groups (training/validation/test) or two folds."""
    where: dict[str, tuple[str, CollectionCase]] = {}
    for case in collection.cases:
        if case.group == "unlabeled":
            continue  # unlabeled images only ever serve pre-training
        key = f"{case.group} fold {case.fold}" if case.fold is not None else case.group
        if case.patient in where and where[case.patient][0] != key:
            other = where[case.patient][1]
            raise DataError(case.images[0], f"{case.entry}: patient {case.patient!r} is in two splits ({key} and "
                                            f"{where[case.patient][0]} via {other.entry})")
        where.setdefault(case.patient, (key, case))
