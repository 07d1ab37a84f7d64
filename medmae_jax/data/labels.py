"""Label conventions of the data sets, written once: BTCV organs, ChestX-ray14 findings, MSD Task01 tumour regions.

A numpy-only leaf: data builders, metrics, tasks and the command line all read their label tables from here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from medmae_jax.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------------
# BTCV (Synapse multi-atlas abdomen CT)
# --------------------------------------------------------------------------------------------------------------------
#: BTCV organ labels (label value -> short name).
BTCV_LABELS: dict[int, str] = {
    1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "ivc", 10: "portal_splenic_veins",
    11: "pancreas", 12: "right_adrenal", 13: "left_adrenal",
}
#: Readable class names, background first (index = label value), as in the data set's documentation.
BTCV_CLASS_NAMES: tuple[str, ...] = (
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
    "left adrenal gland",
)
BTCV_NUM_CLASSES = len(BTCV_CLASS_NAMES)  # 14 with background
#: All 13 BTCV organs (the standard mean).
BTCV_13_ORGANS: tuple[int, ...] = tuple(range(1, 14))
#: The 8 organs SelfMedMAE / TransUNet also average: spleen, kidneys R/L, gallbladder, liver, stomach, aorta, pancreas.
BTCV_8_ORGANS: tuple[int, ...] = (1, 2, 3, 4, 6, 7, 8, 11)

# --------------------------------------------------------------------------------------------------------------------
# ChestX-ray14
# --------------------------------------------------------------------------------------------------------------------
#: The standard ChestX-ray14 finding order (CheXNet, SelfMedMAE, medical_mae).
CXR14_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

# --------------------------------------------------------------------------------------------------------------------
# Brain-tumour regions (MSD Task01, BraTS)
# --------------------------------------------------------------------------------------------------------------------
#: Which label values make each region, by label convention.
#: ``msd``: MSD Task01 dataset.json (1 edema, 2 non-enhancing tumour, 3 enhancing tumour).
#: ``monai_tutorial``: MONAI's BraTS tutorial / SelfMedMAE on MSD files (ET = {2}, contradicts dataset.json).
#: ``brats``: BraTS challenge files (1 necrotic/non-enhancing core, 2 edema, 4 enhancing).
REGION_CONVENTIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "msd": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    "monai_tutorial": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (2,)},
    "brats": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
}
#: Accepted convention names (``monai`` is the MSD builder's short name) -> ``REGION_CONVENTIONS`` key.
CONVENTION_ALIASES = {"msd": "msd", "monai": "monai_tutorial", "monai_tutorial": "monai_tutorial", "brats": "brats"}
#: The regions from largest to smallest (the order reports and label maps use).
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
#: MONAI's channel order (``ConvertToMultiChannelBasedOnBratsClasses``), used by the MSD builder and the configs.
MONAI_REGION_ORDER: tuple[str, ...] = ("TC", "WT", "ET")
#: MSD Task01 label names (dataset.json).
MSD_LABEL_NAMES = {1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}


def region_definition(convention: str) -> dict[str, tuple[int, ...]]:
    """Label values of each region (WT/TC/ET) under ``convention``: ``msd``, ``monai``/``monai_tutorial``, ``brats``."""
    name = CONVENTION_ALIASES.get(convention)
    if name is None:
        raise ConfigError(f"segmentation.label_convention must be one of {sorted(CONVENTION_ALIASES)}, "
                          f"got {convention!r}")
    return REGION_CONVENTIONS[name]


def label_to_regions(label: np.ndarray, regions: Sequence[str], convention: str) -> np.ndarray:
    """Multi-hot masks ``(*spatial, R)`` uint8 in the order of ``regions`` from a label map."""
    definition = region_definition(convention)
    return np.stack([np.isin(label, definition[r]) for r in regions], -1).astype(np.uint8)


def regions_to_label(masks: np.ndarray, regions: Sequence[str], convention: str) -> np.ndarray:
    """A label map from region masks ``(*spatial, R)``: WT, then TC, then ET painted with the label that only that
    region adds (MSD: edema 1, non-enhancing 2, enhancing 3). ``regions`` must contain WT, TC and ET."""
    definition = region_definition(convention)
    order = [r for r in REGIONS if r in regions]
    if order != list(REGIONS):
        raise ConfigError(f"a label map needs the regions WT, TC and ET, got {tuple(regions)}")
    value = {"WT": set(definition["WT"]) - set(definition["TC"]), "TC": set(definition["TC"]) - set(definition["ET"]),
             "ET": set(definition["ET"])}
    out = np.zeros(masks.shape[:-1], np.uint8)
    for r in order:
        if len(value[r]) != 1:
            raise ConfigError(f"convention {convention!r}: region {r} adds labels {sorted(value[r])}, not exactly one")
        out[np.asarray(masks[..., list(regions).index(r)]).astype(bool)] = next(iter(value[r]))
    return out


def class_names(config) -> tuple[str, ...]:
    """Names of the evaluated outputs of ``config.segmentation``: BTCV organs (multiclass, 14 classes) or the
    regions."""
    s = config.segmentation
    if s.kind == "regions":
        return tuple(s.regions)
    if s.get("class_names"):  # a user's collection: names of classes 1..K-1 from its collection.json
        return tuple(s.class_names)
    if s.num_classes == len(BTCV_LABELS) + 1:
        return tuple(BTCV_LABELS[c] for c in range(1, s.num_classes))
    return tuple(f"class_{c}" for c in range(1, s.num_classes))


@dataclasses.dataclass(frozen=True)
class SegmentationLabels:
    """How a segmentation model's outputs and a data set's label maps are read and reported: everything evaluation
    needs to know about labels, so that it needs no task or model."""

    kind: str                       # "multiclass": one label map | "regions": one sigmoid mask per region
    names: tuple[str, ...]          # reported names, in report order
    channels: tuple[int, ...]       # label value (multiclass) or model output channel (regions) of each name
    regions: tuple[str, ...] = ()   # the model's output regions in channel order (regions)
    convention: str = "msd"         # label numbering that makes the regions (regions; see REGION_CONVENTIONS)
    btcv: bool = False              # the 14-class BTCV label set: also report the 8-organ mean

    @classmethod
    def from_config(cls, config) -> "SegmentationLabels":
        """The conventions of ``config.segmentation``; regions are reported as WT, TC, ET when present."""
        s = config.segmentation
        if s.kind == "regions":
            regions = tuple(s.regions)
            names = tuple([r for r in REGIONS if r in regions] + [r for r in regions if r not in REGIONS])
            return cls("regions", names, tuple(regions.index(r) for r in names), regions, str(s.label_convention))
        btcv = int(s.num_classes) == BTCV_NUM_CLASSES and not s.get("class_names")
        return cls("multiclass", class_names(config), tuple(range(1, int(s.num_classes))), btcv=btcv)

    def targets(self, label: np.ndarray) -> np.ndarray:
        """Ground truth as reported: the label map (multiclass) or boolean region masks in report order."""
        if self.kind == "regions":
            return label_to_regions(label, self.regions, self.convention)[..., list(self.channels)].astype(bool)
        return label

    def reported(self, prediction: np.ndarray) -> np.ndarray:
        """A prediction as reported: the label map (multiclass) or the region masks in report order."""
        return prediction[..., list(self.channels)] if self.kind == "regions" else prediction

    def label_map(self, prediction: np.ndarray) -> np.ndarray:
        """A prediction as a label map of the data set's numbering (region masks painted WT, TC, ET)."""
        if self.kind == "regions":
            return regions_to_label(prediction, self.regions, self.convention)
        return prediction

    def figure_class_names(self) -> list[str]:
        """Legend names of the label values 1.. drawn in overlays."""
        if self.kind == "regions":
            names = MSD_LABEL_NAMES if self.convention == "msd" else {}
            return [names.get(v, f"label {v}") for v in range(1, 5)]
        return list(self.names)
