"""MSD Task01 BrainTumour (multi-modal MRI) as a TFDS builder (manual download).

Reads ``<manual_dir>/Task01_BrainTumour/dataset.json`` (or ``<manual_dir>/dataset.json``) and the
files it lists (``imagesTr``/``labelsTr`` for "training", ``imagesTs`` for "test"). Build-time
preprocessing: RAS orientation, 1 mm spacing (linear image, nearest label), z-score over the
non-zero voxels of each channel, crop to the non-zero box of the image (extended to keep every
labelled voxel; SelfMedMAE's validation pipeline crops the same way, and the skull-stripped
background is all zeros). Splits: 5 folds over dataset.json's "training" list shuffled with seed
12345 exactly like MONAI ``CrossValidation(nfolds=5, seed=12345)`` (as SelfMedMAE): the config's
fold is ``validation``, the other four ``train``; ``test`` holds ``imagesTs`` (unlabelled).

Labels: ``label`` keeps dataset.json's values (0 background, 1 edema, 2 non-enhancing tumour,
3 enhancing tumour); ``regions`` (X, Y, Z, 3) uint8 holds the tumour regions in MONAI's channel
order (TC, WT, ET) under the config's convention: ``msd`` (default, dataset.json):
TC = {2, 3}, WT = {1, 2, 3}, ET = {3}; ``monai`` (MONAI BraTS tutorial / SelfMedMAE): ET = {2}.

Example: ``image`` float32 (X, Y, Z, 4) (FLAIR, T1w, t1gd, T2w), ``label`` uint8 (X, Y, Z),
``regions``, ``has_label``, ``case_id`` ("BRATS_001"), ``image_file`` and the geometry to write
predictions back (:class:`medmae_jax.data.nifti.Geometry.from_features`). Unlabelled test
examples have zero-size ``label``/``regions``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from medmae_jax.data import labels, nifti, transforms
from medmae_jax.data.datasets import tfds_utils
from medmae_jax.errors import ConfigError, DataError

TASK = "Task01_BrainTumour"
BUILDER_CONVENTIONS = ("msd", "monai")  # the label conventions of MSD files (medmae_jax.data.labels)
NUM_FOLDS = 5
FOLD_SEED = 12345


def brats_regions(label: np.ndarray, convention: str = "msd") -> np.ndarray:
    """Multi-hot tumour regions ``(..., 3)`` uint8 in (TC, WT, ET) order from an MSD label map."""
    _check_convention(convention)
    return labels.label_to_regions(np.asarray(label), labels.MONAI_REGION_ORDER, convention)


def _check_convention(convention: str) -> None:
    if convention not in BUILDER_CONVENTIONS:
        raise ConfigError(f"label_convention must be one of {sorted(BUILDER_CONVENTIONS)}, got {convention!r}")


def fold_assignment(num_cases: int, num_folds: int = NUM_FOLDS, seed: int = FOLD_SEED) -> np.ndarray:
    """Fold of each case (in dataset.json order), as MONAI ``partition_dataset(shuffle=True, seed)``:
    shuffle the indices with ``RandomState(seed)`` and deal them round-robin into the folds."""
    order = list(range(num_cases))
    np.random.RandomState(seed).shuffle(order)
    folds = np.empty(num_cases, np.int64)
    for position, case in enumerate(order):
        folds[case] = position % num_folds
    return folds


@dataclasses.dataclass(eq=False)
class MsdBrainTumourConfig(tfds.core.BuilderConfig):
    """Which fold is held out, the label convention for ``regions``, and the preprocessing."""

    fold: int = 0
    num_folds: int = NUM_FOLDS
    seed: int = FOLD_SEED
    label_convention: str = "msd"
    pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_foreground: bool = True


def _configs():
    out = []
    for conv, note in (("msd", "dataset.json labels (ET = 3)"), ("monai", "MONAI tutorial / SelfMedMAE (ET = 2)")):
        for k in range(NUM_FOLDS):
            name = f"fold{k}" if conv == "msd" else f"fold{k}_monai"
            out.append(MsdBrainTumourConfig(name=name, fold=k, label_convention=conv,
                                            description=f"Fold {k} of 5 (seed 12345) held out; regions: {note}."))
    return out


def find_task_dir(manual_dir: str) -> str:
    """``manual_dir`` itself or its ``Task01_BrainTumour`` subfolder, whichever holds dataset.json."""
    for d in (manual_dir, os.path.join(manual_dir, TASK)):
        if os.path.isfile(os.path.join(d, "dataset.json")):
            return d
    raise DataError(os.path.join(manual_dir, TASK, "dataset.json"),
                    "dataset.json not found (expected the MSD Task01_BrainTumour folder)")


def read_dataset_json(task_dir: str) -> dict:
    """Parses and checks dataset.json; every listed file must exist (the error names the first missing one)."""
    path = os.path.join(task_dir, "dataset.json")
    if not os.path.isfile(path):
        raise DataError(path, "dataset.json not found")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot parse dataset.json ({e})") from e
    for key in ("training", "labels", "modality"):
        if key not in meta:
            raise DataError(path, f"dataset.json has no {key!r} entry")
    training = []
    for i, item in enumerate(meta["training"]):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise DataError(path, f"training[{i}] must be {{'image': ..., 'label': ...}}, got {item!r}")
        training.append((_listed(task_dir, path, item["image"]), _listed(task_dir, path, item["label"])))
    test = [_listed(task_dir, path, p) for p in meta.get("test", [])]
    try:
        label_values = sorted(int(k) for k in meta["labels"])
    except ValueError as e:
        raise DataError(path, f"label keys must be integers, got {list(meta['labels'])}") from e
    return {"training": training, "test": test, "label_values": label_values,
            "modality": [meta["modality"][k] for k in sorted(meta["modality"], key=int)]}


def _listed(task_dir: str, json_path: str, rel: str) -> str:
    full = os.path.normpath(os.path.join(task_dir, rel))
    if not os.path.isfile(full):
        raise DataError(full, f"listed in {json_path} but missing on disk")
    return full


def preprocess(image_path: str, label_path: Optional[str], config: MsdBrainTumourConfig, *,
               channels: int = 4, label_values=(0, 1, 2, 3)) -> dict:
    """One case as an example dict (the deterministic part of the MSD brain pipeline)."""
    case = nifti.load_case(image_path, label_path, pixdim=config.pixdim, channels=channels, label_values=label_values)
    geometry = case.geometry
    image, label = case.image, case.label
    if config.crop_foreground:
        image, label, geometry = transforms.crop_case_to_foreground(image, label, geometry)
    image = np.ascontiguousarray(transforms.normalize_nonzero(image, channel_axis=-1))
    if label is not None:
        label = np.ascontiguousarray(label, np.uint8)
        regions = brats_regions(label, config.label_convention)
    else:
        label = np.zeros((0, 0, 0), np.uint8)
        regions = np.zeros((0, 0, 0, len(labels.MONAI_REGION_ORDER)), np.uint8)
    return {"image": image, "label": label, "regions": regions, "has_label": label.size > 0, **geometry.to_features()}


def _case_id(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class MsdBrainTumour(tfds_utils.QuietPrepare, tfds.core.GeneratorBasedBuilder):
    """MSD Task01 brain tumour MRI, 4 channels; manual download, preprocessed at build time."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "RAS, 1 mm, z-score on non-zero voxels per channel, foreground crop, 5 folds."}
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "fold0"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download Task01_BrainTumour.tar from http://medicaldecathlon.com/ and extract it so that "
        "<manual_dir>/Task01_BrainTumour/dataset.json exists."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds_utils.array_feature((None, None, None, 4), np.float32, compress=False,
                                                  doc="FLAIR, T1w, t1gd, T2w; z-scored, RAS"),
            "label": tfds_utils.array_feature((None, None, None), np.uint8,
                                              doc="dataset.json labels 0..3; (0,0,0) if unlabelled"),
            "regions": tfds_utils.array_feature((None, None, None, 3), np.uint8,
                                                doc="TC, WT, ET under the config's convention"),
            "has_label": tfds.features.Scalar(dtype=np.bool_),
            "case_id": tfds.features.Text(),
            "image_file": tfds.features.Text(),
            **tfds_utils.geometry_features(),
        }
        return tfds_utils.dataset_info(self, features, __doc__, homepage="http://medicaldecathlon.com/")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        _check_convention(cfg.label_convention)
        if not 0 <= cfg.fold < cfg.num_folds:
            raise ValueError(f"fold must be in 0..{cfg.num_folds - 1}, got {cfg.fold}")
        task_dir = find_task_dir(os.fspath(dl_manager.manual_dir))
        meta = read_dataset_json(task_dir)
        if len(meta["modality"]) != 4:
            raise DataError(os.path.join(task_dir, "dataset.json"), f"expected 4 modalities, got {meta['modality']}")
        folds = fold_assignment(len(meta["training"]), cfg.num_folds, cfg.seed)
        splits = {
            "train": [pair for pair, f in zip(meta["training"], folds) if f != cfg.fold],
            "validation": [pair for pair, f in zip(meta["training"], folds) if f == cfg.fold],
        }
        splits = tfds_utils.non_empty_splits(f"msd_brain_tumour/{cfg.name}", splits)
        if meta["test"]:
            splits["test"] = [(p, None) for p in meta["test"]]
        kw = {"channels": len(meta["modality"]), "label_values": meta["label_values"]}
        return {name: self._generate_examples(items, task_dir, kw) for name, items in splits.items()}

    def _generate_examples(self, items, task_dir, kw):
        for image_path, label_path in items:
            case_id = _case_id(image_path)
            ex = preprocess(image_path, label_path, self.builder_config, **kw)
            ex["case_id"] = case_id
            ex["image_file"] = os.path.relpath(image_path, task_dir)
            yield case_id, ex


def build_msd_brain_tumour(manual_dir, data_dir, config_name: str = "fold0", *,
                           overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Builds MSD Task01 (config ``fold0``..``fold4``, or ``fold<k>_monai`` for ET = {2}) from
    ``manual_dir`` into ``data_dir``; returns the builder."""
    return tfds_utils.build(MsdBrainTumour, manual_dir, data_dir, config_name, overwrite=overwrite)
