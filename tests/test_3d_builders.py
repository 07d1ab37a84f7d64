"""BTCV and MSD Task01 TFDS builders: build from the real layouts (no TensorFlow), read back, errors."""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from medmae_jax.data import nifti  # noqa: E402
from medmae_jax.data.datasets import btcv, tfds_utils  # noqa: E402
from medmae_jax.data.datasets import msd_brain_tumour as msd
from medmae_jax.errors import DataError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BTCV_DIR = DATA / "layouts" / "btcv"
MSD_DIR = DATA / "layouts" / "msd"
TASK = MSD_DIR / "Task01_BrainTumour"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")


def _by_case(source):
    return {tfds_utils.as_str(source[i]["case_id"]): source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def btcv_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    for config in ("monai", "selfmedmae"):
        btcv.build_btcv(BTCV_DIR, data_dir, config)
    return data_dir


@pytest.fixture(scope="module")
def msd_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    msd.build_msd_brain_tumour(MSD_DIR, data_dir, "fold0")
    return data_dir


def test_btcv_splits_follow_the_configs(btcv_dir):
    on_disk = {f"img{c:04d}" for c in btcv.find_cases(str(BTCV_DIR))}
    assert on_disk == {"img0001", "img0002"}
    for config, train, val in (("monai", btcv.MONAI_TRAIN, btcv.MONAI_VAL),
                               ("selfmedmae", btcv.SELFMEDMAE_TRAIN, btcv.SELFMEDMAE_VAL)):
        sources = tfds.data_source(f"btcv/{config}", data_dir=str(btcv_dir))
        expected = {"train": {f"img{c:04d}" for c in train} & on_disk,
                    "validation": {f"img{c:04d}" for c in val} & on_disk}
        assert set(sources) == {k for k, v in expected.items() if v}  # empty splits are left out
        for split, source in sources.items():
            assert set(_by_case(source)) == expected[split]
    assert len(btcv.MONAI_TRAIN) == 24 and len(btcv.MONAI_VAL) == 6
    assert len(btcv.SELFMEDMAE_TRAIN) == 18 and len(btcv.SELFMEDMAE_VAL) == 12
    assert set(btcv.SELFMEDMAE_TRAIN) | set(btcv.SELFMEDMAE_VAL) == set(btcv.ALL_TRAINING_CASES)


def test_btcv_examples_and_write_back(btcv_dir, tmp_path):
    examples = _by_case(tfds.data_source("btcv/monai", data_dir=str(btcv_dir), split="train"))
    for case_id, ex in examples.items():
        image, label = ex["image"], ex["label"]
        assert image.dtype == np.float32 and image.ndim == 4 and image.shape[-1] == 1
        assert label.dtype == np.uint8 and label.shape == image.shape[:3] and bool(ex["has_label"])
        assert image.min() >= 0.0 and image.max() <= 1.0 and label.max() <= 13
        geometry = nifti.Geometry.from_features(ex)
        assert geometry.array_shape == label.shape
        np.testing.assert_allclose(nifti.voxel_spacing(geometry.array_affine), (1.5, 1.5, 2.0), atol=1e-6)
        path = BTCV_DIR / tfds_utils.as_str(ex["image_file"])
        assert path.name == f"{case_id}.nii.gz" and np.array_equal(ex["original_affine"], nib.load(str(path)).affine)
        raw_label = np.asanyarray(nib.load(str(path).replace("img", "label")).dataobj)
        assert set(np.unique(label)) == set(np.unique(raw_label))  # nothing cropped or resampled away
        out = tmp_path / f"{case_id}_pred.nii.gz"
        nifti.write_nifti(out, label, geometry, reference=path)
        back = nib.load(str(out))
        assert back.shape == raw_label.shape and np.array_equal(back.affine, nib.load(str(path)).affine)
        if case_id == "img0001":  # 3 mm -> 1.5 mm: the label comes back voxel for voxel
            assert np.array_equal(np.asanyarray(back.dataobj), raw_label)
    assert set(np.unique(examples["img0001"]["label"])) == set(range(14)) - {5}  # esophagus absent


@pytest.mark.slow  # builds three 240x240x155x4 volumes (~10 s on 2 cores)
def test_msd_folds_splits_and_examples(msd_dir):
    sources = tfds.data_source("msd_brain_tumour/fold0", data_dir=str(msd_dir))
    meta = json.loads((TASK / "dataset.json").read_text())
    ids = [os.path.basename(t["image"]).split(".")[0] for t in meta["training"]]
    folds = msd.fold_assignment(len(ids))
    expected = {"train": {i for i, f in zip(ids, folds) if f != 0},
                "validation": {i for i, f in zip(ids, folds) if f == 0},
                "test": {os.path.basename(p).split(".")[0] for p in meta["test"]}}
    assert set(sources) == {k for k, v in expected.items() if v}
    seen = {}
    for split, source in sources.items():
        examples = _by_case(source)
        assert set(examples) == expected[split]
        seen.update(examples)
    assert len(seen) == 3
    for case_id, ex in seen.items():
        image = ex["image"]
        assert image.dtype == np.float32 and image.ndim == 4 and image.shape[-1] == 4
        for c in range(4):  # z-scored over the non-zero voxels of each channel
            vals = image[..., c][image[..., c] != 0].astype(np.float64)
            assert abs(vals.mean()) < 1e-3 and abs(vals.std() - 1) < 1e-3
        geometry = nifti.Geometry.from_features(ex)
        assert geometry.array_shape == image.shape[:3]
        assert nib.aff2axcodes(geometry.array_affine) == ("R", "A", "S")
        if case_id in expected["test"]:
            assert not ex["has_label"] and ex["label"].size == 0 and ex["regions"].size == 0
            continue
        label, regions = ex["label"], ex["regions"]
        assert bool(ex["has_label"]) and label.shape == image.shape[:3] and regions.shape == image.shape[:3] + (3,)
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(regions, msd.brats_regions(label, "msd"))
        raw = np.asanyarray(nib.load(str(TASK / "labelsTr" / f"{case_id}.nii.gz")).dataobj)
        assert np.array_equal(nifti.to_original(label, geometry), raw)  # 1 mm already: exact


def test_brats_region_conventions():
    label = np.array([0, 1, 2, 3], np.uint8)
    tc, wt, et = msd.brats_regions(label, "msd").T
    assert tc.tolist() == [0, 0, 1, 1] and wt.tolist() == [0, 1, 1, 1] and et.tolist() == [0, 0, 0, 1]
    assert msd.brats_regions(label, "monai")[:, 2].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError):
        msd.brats_regions(label, "brats")
    configs = {c.name: c for c in msd.MsdBrainTumour.BUILDER_CONFIGS}
    assert configs["fold3"].fold == 3 and configs["fold3"].label_convention == "msd"
    assert configs["fold3_monai"].label_convention == "monai"


# --------------------------------------------------------------------------------------------
# errors


def _link_tree(src: Path, dst: Path, skip=()):
    for root, _, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if str(rel / f) not in skip:
                os.symlink(Path(root) / f, dst / rel / f)


def test_msd_missing_dataset_json(tmp_path):
    _link_tree(TASK, tmp_path / "Task01_BrainTumour", skip={"dataset.json"})
    with pytest.raises(DataError, match="dataset.json") as e:
        msd.build_msd_brain_tumour(tmp_path, tmp_path / "out")
    assert "dataset.json" in e.value.path


def test_msd_listed_file_missing(tmp_path):
    task = tmp_path / "Task01_BrainTumour"
    _link_tree(TASK, task, skip={"labelsTr/BRATS_002.nii.gz", "dataset.json"})
    shutil.copy(TASK / "dataset.json", task / "dataset.json")
    with pytest.raises(DataError, match="missing on disk") as e:
        msd.build_msd_brain_tumour(tmp_path, tmp_path / "out")
    assert e.value.path == str(task / "labelsTr" / "BRATS_002.nii.gz")
    (task / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="parse"):
        msd.read_dataset_json(str(task))


def test_btcv_unpaired_files(tmp_path):
    raw = tmp_path / "a" / "RawData" / "Training"
    _link_tree(BTCV_DIR / "RawData" / "Training", raw, skip={"label/label0002.nii.gz"})
    with pytest.raises(DataError, match="no label") as e:
        btcv.build_btcv(tmp_path / "a", tmp_path / "out")
    assert e.value.path == str(raw / "img" / "img0002.nii.gz")
    raw = tmp_path / "b" / "RawData" / "Training"
    _link_tree(BTCV_DIR / "RawData" / "Training", raw, skip={"img/img0001.nii.gz"})
    with pytest.raises(DataError, match="no image") as e:
        btcv.find_cases(str(tmp_path / "b"))
    assert e.value.path == str(raw / "label" / "label0001.nii.gz")
    with pytest.raises(DataError, match="not found"):
        btcv.build_btcv(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="RawData/Training"):
        btcv.build_btcv(tmp_path / "empty", tmp_path / "out")


@pytest.mark.parametrize("split,missing,key", [("monai", "validation", "eval_split"),
                                               ("selfmedmae", "train", "train_split")])
def test_btcv_with_too_few_cases_stops_before_the_first_step(btcv_dir, tmp_path, capsys, split, missing, key):
    """Two BTCV cases leave one split of each fixed case list empty: training names it before any step runs."""
    from medmae_jax.main import main
    workdir = tmp_path / "run"
    code = main(["train", "--config", f"btcv_unetr:quick,split={split}", "--workdir", str(workdir),
                 f"--config.data.data_dir={btcv_dir}", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert f"btcv/{split} in {btcv_dir}: split '{missing}' (data.{key}) cannot be opened" in err[0]
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
