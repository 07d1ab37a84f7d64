"""The 1,000 real NIH ChestX-ray14 images of ``nih1000_64``: the folders as splits, checked for patient leakage.

``NIH1000/{train,valid,test}/{0_normal,1_abnormal}/*.png`` plus ``labels.csv`` joining each file to its official
metadata row and the 14 labels. Images are loaded once into memory (no TFDS build); ``data.name == "nih1000"``.
"""

from __future__ import annotations

import collections
import csv
import functools
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medmae_jax.data import png
from medmae_jax.data.labels import CXR14_LABELS
from medmae_jax.errors import ConfigError, DataError

SPLIT_FOLDERS = {"train": "train", "valid": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
OVERLAP_POLICIES = ("error", "reassign")


class InMemorySource:
    """Random-access source over stacked arrays: ``{"image": (S, S, 1) uint8, "labels": (14,) float32, ...}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray, names: Sequence[str]):
        self.images, self.labels, self.patient_ids, self.names = images, labels, patient_ids, list(names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        return {"image": self.images[index], "labels": self.labels[index],
                "patient_id": np.int64(self.patient_ids[index]), "index": np.int64(index)}


def _read_rows(root: Path) -> tuple[list[dict], list[str]]:
    """Rows of labels.csv whose file lies under NIH1000/<split>/; the rest are reported as ignored."""
    table = root / "labels.csv"
    if not table.is_file():
        raise DataError(table, "labels.csv not found (expected nih1000_64/labels.csv next to NIH1000/)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["relpath", "Patient ID"] + [f"chexnet_{n}" for n in CXR14_LABELS]
    missing_cols = [c for c in need if rows and c not in rows[0]]
    if not rows or missing_cols:
        raise DataError(table, f"no rows or missing columns {missing_cols}")
    kept, ignored = [], []
    for row in rows:
        parts = Path(row["relpath"]).parts
        if len(parts) >= 3 and parts[0] == "NIH1000" and parts[1] in SPLIT_FOLDERS:
            kept.append(row)
        else:
            ignored.append(row["relpath"])
    return kept, ignored


@functools.lru_cache(maxsize=4)
def load_nih1000(root: str, patient_overlap: str = "error") -> dict:
    """``{"sources": {split: InMemorySource}, "summary": {...}}``; fails if a patient crosses the splits.

    ``patient_overlap="reassign"`` moves each crossing patient's images to the split holding most of them
    (ties: train, then validation) and records every move in the summary.
    """
    if patient_overlap not in OVERLAP_POLICIES:
        raise ConfigError(f"patient_overlap={patient_overlap!r}; use one of {OVERLAP_POLICIES}")
    base = Path(root)
    rows, ignored = _read_rows(base)
    on_disk = {p.relative_to(base).as_posix() for p in (base / "NIH1000").glob("*/*/*.png")}
    listed = {r["relpath"] for r in rows}
    if on_disk - listed:
        raise DataError(base / "labels.csv", f"{len(on_disk - listed)} PNGs under NIH1000/ have no row, e.g. "
                                             f"{sorted(on_disk - listed)[:3]}")
    absent = sorted(listed - on_disk)
    if absent:
        raise DataError(base, f"{len(absent)} files listed in labels.csv are missing, e.g. {absent[:3]}")
    if len(listed) != len(rows):
        raise DataError(base / "labels.csv", "a relpath occurs twice")
    folder_split = {r["relpath"]: SPLIT_FOLDERS[Path(r["relpath"]).parts[1]] for r in rows}
    by_patient: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_patient[int(r["Patient ID"])][folder_split[r["relpath"]]] += 1
    crossing = {p: c for p, c in sorted(by_patient.items()) if len(c) > 1}
    split_of = dict(folder_split)
    moves: list[dict] = []
    if crossing:
        folder = {v: k for k, v in SPLIT_FOLDERS.items()}
        examples = "; ".join(f"patient {p}: " + ", ".join(f"{folder[s]} {n}" for s, n in sorted(c.items()))
                             for p, c in list(crossing.items())[:5])
        if patient_overlap == "error":
            raise DataError(base, f"{len(crossing)} of {len(by_patient)} patients have images in more than one of "
                                  f"the train/valid/test folders ({examples}; ...): the folders are not a patient-"
                                  f"level split, so test images would share patients with training. Pass "
                                  f"patient_overlap='reassign' (runner: --patient-overlap reassign) to move each "
                                  f"such patient into the split holding most of their images.")
        for p, c in crossing.items():
            target = max(SPLITS, key=lambda s: (c.get(s, 0), -SPLITS.index(s)))
            moves.append({"patient": p, "from": dict(c), "to": target})
        target_of = {m["patient"]: m["to"] for m in moves}
        for r in rows:
            p = int(r["Patient ID"])
            if p in target_of:
                split_of[r["relpath"]] = target_of[p]
    sources, summary = {}, {"root": str(base), "patient_overlap": patient_overlap,
                            "ignored_rows": ignored, "crossing_patients": len(crossing), "moves": moves,
                            "moved_images": sum(1 for k in split_of if split_of[k] != folder_split[k]), "splits": {}}
    for split in SPLITS:
        part = sorted((r for r in rows if split_of[r["relpath"]] == split), key=lambda r: r["relpath"])
        images = np.stack([png.read_png_gray(base / r["relpath"])[..., None] for r in part])
        labels = np.asarray([[float(r[f"chexnet_{n}"]) for n in CXR14_LABELS] for r in part], np.float32)
        pids = np.asarray([int(r["Patient ID"]) for r in part], np.int64)
        sources[split] = InMemorySource(images, labels, pids, [r["relpath"] for r in part])
        summary["splits"][split] = {"images": len(part), "patients": len(set(pids.tolist())),
                                    "positives": dict(zip(CXR14_LABELS, labels.sum(0).astype(int).tolist()))}
    patients = [set(s.patient_ids.tolist()) for s in sources.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    return {"sources": sources, "summary": summary}


def open_nih1000(data: Mapping, split: str) -> InMemorySource:
    """``data.name == "nih1000"`` for :func:`medmae_jax.data.sources.open_source` (``data.data_dir`` = nih1000_64)."""
    root = data.get("data_dir") or ""
    if not root or not os.path.isdir(root):
        raise ConfigError(f"data.data_dir {root!r}: not the nih1000_64 folder (with labels.csv and NIH1000/)")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for nih1000; use one of {SPLITS}")
    return load_nih1000(os.path.abspath(root), data.get("patient_overlap", "error"))["sources"][split]
