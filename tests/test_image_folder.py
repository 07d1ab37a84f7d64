"""`build images`: a 2-D folder with a multi-label CSV, patient-disjoint splits, read back without the originals."""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from medmae_jax.data.datasets import image_folder
from medmae_jax.data.datasets.collection_info import read_collection_info
from medmae_jax.errors import DataError
from medmae_jax.main import main


@pytest.fixture
def cxr(shared_data, tmp_path):
    src = tmp_path / "xr"
    shutil.copytree(shared_data / "cxr" / "nih_fullres" / "images", src / "images")
    shutil.copy(shared_data / "cxr" / "nih_fullres" / "labels.csv", src / "labels.csv")
    return src


def test_build_images_with_findings_and_patients(cxr, tmp_path, capsys):
    args = ["build", "images", "--no-progress", "--manual-dir", str(cxr / "images"),
            "--labels", str(cxr / "labels.csv"),
            "--patient-column", "Patient ID", "--data-dir", str(tmp_path / "data"), "--name", "xr",
            "--image-size", "32", "--val-fraction", "0.3"]
    assert main(args) == 0
    out = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith('{"dataset"')))
    assert out["splits"]["pretrain"] == 44 and out["splits"]["train"] + out["splits"]["validation"] == 44
    info = read_collection_info(tmp_path / "data" / "xr")
    assert info["num_classes"] == 14 and "Hernia" in info["class_names"]
    splits = json.loads((tmp_path / "data" / "xr" / "splits.json").read_text())["splits"]
    import csv
    with open(cxr / "labels.csv") as f:
        rows = {r["Image Index"]: r for r in csv.DictReader(f)}
    train_patients = {rows[i]["Patient ID"] for i in splits["train"]}
    assert not train_patients & {rows[i]["Patient ID"] for i in splits["validation"]}
    shutil.rmtree(cxr)  # read without the original files
    source = tfds.data_source("image_folder", split="train", data_dir=str(tmp_path / "data" / "xr"))
    ex = source[0]
    name = ex["image_name"].decode()
    expected = np.asarray([n in rows[name]["Finding Labels"].split("|") for n in info["class_names"]], np.float32)
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["labels"], expected)


def test_csv_naming_a_missing_image(cxr, tmp_path):
    (cxr / "images" / "00000001_000.png").unlink()
    with pytest.raises(DataError, match=r"labels.csv: line 2: image '00000001_000.png' not found"):
        image_folder.build_image_folder(str(cxr / "images"), str(tmp_path / "d"), "xr",
                                        labels_csv=str(cxr / "labels.csv"))


def test_rebuild_with_another_image_size_needs_overwrite(shared_data, tmp_path):
    src = tmp_path / "few"
    src.mkdir()
    for p in sorted((shared_data / "cxr" / "nih_fullres" / "images").glob("*.png"))[:4]:
        shutil.copy(p, src / p.name)
    image_folder.build_image_folder(str(src), str(tmp_path / "d"), "few", image_size=16)
    image_folder.build_image_folder(str(src), str(tmp_path / "d"), "few", image_size=16)  # reused
    with pytest.raises(DataError, match=r"few: already built differently \(image_size 16 -> 32\); pass --overwrite"):
        image_folder.build_image_folder(str(src), str(tmp_path / "d"), "few", image_size=32)
    image_folder.build_image_folder(str(src), str(tmp_path / "d"), "few", image_size=32, overwrite=True)
    source = tfds.data_source("image_folder", split="pretrain", data_dir=str(tmp_path / "d" / "few"))
    assert len(source) == 4 and source[0]["image"].shape == (32, 32, 1)
