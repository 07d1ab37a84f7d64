"""End to end through the CLI on real 3-D data: build -> MAE pre-train -> UNETR fine-tune (init=mae) -> evaluate ->
predict, for BTCV (CT) and MSD Task01 (4-channel MRI); bad prediction inputs fail with exit code 2 naming the file.

BTCV is built from ``shared/data/layouts/btcv`` as it is. The MSD cases there are whole 240x240x155x4 brains;
a sliding-window pass over one takes minutes on a 2-core CPU, so the MSD layout used here is the same three
real cases cut (in tmp_path) to a box around the tumour, with the affine moved accordingly — the same
dataset.json / imagesTr / labelsTr / imagesTs structure, 4-D int16 files, real labels and geometry.
"""

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmae_jax.main import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BTCV = DATA / "layouts" / "btcv"
MSD = DATA / "layouts" / "msd" / "Task01_BrainTumour"
EXAMPLE_4D = DATA / "mri" / "nibabel" / "example4d.nii.gz"
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present"), pytest.mark.slow]

# Every run: tiny quick models, one step, limits that keep the sliding windows to a few dozen.
MAE_STEPS = ["--config.num_train_steps=1", "--config.checkpoint.async_save=false",
             "--config.data.loader_threads=2"]
FT_STEPS = ["--config.num_train_steps=1", "--config.checkpoint.async_save=false", "--config.batch_size=1",
            "--config.data.loader_threads=2"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json_line(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _crop_nifti(src: Path, dst: Path, start, size):
    """``src`` cut to ``[start, start + size)`` on its first three axes; the affine keeps every voxel in place."""
    img = nib.load(str(src))
    sl = tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size))
    data = np.asanyarray(img.dataobj)[sl]
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.asarray(start, float) + img.affine[:3, 3]
    header = img.header.copy()
    out = nib.Nifti1Image(data, affine, header=header)
    out.set_qform(affine, int(img.header["qform_code"]) or 1)
    out.set_sform(affine, int(img.header["sform_code"]) or 1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dst))


def small_msd_layout(dst: Path, size=(48, 48, 40)) -> Path:
    """The MSD layout's three cases cut to ``size`` around the tumour (test case: around the brain's centre)."""
    task = dst / "Task01_BrainTumour"
    task.mkdir(parents=True, exist_ok=True)
    shutil.copy(MSD / "dataset.json", task / "dataset.json")
    meta = json.loads((MSD / "dataset.json").read_text())
    items = [(e["image"], e["label"]) for e in meta["training"]] + [(t, None) for t in meta["test"]]
    for image, label in items:
        shape = nib.load(str(MSD / image)).shape[:3]
        if label is not None:
            lab = np.asanyarray(nib.load(str(MSD / label)).dataobj)
            centre = np.round(np.argwhere(lab > 0).mean(0)).astype(int)
        else:
            centre = np.asarray(shape) // 2
        start = np.clip(centre - np.asarray(size) // 2, 0, np.asarray(shape) - np.asarray(size))
        _crop_nifti(MSD / image, task / image, start, size)
        if label is not None:
            _crop_nifti(MSD / label, task / label, start, size)
    return dst


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return {"root": root, "tfds": root / "tfds", "msd_manual": small_msd_layout(root / "msd_manual")}


def _check_prediction(out_path: Path, input_path: Path):
    pred, ref = nib.load(str(out_path)), nib.load(str(input_path))
    assert pred.shape == ref.shape[:3]
    np.testing.assert_array_equal(pred.affine, ref.affine)
    labels = np.asanyarray(pred.dataobj)
    assert labels.dtype == np.uint8
    return labels


def _assert_bad_input(capsys, argv, bad: Path, words: str):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert str(bad) in err and words in err, err


def test_btcv_build_pretrain_finetune_evaluate_predict(data_dirs, capsys, tmp_path):
    tfds_dir = data_dirs["tfds"]
    code, out, err = run_cli(capsys, "build", "btcv", "--manual-dir", BTCV, "--data-dir", tfds_dir, "--config", "monai")
    assert code == 0, err
    assert _json_line(out)["splits"] == {"train": 2}  # img0001, img0002; MONAI's validation cases 35..40 are absent
    data = [f"--config.data.data_dir={tfds_dir}", "--config.data.tfds_name=btcv/monai",
            "--config.data.eval_split=train"]
    mae, ft = tmp_path / "mae", tmp_path / "unetr"
    code, out, err = run_cli(capsys, "train", "--config", f"{REPO}/configs/btcv_mae3d.py:quick", "--workdir", mae,
                             *data, *MAE_STEPS)
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", "--config",
                             f"{REPO}/configs/btcv_unetr.py:quick,init=mae,init_checkpoint={mae}", "--workdir", ft,
                             *data, *FT_STEPS, "--config.segmentation.eval_limit=0")  # `evaluate` does it below
    assert code == 0, err
    assert _json_line(out)["step"] == 1
    assert json.loads((ft / "config.json").read_text())["init"] == "mae"

    metrics_file, figures = tmp_path / "metrics.json", tmp_path / "figures"
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", ft, "--split", "train", "--limit", "1",
                             "--output", metrics_file, "--figures", figures, "--manual-dir", BTCV)
    assert code == 0, err
    assert "spleen" in out and "BTCV mean Dice: 13 organs" in out
    result = json.loads(metrics_file.read_text())
    assert result["num_cases"] == 1 and result["classes"][0] == "spleen" and len(result["classes"]) == 13
    summary = result["summary"]
    for key in ("mean_dice", "mean_dice_8", "mean_dice_original"):
        assert summary[key] is not None and 0.0 <= summary[key] <= 1.0, key
    for key in ("mean_hd95", "mean_hd95_mm", "mean_hd95_mm_original"):  # None only if no spleen voxel was predicted
        assert key in summary and (summary[key] is None or math.isfinite(summary[key])), key
    assert result["cases"][0]["original_label"] == "file"
    assert sorted(p.name for p in figures.iterdir()) == [f"{result['cases'][0]['case_id']}.png"]

    image = BTCV / "RawData" / "Training" / "img" / "img0002.nii.gz"
    seg = tmp_path / "pred" / "img0002_seg.nii.gz"
    code, out, err = run_cli(capsys, "predict", "--checkpoint", ft, "--input", image, "--output", seg)
    assert code == 0, err
    labels = _check_prediction(seg, image)
    assert labels.max() <= 13 and _json_line(out)["shape"] == list(labels.shape)

    # bad inputs: exit code 2 and a message naming the file
    bad_out = tmp_path / "bad.nii.gz"
    _assert_bad_input(capsys, ["predict", "--checkpoint", ft, "--input", EXAMPLE_4D, "--output", bad_out],
                      EXAMPLE_4D, "channel")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(image.read_bytes()[:60000])
    _assert_bad_input(capsys, ["predict", "--checkpoint", ft, "--input", truncated, "--output", bad_out],
                      truncated, "truncated or corrupt")
    assert not bad_out.exists()


def test_msd_build_pretrain_finetune_evaluate_predict(data_dirs, capsys, tmp_path):
    tfds_dir, manual = data_dirs["tfds"], data_dirs["msd_manual"]
    code, out, err = run_cli(capsys, "build", "msd_brain_tumour", "--manual-dir", manual, "--data-dir", tfds_dir)
    assert code == 0, err
    assert _json_line(out)["splits"] == {"train": 1, "validation": 1, "test": 1}
    data = [f"--config.data.data_dir={tfds_dir}"]
    mae, ft = tmp_path / "mae", tmp_path / "unetr"
    code, out, err = run_cli(capsys, "train", "--config", f"{REPO}/configs/brats_mae3d.py:quick", "--workdir", mae,
                             *data, *MAE_STEPS)
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", "--config",
                             f"{REPO}/configs/brats_unetr.py:quick,init=mae,init_checkpoint={mae}", "--workdir", ft,
                             *data, *FT_STEPS)
    assert code == 0, err
    assert math.isfinite(_json_line(out)["eval"]["mean_dice"])

    metrics_file, figures = tmp_path / "metrics.json", tmp_path / "figures"
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", ft, "--best", "--output", metrics_file,
                             "--figures", figures, "--manual-dir", manual, "--compare", f"last={ft}")
    assert code == 0, err
    result = json.loads(metrics_file.read_text())
    assert result["classes"] == ["WT", "TC", "ET"] and result["split"] == "validation"
    for region in ("WT", "TC", "ET"):
        row = result["per_class"][region]
        assert row["dice"] is not None and 0.0 <= row["dice"] <= 1.0
        assert row["hd95_mm_original"] is not None and math.isfinite(row["hd95_mm_original"])
    assert math.isfinite(result["summary"]["mean_dice"]) and result["cases"][0]["original_label"] == "file"
    assert len(list(figures.glob("*.png"))) == 1

    task = manual / "Task01_BrainTumour"
    image = task / "imagesTs" / "BRATS_485.nii.gz"
    seg4d = tmp_path / "pred4d.nii.gz"
    code, out, err = run_cli(capsys, "predict", "--checkpoint", ft, "--input", image, "--output", seg4d)
    assert code == 0, err
    labels = _check_prediction(seg4d, image)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # the same case as four 3-D files (FLAIR, T1w, t1gd, T2w): the same prediction
    img = nib.load(str(image))
    channels = []
    for c, name in enumerate(("flair", "t1", "t1gd", "t2")):
        path = tmp_path / f"BRATS_485_{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., c], img.affine, header=img.header), str(path))
        channels.append(path)
    seg3d = tmp_path / "pred3d.nii.gz"
    code, out, err = run_cli(capsys, "predict", "--checkpoint", ft, *[a for p in channels for a in ("--input", p)],
                             "--output", seg3d)
    assert code == 0, err
    np.testing.assert_array_equal(_check_prediction(seg3d, channels[0]), labels)

    bad_out = tmp_path / "bad.nii.gz"
    mixed = [channels[0], EXAMPLE_4D, channels[2], channels[3]]
    _assert_bad_input(capsys, ["predict", "--checkpoint", ft, *[a for p in mixed for a in ("--input", p)],
                               "--output", bad_out], EXAMPLE_4D, "3-D volume is expected")
    _assert_bad_input(capsys, ["predict", "--checkpoint", ft, "--input", channels[0], "--output", bad_out],
                      channels[0], "channel")
    assert not bad_out.exists()
