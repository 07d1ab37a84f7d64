"""End to end on a user's own 2-D image folder through the CLI: real ChestX-ray14 PNGs (8-bit and RGBA) with a
findings CSV naming only some of them -> build images -> :quick MAE on every image -> fine-tuning init=mae on the
labeled ones -> a finite validation mean AUC, read back without the source folder."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from medmae_jax.main import main

REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "data" / "cxr" / "nih_fullres"
pytestmark = [pytest.mark.skipif(not CXR.is_dir(), reason="shared/data not present"), pytest.mark.slow]

QUICK = ["--config.checkpoint.async_save=false", "--config.data.loader_threads=2", "--no-progress"]
UNLABELED = 10  # the last images of the folder are left out of the CSV: pre-training only


def _run(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def _losses(workdir: Path, split: str, key: str) -> list:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [x[key] for x in lines if x["split"] == split and key in x]


def test_image_folder_build_pretrain_finetune_auc(tmp_path, capsys):
    src = tmp_path / "xrays"
    shutil.copytree(CXR / "images", src / "png")
    with open(CXR / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["Image Index"])
    labeled = rows[:-UNLABELED]
    with open(src / "findings.csv", "w", newline="") as f:  # the user's own column names
        w = csv.writer(f)
        w.writerow(["file", "subject", "findings"])
        w.writerows([[f"png/{r['Image Index']}", r["Patient ID"], r["Finding Labels"]] for r in labeled])
    built = tmp_path / "data"
    out = _run(capsys, "build", "images", "--no-progress", "--manual-dir", src, "--labels", src / "findings.csv",
               "--image-column", "file", "--findings-column", "findings", "--patient-column", "subject",
               "--data-dir", built, "--name", "xr", "--image-size", "32", "--val-fraction", "0.4")
    splits = json.loads(next(line for line in out.splitlines() if line.startswith('{"dataset"')))["splits"]
    assert splits["pretrain"] == len(rows) and splits["train"] + splits["validation"] == len(labeled)
    info = json.loads((built / "xr" / "collection.json").read_text())
    found = {n for r in labeled for n in r["Finding Labels"].split("|")} - {"No Finding"}
    assert sorted(info["class_names"]) == sorted(found)
    shutil.rmtree(src)  # read without the original files

    data = f"dataset=xr,data_dir={built}"
    mae, ft = tmp_path / "mae", tmp_path / "ft"
    _run(capsys, "train", "--config", f"{REPO}/configs/images_mae.py:quick,{data}", "--workdir", mae,
         "--config.num_train_steps=2", *QUICK)
    assert all(math.isfinite(v) for v in _losses(mae, "train", "loss"))
    _run(capsys, "train", "--config", f"{REPO}/configs/images_finetune.py:quick,{data},init=mae,init_checkpoint={mae}",
         "--workdir", ft, "--config.num_train_steps=3", *QUICK)
    saved = json.loads((ft / "config.json").read_text())
    assert (saved["init"], saved["classification"]["num_classes"]) == ("mae", len(found))
    aucs = _losses(ft, "eval", "mean_auc")
    assert aucs and math.isfinite(aucs[-1]) and 0.0 <= aucs[-1] <= 1.0, aucs
