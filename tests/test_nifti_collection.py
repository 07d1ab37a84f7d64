"""A user's own NIfTI collection: datalist / nnU-Net / plain-folder discovery, the bad-datalist errors, seeded
splits."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from medmae_jax.data.datasets import collection_splits as cs
from medmae_jax.data.datasets import nifti_collection as nc
from medmae_jax.errors import DataError

BTCV_CLASSES = {str(k): f"class{k}" for k in range(14)}


def _btcv(shared):
    return shared / "layouts" / "btcv" / "RawData" / "Training"


@pytest.fixture
def collection_dir(shared_data, tmp_path):
    """Two labeled CTs (BTCV layout copies), one unlabeled MRI volume, a hand-written dataset.json."""
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in (1, 2):
        shutil.copy(_btcv(shared_data) / "img" / f"img000{k}.nii.gz", root / "images" / f"case{k}.nii.gz")
        shutil.copy(_btcv(shared_data) / "label" / f"label000{k}.nii.gz", root / "labels" / f"case{k}.nii.gz")
    shutil.copy(shared_data / "mri" / "nibabel" / "anatomical.nii", root / "images" / "extra.nii")
    datalist = {
        "modality": {"0": "CT"}, "labels": BTCV_CLASSES,
        "training": [{"image": "images/case1.nii.gz", "label": "labels/case1.nii.gz"},
                     {"image": "images/case2.nii.gz", "label": "labels/case2.nii.gz"}],
        "unlabeled": ["images/extra.nii"],
    }
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


def _rewrite(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_datalist_cases_and_channels(collection_dir):
    col = nc.discover(str(collection_dir))
    assert col.layout == "datalist"
    assert [c.case_id for c in col.cases] == ["case1", "case2", "extra"]
    assert [c.label is not None for c in col.cases] == [True, True, False]
    assert col.channel_names == ("CT",) and col.class_names[13] == "class13"
    assert nc.validate(col) == 1


def test_missing_file_names_the_entry(collection_dir):
    os.remove(collection_dir / "labels" / "case2.nii.gz")
    with pytest.raises(DataError, match=r"case2\.nii\.gz: listed in dataset.json training\[1\] but missing"):
        nc.discover(str(collection_dir))


def test_label_grid_mismatch_names_the_entry(collection_dir):
    _rewrite(collection_dir, training=[{"image": "images/case1.nii.gz", "label": "labels/case2.nii.gz"}])
    with pytest.raises(DataError, match=r"training\[0\]: label shape"):
        nc.validate(nc.discover(str(collection_dir)))


def test_label_affine_mismatch_names_the_entry(collection_dir):
    img = nib.load(str(collection_dir / "labels" / "case1.nii.gz"))
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(collection_dir / "labels" / "case1.nii.gz"))
    with pytest.raises(DataError, match=r"training\[0\]: label affine differs"):
        nc.validate(nc.discover(str(collection_dir)))


def test_label_values_outside_labels(collection_dir):
    _rewrite(collection_dir, labels={"0": "background", "1": "spleen"})
    with pytest.raises(DataError, match=r"training\[0\]: label values \[2, 3"):
        nc.validate(nc.discover(str(collection_dir)))


def test_channel_count_differs_between_cases(collection_dir, shared_data):
    img = nib.load(str(collection_dir / "images" / "extra.nii"))
    data = np.stack([np.asarray(img.dataobj)] * 2, -1)
    nib.save(nib.Nifti1Image(data, img.affine), str(collection_dir / "images" / "extra2.nii.gz"))
    _rewrite(collection_dir, unlabeled=["images/extra.nii", "images/extra2.nii.gz"])
    with pytest.raises(DataError, match=r"unlabeled\[1\]: 2 channel\(s\) but dataset.json training\[0\] has 1"):
        nc.validate(nc.discover(str(collection_dir)))


def test_duplicate_case(collection_dir):
    _rewrite(collection_dir, unlabeled=["images/case1.nii.gz"])
    with pytest.raises(DataError, match=r"unlabeled\[0\]: duplicate case 'case1'"):
        nc.validate(nc.discover(str(collection_dir)))


def test_patient_in_two_splits(collection_dir):
    _rewrite(collection_dir, training=[{"image": "images/case1.nii.gz", "label": "labels/case1.nii.gz",
                                        "patient": "p1"}],
             validation=[{"image": "images/case2.nii.gz", "label": "labels/case2.nii.gz", "patient": "p1"}])
    with pytest.raises(DataError, match=r"validation\[0\]: patient 'p1' is in two splits"):
        nc.validate(nc.discover(str(collection_dir)))


def test_empty_split_after_rule(collection_dir, tmp_path):
    col = nc.discover(str(collection_dir))
    with pytest.raises(DataError, match=r"split 'validation' is empty after the split rule \(2 labeled"):
        cs.make_splits(col, cs.SplitRule(val_fraction=0.0))


def test_seeded_splits_reproducible_and_editable(collection_dir, tmp_path):
    col = nc.discover(str(collection_dir))
    out = tmp_path / "built" / "mydata"
    first = cs.load_or_make_splits(col, cs.SplitRule(val_fraction=0.5, seed=3), str(out))
    assert sorted(first["train"] + first["validation"]) == ["case1", "case2"]
    assert first["pretrain"] == ["case1", "case2", "extra"] and first["test"] == []
    written = json.loads((out / "splits.json").read_text())
    os.remove(out / "splits.json")
    again = cs.load_or_make_splits(col, cs.SplitRule(val_fraction=0.5, seed=3), str(out))
    assert again == first and json.loads((out / "splits.json").read_text()) == written
    # a hand edit is read back (and checked)
    written["splits"]["train"], written["splits"]["validation"] = first["validation"], first["train"]
    (out / "splits.json").write_text(json.dumps(written))
    edited = cs.load_or_make_splits(col, cs.SplitRule(val_fraction=0.5, seed=3), str(out))
    assert edited["train"] == first["validation"]
    written["splits"]["train"] = ["case1", "extra"]
    (out / "splits.json").write_text(json.dumps(written))
    with pytest.raises(DataError, match=r"splits.json: split 'train' names case 'extra', which has no label"):
        cs.load_or_make_splits(col, cs.SplitRule(), str(out))


def test_patient_folds_deal_round_robin_like_monai():
    folds = cs.patient_folds([f"p{i}" for i in range(10)], 5, 0)
    assert sorted(folds.values()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert folds == cs.patient_folds([f"p{i}" for i in reversed(range(10))], 5, 0)


def test_nnunet_layout(shared_data, tmp_path):
    root = tmp_path / "Dataset001"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    for k in (1, 2):
        shutil.copy(_btcv(shared_data) / "img" / f"img000{k}.nii.gz", root / "imagesTr" / f"ab_{k:03d}_0000.nii.gz")
        shutil.copy(_btcv(shared_data) / "label" / f"label000{k}.nii.gz", root / "labelsTr" / f"ab_{k:03d}.nii.gz")
    shutil.copy(shared_data / "mri" / "nibabel" / "anatomical.nii", root / "imagesTs" / "ab_900_0000.nii")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {f"c{k}": k for k in range(14)}}))
    col = nc.discover(str(root))
    assert col.layout == "nnunet" and col.channel_names == ("CT",) and col.class_names[5] == "c5"
    assert [(c.case_id, c.group, c.label is not None) for c in col.cases] == [
        ("ab_001", "training", True), ("ab_002", "training", True), ("ab_900", "test", False)]
    assert nc.validate(col) == 1
    os.remove(root / "labelsTr" / "ab_002.nii.gz")
    with pytest.raises(DataError, match=r"no label for imagesTr/ab_002"):
        nc.discover(str(root))


def test_plain_folder_is_unlabeled(shared_data, tmp_path):
    root = tmp_path / "scans"
    (root / "a").mkdir(parents=True)
    shutil.copy(_btcv(shared_data) / "img" / "img0002.nii.gz", root / "a" / "s1.nii.gz")
    shutil.copy(shared_data / "mri" / "nibabel" / "anatomical.nii", root / "s2.nii")
    col = nc.discover(str(root))
    assert col.layout == "folder" and [c.case_id for c in col.cases] == ["a__s1", "s2"]
    assert all(c.label is None for c in col.cases) and nc.validate(col) == 1
    assert cs.make_splits(col, cs.SplitRule()) == {"pretrain": ["a__s1", "s2"], "test": []}



@pytest.fixture
def tiny_folds(tmp_path):
    """Two tiny labeled cases (8x8x8, 2 mm) of one patient, listed with datalist fold keys 0 and 1."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    for k in (1, 2):
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), k, np.float32), affine), str(tmp_path / f"img{k}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(tmp_path / f"seg{k}.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": f"img{k}.nii.gz", "label": f"seg{k}.nii.gz", "patient": "p1", "fold": k - 1}
                     for k in (1, 2)]}))
    return tmp_path


def test_patient_in_two_folds(tiny_folds):
    with pytest.raises(DataError, match=r"dataset.json training\[1\]: patient 'p1' is in two splits \(training fold 1 "
                                        r"and training fold 0 via dataset.json training\[0\]\)"):
        nc.validate(nc.discover(str(tiny_folds)))


def test_fold_keys_pick_validation(tiny_folds):
    _rewrite(tiny_folds, training=[{k: v for k, v in e.items() if k != "patient"}
                                   for e in json.loads((tiny_folds / "dataset.json").read_text())["training"]])
    col = nc.discover(str(tiny_folds))
    assert nc.validate(col) == 1
    splits = cs.make_splits(col, cs.SplitRule(fold=1))
    assert (splits["train"], splits["validation"]) == (["img1"], ["img2"])
    with pytest.raises(DataError, match=r"split 'validation' is empty after the split rule"):
        cs.make_splits(col, cs.SplitRule(fold=2))
