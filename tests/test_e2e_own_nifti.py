"""End to end on a user's own NIfTI collection through the CLI: build nifti (datalist) -> :quick MAE on the pretrain
split -> UNETR init=mae -> evaluate -> predict, the label map in the input file's geometry."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmae_jax.main import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BTCV = DATA / "layouts" / "btcv" / "RawData" / "Training"
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present"), pytest.mark.slow]

ONE_STEP = ["--config.num_train_steps=1", "--config.checkpoint.async_save=false", "--config.data.loader_threads=2"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def test_own_collection_build_pretrain_finetune_evaluate_predict(tmp_path, capsys):
    src = tmp_path / "own"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    for k in (1, 2):  # two labeled CTs, one unlabeled MRI volume (pre-training only)
        shutil.copy(BTCV / "img" / f"img000{k}.nii.gz", src / "images" / f"case{k}.nii.gz")
        shutil.copy(BTCV / "label" / f"label000{k}.nii.gz", src / "labels" / f"case{k}.nii.gz")
    shutil.copy(DATA / "mri" / "nibabel" / "anatomical.nii", src / "images" / "extra.nii")
    (src / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {str(k): f"organ{k}" for k in range(14)},
        "training": [{"image": f"images/case{k}.nii.gz", "label": f"labels/case{k}.nii.gz"} for k in (1, 2)],
        "unlabeled": ["images/extra.nii"]}))
    built = tmp_path / "data"
    _run(capsys, "build", "nifti", "--manual-dir", src, "--data-dir", built, "--name", "mine",
         "--spacing", "3", "3", "3",
         "--val-fraction", "0.5", "--no-progress")
    data = f"dataset=mine,data_dir={built}"
    mae, ft = tmp_path / "mae", tmp_path / "ft"
    _run(capsys, "train", "--config", f"{REPO}/configs/nifti_mae3d.py:quick,{data}", "--workdir", mae, *ONE_STEP,
         "--no-progress")
    _run(capsys, "train", "--config", f"{REPO}/configs/nifti_unetr.py:quick,{data},init=mae,init_checkpoint={mae}",
         "--workdir", ft, *ONE_STEP, "--config.segmentation.eval_limit=0", "--no-progress")
    out = _run(capsys, "evaluate", "--checkpoint", ft, "--limit", "1", "--no-progress")
    assert "organ13" in out and "BTCV" not in out  # the collection's class names, not BTCV's
    image = BTCV / "img" / "img0002.nii.gz"
    seg = tmp_path / "seg.nii.gz"
    _run(capsys, "predict", "--checkpoint", ft, "--input", image, "--output", seg, "--no-progress")
    pred, ref = nib.load(str(seg)), nib.load(str(image))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-6)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(14))
