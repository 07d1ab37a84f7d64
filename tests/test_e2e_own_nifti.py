"""End to end on a user's own NIfTI collection through the CLI, in its three layouts.

Datalist: build nifti, the source folder deleted, then :quick MAE on the pretrain split -> UNETR init=mae -> evaluate ->
predict, the label map in the input file's geometry. nnU-Net folder and plain folder of unlabeled volumes: build, read
back without the source files, a couple of MAE steps.
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from medmae_jax.data.datasets import tfds_utils
from medmae_jax.main import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BTCV = DATA / "layouts" / "btcv" / "RawData" / "Training"
ANATOMICAL = DATA / "mri" / "nibabel" / "anatomical.nii"  # LAS, big-endian int16, 2 mm
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present"), pytest.mark.slow]

QUICK = ["--config.checkpoint.async_save=false", "--config.data.loader_threads=2", "--no-progress"]


def _run(*argv) -> str:
    """``medmae-jax ARGV`` in this process; its stdout (the test fails with the tail of stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, err.getvalue()[-3000:]
    return out.getvalue()


def _build(*argv) -> dict:
    out = _run("build", "nifti", "--no-progress", *argv)
    return json.loads(next(line for line in out.splitlines() if line.startswith('{"dataset"')))


def _read_back(dataset_dir: Path, split: str) -> dict:
    """case id -> example of a built split."""
    source = tfds.data_source("nifti_collection", split=split, data_dir=str(dataset_dir))
    return {tfds_utils.as_str(source[i]["case_id"]): source[i] for i in range(len(source))}


def _pretrain(dataset_dir: Path, workdir: Path, steps: int = 2) -> None:
    data = f"dataset={dataset_dir.name},data_dir={dataset_dir.parent}"
    _run("train", "--config", f"{REPO}/configs/nifti_mae3d.py:quick,{data}", "--workdir", workdir,
         f"--config.num_train_steps={steps}", *QUICK)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["split"] == "train" and "loss" in x]
    assert losses and all(np.isfinite(losses)), lines
    assert (workdir / "checkpoints" / str(steps)).is_dir()


@pytest.fixture(scope="module")
def datalist_collection(tmp_path_factory) -> Path:
    """Two labeled CTs and one unlabeled MRI volume with a hand-written dataset.json, built at 3 mm; the source
    folder is deleted afterwards (a built data set is read without the original files)."""
    tmp = tmp_path_factory.mktemp("own")
    src = tmp / "own"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for k in (1, 2):
        shutil.copy(BTCV / "img" / f"img000{k}.nii.gz", src / "images" / f"case{k}.nii.gz")
        shutil.copy(BTCV / "label" / f"label000{k}.nii.gz", src / "labels" / f"case{k}.nii.gz")
    shutil.copy(ANATOMICAL, src / "images" / "extra.nii")
    (src / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {str(k): f"organ{k}" for k in range(14)},
        "training": [{"image": f"images/case{k}.nii.gz", "label": f"labels/case{k}.nii.gz"} for k in (1, 2)],
        "unlabeled": ["images/extra.nii"]}))
    out = _build("--manual-dir", src, "--data-dir", tmp / "data", "--name", "mine", "--spacing", "3", "3", "3",
                 "--val-fraction", "0.5")
    assert out["splits"] == {"pretrain": 3, "train": 1, "validation": 1}
    shutil.rmtree(src)
    return tmp / "data" / "mine"


def test_datalist_pretrain_finetune_evaluate_predict(datalist_collection, tmp_path):
    data = f"dataset=mine,data_dir={datalist_collection.parent}"
    mae, ft = tmp_path / "mae", tmp_path / "ft"
    _pretrain(datalist_collection, mae, steps=1)
    _run("train", "--config", f"{REPO}/configs/nifti_unetr.py:quick,{data},init=mae,init_checkpoint={mae}",
         "--workdir", ft, "--config.num_train_steps=1", "--config.segmentation.eval_limit=0", *QUICK)
    out = _run("evaluate", "--checkpoint", ft, "--limit", "1", "--no-progress")
    assert "organ13" in out and "BTCV" not in out  # the collection's class names, not BTCV's
    # predictions in the input file's own geometry: an anisotropic RAS CT and a LAS big-endian volume
    for image in (BTCV / "img" / "img0002.nii.gz", ANATOMICAL):
        seg = tmp_path / f"seg_{image.name.split('.')[0]}.nii.gz"
        _run("predict", "--checkpoint", ft, "--input", image, "--output", seg, "--no-progress")
        pred, ref = nib.load(str(seg)), nib.load(str(image))
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(14))


def test_nnunet_layout_build_read_back_pretrain(tmp_path):
    root = tmp_path / "Dataset001_Abdomen"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    for k in (1, 2):
        shutil.copy(BTCV / "img" / f"img000{k}.nii.gz", root / "imagesTr" / f"ab_{k:03d}_0000.nii.gz")
        shutil.copy(BTCV / "label" / f"label000{k}.nii.gz", root / "labelsTr" / f"ab_{k:03d}.nii.gz")
    shutil.copy(ANATOMICAL, root / "imagesTs" / "ab_900_0000.nii")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {f"c{k}": k for k in range(14)}}))
    out = _build("--manual-dir", root, "--data-dir", tmp_path / "data", "--name", "nn", "--val-fraction", "0.5",
                 "--spacing", "3", "3", "3")
    assert out["splits"] == {"pretrain": 3, "train": 1, "validation": 1, "test": 1}
    shutil.rmtree(root)
    pretrain = _read_back(tmp_path / "data" / "nn", "pretrain")
    assert sorted(pretrain) == ["ab_001", "ab_002", "ab_900"]
    assert [bool(pretrain[k]["has_label"]) for k in sorted(pretrain)] == [True, True, False]
    assert list(_read_back(tmp_path / "data" / "nn", "test")) == ["ab_900"]
    _pretrain(tmp_path / "data" / "nn", tmp_path / "mae")


def test_plain_folder_build_read_back_pretrain(tmp_path):
    plain = tmp_path / "scans"
    (plain / "site_a").mkdir(parents=True)
    shutil.copy(BTCV / "img" / "img0002.nii.gz", plain / "site_a" / "s1.nii.gz")
    shutil.copy(ANATOMICAL, plain / "s2.nii")
    out = _build("--manual-dir", plain, "--data-dir", tmp_path / "data", "--name", "plain", "--modality", "mr",
                 "--spacing", "2", "2", "2")
    assert out["splits"] == {"pretrain": 2}
    shutil.rmtree(plain)
    pretrain = _read_back(tmp_path / "data" / "plain", "pretrain")
    assert sorted(pretrain) == ["s2", "site_a__s1"] and not any(bool(e["has_label"]) for e in pretrain.values())
    _pretrain(tmp_path / "data" / "plain", tmp_path / "mae")
