"""Splits of a user's collection: ``pretrain`` (every image), ``train``/``validation`` (labeled,
patient-disjoint), ``test``.

The rule, first that applies: the datalist's own ``validation`` list; its ``fold`` keys (the
chosen fold is ``validation``); else a seeded patient-level split (``--folds k``: patients dealt
into k folds after a ``RandomState(seed)`` shuffle, as MONAI ``partition_dataset``; otherwise
``--val-fraction`` of the patients). The result is written to ``NAME/splits.json``; a later build
reads that file back (so splits are reproducible and can be edited by hand) and checks it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np

from medmae_jax.data.datasets.nifti_collection import Collection
from medmae_jax.errors import DataError

SPLITS_FILE = "splits.json"
SPLIT_NAMES = ("pretrain", "train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How labeled cases without a datalist validation list are split."""

    val_fraction: float = 0.2  # share of labeled patients held out for validation (no folds)
    folds: int = 0  # > 0: k patient folds, ``fold`` is validation
    fold: int = 0  # which fold is validation
    seed: int = 0  # shuffle seed of the patient order


def patient_folds(patients: list[str], folds: int, seed: int) -> dict[str, int]:
    """Fold of each patient (sorted ids, shuffled with ``RandomState(seed)``, dealt round-robin)."""
    order = sorted(set(patients))
    np.random.RandomState(seed).shuffle(order)
    return {p: i % folds for i, p in enumerate(order)}


def make_splits(collection: Collection, rule: SplitRule) -> dict[str, list[str]]:
    """Case ids per split (pretrain, train, validation, test) following the module's rule."""
    labeled = [c for c in collection.cases if c.group in ("training", "validation")]
    splits = {"pretrain": [c.case_id for c in collection.cases],
              "test": [c.case_id for c in collection.cases if c.group == "test"]}
    if any(c.group == "validation" for c in labeled):
        splits["train"] = [c.case_id for c in labeled if c.group == "training"]
        splits["validation"] = [c.case_id for c in labeled if c.group == "validation"]
    elif any(c.fold is not None for c in labeled):
        missing = [c.entry for c in labeled if c.fold is None]
        if missing:
            raise DataError(collection.root, f"{missing[0]} has no 'fold' while other training entries do")
        splits["train"] = [c.case_id for c in labeled if c.fold != rule.fold]
        splits["validation"] = [c.case_id for c in labeled if c.fold == rule.fold]
    elif labeled:
        patients = [c.patient for c in labeled]
        if rule.folds > 0:
            if not 0 <= rule.fold < rule.folds:
                raise DataError(None, f"--fold must be in 0..{rule.folds - 1}, got {rule.fold}")
            held = {p for p, f in patient_folds(patients, rule.folds, rule.seed).items() if f == rule.fold}
        else:
            order = sorted(set(patients))
            np.random.RandomState(rule.seed).shuffle(order)
            held = set(order[: math.ceil(rule.val_fraction * len(order))]) if rule.val_fraction > 0 else set()
        splits["train"] = [c.case_id for c in labeled if c.patient not in held]
        splits["validation"] = [c.case_id for c in labeled if c.patient in held]
    splits = {k: splits[k] for k in SPLIT_NAMES if k in splits}
    check_splits(collection, splits)
    return splits


def check_splits(collection: Collection, splits: dict[str, list[str]], source: Optional[str] = None) -> None:
    """Known case ids only, no empty train/validation split, no patient in both train and validation."""
    where = source or "the split rule"
    cases = {c.case_id: c for c in collection.cases}
    for name, ids in splits.items():
        if name not in SPLIT_NAMES:
            raise DataError(source, f"unknown split {name!r}; splits are {', '.join(SPLIT_NAMES)}")
        for case_id in ids:
            if case_id not in cases:
                raise DataError(source, f"split {name!r} names case {case_id!r}, which is not in the collection")
            if name in ("train", "validation") and cases[case_id].label is None:
                raise DataError(source, f"split {name!r} names case {case_id!r}, which has no label")
    labeled = [c for c in collection.cases if c.label is not None]
    if labeled:
        for name in ("train", "validation"):
            if not splits.get(name):
                raise DataError(source, f"split {name!r} is empty after {where} ({len(labeled)} labeled case(s)); "
                                        f"add labeled cases, or change --val-fraction / --folds / the datalist")
    train_patients = {cases[i].patient: i for i in splits.get("train", [])}
    for case_id in splits.get("validation", []):
        p = cases[case_id].patient
        if p in train_patients:
            raise DataError(source,
                            f"patient {p!r} is in two splits: train ({train_patients[p]}) and validation ({case_id})")


def splits_path(dataset_dir: str) -> str:
    return os.path.join(dataset_dir, SPLITS_FILE)


def load_or_make_splits(collection: Collection, rule: SplitRule, dataset_dir: str) -> dict[str, list[str]]:
    """``dataset_dir/splits.json`` if it exists (checked), else the rule's splits written there atomically."""
    path = splits_path(dataset_dir)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                stored = json.load(f)
            splits = {k: [str(i) for i in v] for k, v in stored["splits"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(path, f"cannot read the splits ({type(e).__name__}: {e}); fix or delete the file") from e
        check_splits(collection, splits, path)
        return splits
    splits = make_splits(collection, rule)
    os.makedirs(dataset_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rule": dataclasses.asdict(rule), "splits": splits}, f, indent=1)
    os.replace(tmp, path)
    return splits
