"""`build nifti`: a user's collection (datalist, nnU-Net folder, plain folder) built once and read without its files."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from medmae_jax.data import nifti
from medmae_jax.data.datasets import nifti_collection_builder as ncb
from medmae_jax.errors import DataError
from medmae_jax.main import main


def _btcv(shared):
    return shared / "layouts" / "btcv" / "RawData" / "Training"


def _datalist_folder(shared, root):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in (1, 2):
        shutil.copy(_btcv(shared) / "img" / f"img000{k}.nii.gz", root / "images" / f"case{k}.nii.gz")
        shutil.copy(_btcv(shared) / "label" / f"label000{k}.nii.gz", root / "labels" / f"case{k}.nii.gz")
    shutil.copy(shared / "mri" / "nibabel" / "anatomical.nii", root / "images" / "extra.nii")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {str(k): f"organ{k}" for k in range(14)},
        "training": [{"image": f"images/case{k}.nii.gz", "label": f"labels/case{k}.nii.gz"} for k in (1, 2)],
        "unlabeled": ["images/extra.nii"]}))


def _build(args, capsys):
    assert main(["build", "nifti", "--no-progress", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    return json.loads(next(line for line in lines if line.startswith('{"dataset"')))


def test_datalist_build_read_without_originals(shared_data, tmp_path, capsys):
    src = tmp_path / "own"
    _datalist_folder(shared_data, src)
    out = _build(["--manual-dir", str(src), "--data-dir", str(tmp_path / "built"), "--name", "mine",
                  "--val-fraction", "0.5", "--seed", "1"], capsys)
    assert out["splits"] == {"pretrain": 3, "train": 1, "validation": 1}
    info = ncb.read_collection_info(tmp_path / "built" / "mine")
    assert (info["num_channels"], info["num_classes"], info["class_names"][13]) == (1, 14, "organ13")
    splits = json.loads((tmp_path / "built" / "mine" / "splits.json").read_text())
    original = nib.load(str(src / "labels" / "case1.nii.gz"))
    original_shape, original_affine = original.shape, original.affine
    shutil.rmtree(src)  # a built data set is read without the original files
    source = tfds.data_source("nifti_collection", split="pretrain", data_dir=str(tmp_path / "built" / "mine"))
    examples = {ncb.tfds_utils.as_str(source[i]["case_id"]): source[i] for i in range(len(source))}
    assert sorted(examples) == ["case1", "case2", "extra"]
    ex = examples["case1"]
    assert ex["image"].shape[-1] == 1 and ex["image"].min() >= 0 and ex["image"].max() <= 1
    assert ex["label"].shape == ex["image"].shape[:3] and ex["label"].max() <= 13 and bool(ex["has_label"])
    assert not bool(examples["extra"]["has_label"])
    sizes = np.array([e["image"].shape[:3] for e in examples.values()])  # recorded for the ROI check in preflight
    assert info["volume_shapes"]["pretrain"] == {"min": sizes.min(0).tolist(), "max": sizes.max(0).tolist()}
    back = nifti.to_original(ex["label"], nifti.Geometry.from_features(ex))  # predictions go back to the input grid
    assert back.shape == original_shape
    np.testing.assert_allclose(nifti.Geometry.from_features(ex).affine, original_affine, atol=1e-6)
    # building twice gives the same splits (splits.json is read back)
    _datalist_folder(shared_data, src)
    _build(["--manual-dir", str(src), "--data-dir", str(tmp_path / "again"), "--name", "mine",
            "--val-fraction", "0.5", "--seed", "1"], capsys)
    assert json.loads((tmp_path / "again" / "mine" / "splits.json").read_text()) == splits


def test_nnunet_and_plain_folder_builds(shared_data, tmp_path, capsys):
    root = tmp_path / "Dataset001"
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True)
    for k in (1, 2):
        shutil.copy(_btcv(shared_data) / "img" / f"img000{k}.nii.gz", root / "imagesTr" / f"ab_{k:03d}_0000.nii.gz")
        shutil.copy(_btcv(shared_data) / "label" / f"label000{k}.nii.gz", root / "labelsTr" / f"ab_{k:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                   "labels": {f"c{k}": k for k in range(14)}}))
    out = _build(["--manual-dir", str(root), "--data-dir", str(tmp_path / "built"), "--name", "nn",
                  "--val-fraction", "0.5", "--spacing", "3", "3", "3"], capsys)
    assert out["splits"] == {"pretrain": 2, "train": 1, "validation": 1}
    plain = tmp_path / "scans"
    plain.mkdir()
    shutil.copy(_btcv(shared_data) / "img" / "img0002.nii.gz", plain / "a.nii.gz")
    shutil.copy(shared_data / "mri" / "nibabel" / "anatomical.nii", plain / "b.nii")
    out = _build(["--manual-dir", str(plain), "--data-dir", str(tmp_path / "built"), "--name", "plain",
                  "--modality", "mr", "--spacing", "2", "2", "2"], capsys)
    assert out["splits"] == {"pretrain": 2}
    info = ncb.read_collection_info(tmp_path / "built" / "plain")
    assert info["num_classes"] == 0 and info["intensity"] == "zscore-nonzero"


def test_intensity_rules():
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1) - 5
    out, fg = ncb.normalize(image, "ct-window:0,10")
    np.testing.assert_allclose(out, np.clip(image / 10, 0, 1))
    assert fg.sum() == 18
    out, _ = ncb.normalize(image, "percentile:0,100")
    np.testing.assert_allclose(out[..., 0], (image[..., 0] + 5) / 23, rtol=1e-6)
    with pytest.raises(ncb.ConfigError, match="--intensity 'window:1'"):
        ncb.parse_intensity("window:1")


def test_rebuild_under_the_same_name_is_reused_only_when_built_the_same_way(shared_data, tmp_path):
    src = tmp_path / "own"
    _datalist_folder(shared_data, src)
    prep = ncb.Preprocessing(spacing=(3.0, 3.0, 3.0))
    rule = ncb.collection_splits.SplitRule(val_fraction=0.5)

    def build(**kw):
        return ncb.build_nifti_collection(str(src), str(tmp_path / "data"), "mine", **{"preprocessing": prep,
                                                                                       "rule": rule, **kw})

    first = build()
    shape = tfds.data_source("nifti_collection", split="pretrain", data_dir=first.data_dir_root)[0]["image"].shape
    build()  # same way: the built data set is reused
    with pytest.raises(DataError, match=r"mine: already built differently \(spacing \[3.0, 3.0, 3.0\] -> "
                                            r"\[2.0, 2.0, 2.0\]\); pass --overwrite to rebuild it"):
        build(preprocessing=ncb.Preprocessing(spacing=(2.0, 2.0, 2.0)))
    splits_file = tmp_path / "data" / "mine" / "splits.json"
    edited = json.loads(splits_file.read_text())
    swapped = edited["splits"]
    swapped["train"], swapped["validation"] = swapped["validation"], swapped["train"]
    splits_file.write_text(json.dumps(edited))
    with pytest.raises(DataError, match=r"already built differently \(splits [0-9a-f]+ -> [0-9a-f]+\)"):
        build()
    again = build(preprocessing=ncb.Preprocessing(spacing=(2.0, 2.0, 2.0)), overwrite=True)
    info = ncb.read_collection_info(tmp_path / "data" / "mine")
    assert info["spacing"] == [2.0, 2.0, 2.0] and info["build"]["spacing"] == [2.0, 2.0, 2.0]
    train = tfds.data_source("nifti_collection", split="train", data_dir=again.data_dir_root)
    assert [ncb.tfds_utils.as_str(train[i]["case_id"]) for i in range(len(train))] == edited["splits"]["train"]
    assert tfds.data_source("nifti_collection", split="pretrain", data_dir=again.data_dir_root)[0]["image"].shape \
        != shape


def _tiny(path, data, affine=np.diag([2.0, 2.0, 2.0, 1.0])):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def test_multichannel_cases_keep_channel_order(tmp_path):
    """Datalist images as one 3-D file per channel (MSD/BraTS) or one 4-D file, and nnU-Net _0000/_0001 files, come
    out with their channels in file order (z-scored per channel, so channel 1 = the mirror ramp of channel 0)."""
    ramp = np.arange(1, 12 * 10 * 8 + 1, dtype=np.float32).reshape(12, 10, 8)
    label = np.zeros((12, 10, 8), np.uint8)
    label[3:7, 2:6, 2:5] = 1
    src = tmp_path / "mr"
    src.mkdir()
    for k in (1, 2):
        _tiny(src / f"c{k}_t1.nii.gz", ramp * k)
        _tiny(src / f"c{k}_t2.nii.gz", (ramp.max() + 1 - ramp) * k)
        _tiny(src / f"c{k}_seg.nii.gz", label)
    _tiny(src / "u_4d.nii.gz", np.stack([ramp, ramp.max() + 1 - ramp], -1))
    (src / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": [f"c{k}_t1.nii.gz", f"c{k}_t2.nii.gz"], "label": f"c{k}_seg.nii.gz", "fold": k - 1}
                     for k in (1, 2)],
        "unlabeled": ["u_4d.nii.gz"]}))
    prep = ncb.Preprocessing(spacing=None, intensity="zscore-nonzero")
    ncb.build_nifti_collection(str(src), str(tmp_path / "data"), "mr", preprocessing=prep)
    info = ncb.read_collection_info(tmp_path / "data" / "mr")
    assert (info["num_channels"], info["channel_names"], info["class_names"]) == (2, ["T1", "T2"],
                                                                                   ["background", "lesion"])
    source = tfds.data_source("nifti_collection", split="pretrain", data_dir=str(tmp_path / "data" / "mr"))
    examples = {ncb.tfds_utils.as_str(source[i]["case_id"]): source[i] for i in range(len(source))}
    assert sorted(examples) == ["c1_t1", "c2_t1", "u_4d"]
    for ex in examples.values():
        image = ex["image"]
        assert image.shape == (12, 10, 8, 2)
        np.testing.assert_allclose(image[..., 1], -image[..., 0], atol=1e-5)  # channel 1 mirrors channel 0
        assert np.corrcoef(image[..., 0].ravel(), ramp.ravel())[0, 1] > 0.999  # channel 0 is the T1 ramp
    np.testing.assert_array_equal(examples["c1_t1"]["label"], label)
    splits = json.loads((tmp_path / "data" / "mr" / "splits.json").read_text())["splits"]
    assert (splits["train"], splits["validation"]) == (["c2_t1"], ["c1_t1"])  # fold 0 validates
    # the same cases in the nnU-Net layout
    nn = tmp_path / "Dataset002_MR"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for k in (1, 2):
        shutil.copy(src / f"c{k}_t1.nii.gz", nn / "imagesTr" / f"mr_{k:03d}_0000.nii.gz")
        shutil.copy(src / f"c{k}_t2.nii.gz", nn / "imagesTr" / f"mr_{k:03d}_0001.nii.gz")
        shutil.copy(src / f"c{k}_seg.nii.gz", nn / "labelsTr" / f"mr_{k:03d}.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                 "labels": {"background": 0, "lesion": 1}}))
    ncb.build_nifti_collection(str(nn), str(tmp_path / "data"), "nn", preprocessing=prep,
                               rule=ncb.collection_splits.SplitRule(val_fraction=0.5))
    source = tfds.data_source("nifti_collection", split="pretrain", data_dir=str(tmp_path / "data" / "nn"))
    for i in range(len(source)):
        image = source[i]["image"]
        assert image.shape == (12, 10, 8, 2)
        np.testing.assert_allclose(image[..., 1], -image[..., 0], atol=1e-5)
    assert ncb.read_collection_info(tmp_path / "data" / "nn")["channel_names"] == ["T1", "T2"]
