"""BTCV (Synapse multi-atlas abdomen) CT segmentation as a TFDS builder (manual download).

Reads ``<manual_dir>/RawData/Training/{img,label}/img00XX.nii.gz, label00XX.nii.gz`` (and, if
present, ``RawData/Testing/img``), with the deterministic preprocessing done once at build time:
RAS orientation, spacing (1.5, 1.5, 2.0) mm (linear image, nearest label), HU window
[-175, 250] -> [0, 1] clipped, crop to the foreground (image > 0, extended to keep every labelled
voxel). Configs choose the train/validation split by case number:

- ``monai``: MONAI's tutorial split, 24 train / 6 validation (cases 35..40).
- ``selfmedmae``: SelfMedMAE's (TransUNet) split, 18 train / 12 validation.

Cases of a split that are not on disk are simply absent (a split with none is left out).
An image without its label (or a label without its image) is an error naming the file.

Example: ``image`` float32 (X, Y, Z, 1) in [0, 1], ``label`` uint8 (X, Y, Z) in 0..13
(zero-size for the unlabelled test split), ``has_label``, ``case_id`` ("img0001"),
``image_file`` (relative path) and the geometry needed to write predictions back
(:class:`medmae_jax.data.nifti.Geometry.from_features`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from medmae_jax.data import nifti, transforms
from medmae_jax.data.datasets import tfds_utils
from medmae_jax.data.labels import BTCV_NUM_CLASSES
from medmae_jax.errors import DataError

log = logging.getLogger(__name__)


ALL_TRAINING_CASES = tuple(range(1, 11)) + tuple(range(21, 41))
MONAI_VAL = tuple(range(35, 41))
MONAI_TRAIN = tuple(c for c in ALL_TRAINING_CASES if c not in MONAI_VAL)
SELFMEDMAE_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
SELFMEDMAE_VAL = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)

_IMG = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_LABEL = re.compile(r"^label(\d+)\.nii(\.gz)?$")


@dataclasses.dataclass(eq=False)
class BtcvConfig(tfds.core.BuilderConfig):
    """A split of the 30 labelled cases plus the build-time preprocessing."""

    train_cases: tuple[int, ...] = MONAI_TRAIN
    validation_cases: tuple[int, ...] = MONAI_VAL
    pixdim: tuple[float, float, float] = (1.5, 1.5, 2.0)
    a_min: float = -175.0  # HU window mapped to [0, 1]
    a_max: float = 250.0


def find_training_root(manual_dir: str) -> str:
    """The folder holding ``img/`` and ``label/``: ``RawData/Training``, ``Training`` or ``manual_dir``."""
    for sub in ("RawData/Training", "Training", ""):
        root = os.path.join(manual_dir, sub)
        if os.path.isdir(os.path.join(root, "img")):
            return root
    raise DataError(manual_dir, "no BTCV training images: expected RawData/Training/img/img00XX.nii.gz "
                                "and RawData/Training/label/label00XX.nii.gz")


def _scan(folder: str, pattern: re.Pattern) -> dict[int, str]:
    found = {}
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m:
            case = int(m.group(1))
            if case in found:
                raise DataError(os.path.join(folder, name), f"case {case} appears twice (also {found[case]})")
            found[case] = os.path.join(folder, name)
    return found


def find_cases(manual_dir: str) -> dict[int, tuple[str, str]]:
    """``{case number: (image path, label path)}`` of the labelled cases on disk, checking pairs."""
    root = find_training_root(manual_dir)
    images = _scan(os.path.join(root, "img"), _IMG)
    labels = _scan(os.path.join(root, "label"), _LABEL)
    no_label = sorted(set(images) - set(labels))
    if no_label:
        c = no_label[0]
        raise DataError(images[c],
                        f"image has no label: expected {os.path.join(root, 'label', f'label{c:04d}.nii.gz')}")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        c = no_image[0]
        raise DataError(labels[c], f"label has no image: expected {os.path.join(root, 'img', f'img{c:04d}.nii.gz')}")
    return {c: (images[c], labels[c]) for c in sorted(images)}


def find_test_images(manual_dir: str) -> dict[int, str]:
    """``{case number: image path}`` under ``RawData/Testing/img`` (empty if absent)."""
    for sub in ("RawData/Testing", "Testing"):
        folder = os.path.join(manual_dir, sub, "img")
        if os.path.isdir(folder):
            return _scan(folder, _IMG)
    return {}


def preprocess(image_path: str, label_path: Optional[str], config: BtcvConfig) -> dict:
    """One case as an example dict (the deterministic part of the BTCV pipeline)."""
    case = nifti.load_case(image_path, label_path, pixdim=config.pixdim, channels=1, num_classes=BTCV_NUM_CLASSES)
    image = transforms.scale_intensity_range(case.image, config.a_min, config.a_max, 0.0, 1.0, clip=True)
    start, stop = transforms.foreground_box(image)
    if case.label is not None and case.label.any():
        lstart, lstop = transforms.foreground_box(case.label)
        start, stop = np.minimum(start, lstart), np.maximum(stop, lstop)
    geometry = case.geometry.with_crop(start, stop)
    image = np.ascontiguousarray(transforms.crop(image, start, stop))
    if case.label is not None:
        label = np.ascontiguousarray(transforms.crop(case.label, start, stop)).astype(np.uint8)
    else:
        label = np.zeros((0, 0, 0), np.uint8)
    return {"image": image, "label": label, "has_label": case.label is not None, **geometry.to_features()}


class Btcv(tfds_utils.QuietPrepare, tfds.core.GeneratorBasedBuilder):
    """BTCV abdominal CT, 13 organs; manual download, preprocessed at build time."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "RAS, 1.5x1.5x2 mm, HU window [-175, 250] -> [0, 1], foreground crop."}
    BUILDER_CONFIGS = [
        BtcvConfig(name="monai", description="MONAI split: 24 train, 6 validation (cases 35..40)."),
        BtcvConfig(name="selfmedmae", train_cases=SELFMEDMAE_TRAIN, validation_cases=SELFMEDMAE_VAL,
                   description="SelfMedMAE/TransUNet split: 18 train, 12 validation."),
    ]
    DEFAULT_CONFIG_NAME = "monai"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Register at https://www.synapse.org/#!Synapse:syn3193805 and download RawData.zip (Abdomen). "
        "Unzip so that <manual_dir>/RawData/Training/img/img0001.nii.gz and "
        "<manual_dir>/RawData/Training/label/label0001.nii.gz exist."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds_utils.array_feature((None, None, None, 1), np.float32, compress=False,
                                                  doc="CT windowed to [0, 1], RAS voxel order"),
            "label": tfds_utils.array_feature((None, None, None), np.uint8,
                                              doc="0 background, 1..13 organs; (0,0,0) if unlabelled"),
            "has_label": tfds.features.Scalar(dtype=np.bool_),
            "case_id": tfds.features.Text(),
            "image_file": tfds.features.Text(),
            **tfds_utils.geometry_features(),
        }
        return tfds_utils.dataset_info(self, features, __doc__, homepage="https://www.synapse.org/#!Synapse:syn3193805")

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        cases = find_cases(manual_dir)
        cfg = self.builder_config
        listed = set(cfg.train_cases) | set(cfg.validation_cases)
        unused = sorted(set(cases) - listed)
        if unused:
            log.warning("btcv/%s: cases %s are on disk but in no split; they are not used", cfg.name, unused)
        splits = {
            "train": [(c, *cases[c]) for c in cfg.train_cases if c in cases],
            "validation": [(c, *cases[c]) for c in cfg.validation_cases if c in cases],
        }
        splits = tfds_utils.non_empty_splits(f"btcv/{cfg.name}", splits)
        test = find_test_images(manual_dir)
        if test:
            splits["test"] = [(c, p, None) for c, p in sorted(test.items())]
        return {name: self._generate_examples(items, manual_dir) for name, items in splits.items()}

    def _generate_examples(self, items, manual_dir):
        for case, image_path, label_path in items:
            case_id = f"img{case:04d}"
            ex = preprocess(image_path, label_path, self.builder_config)
            ex["case_id"] = case_id
            ex["image_file"] = os.path.relpath(image_path, manual_dir)
            yield case_id, ex


def build_btcv(manual_dir, data_dir, config_name: str = "monai", *,
               overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Builds BTCV (config ``monai`` or ``selfmedmae``) from ``manual_dir`` into ``data_dir``;
    returns the builder (``builder.as_data_source()`` or ``tfds.data_source("btcv/<config>", data_dir=...)``)."""
    return tfds_utils.build(Btcv, manual_dir, data_dir, config_name, overwrite=overwrite)
