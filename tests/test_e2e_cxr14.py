"""End to end on real ChestX-ray14 PNGs: build -> MAE pre-train -> fine-tune (init=mae) -> test AUC; reconstruct."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")

from medmae_jax import config_loading  # noqa: E402
from medmae_jax.data.datasets import chestxray14 as cxr  # noqa: E402
from medmae_jax.data.labels import CXR14_LABELS  # noqa: E402
from medmae_jax.main import main  # noqa: E402
from medmae_jax.tasks.classification import evaluate_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULLRES = REPO.parent / "shared" / "data" / "cxr" / "nih_fullres"
SIZE = 40  # built size; the :quick configs crop 32 px
RGBA, GRAY = "00000100_000.png", "00000001_000.png"

if not (FULLRES / "labels.csv").exists():
    pytest.skip(f"shared test data not found at {FULLRES}", allow_module_level=True)

with open(FULLRES / "labels.csv", newline="") as _f:
    ROWS = list(csv.DictReader(_f))
TEST_PATIENTS = set(sorted({int(r["Patient ID"]) for r in ROWS})[::4])  # every 4th patient: the official-style test


def _make_manual(root: Path) -> Path:
    """NIH layout with symlinks to the 44 real PNGs, the label table's official columns and patient-split lists."""
    images = root / "images_001" / "images"
    images.mkdir(parents=True)
    for r in ROWS:
        (images / r["Image Index"]).symlink_to(FULLRES / "images" / r["Image Index"])
    cols = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
            "View Position"]
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows([r[c] for c in cols] for r in ROWS)
    test = [r["Image Index"] for r in ROWS if int(r["Patient ID"]) in TEST_PATIENTS]
    train_val = [r["Image Index"] for r in ROWS if int(r["Patient ID"]) not in TEST_PATIENTS]
    (root / cxr.TRAIN_VAL_LIST).write_text("\n".join(train_val) + "\n")
    (root / cxr.TEST_LIST).write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cxr_e2e")
    manual, data_dir = _make_manual(tmp / "manual"), tmp / "data"
    if importlib.util.find_spec("medmae_jax.cli.build") is not None:
        assert main(["build", "chestxray14", "--manual-dir", str(manual), "--data-dir", str(data_dir),
                     "--image-size", str(SIZE)]) == 0
    else:  # the build command is optional here; the library function is the same code path
        cxr.build_chestxray14(manual, data_dir, image_size=SIZE, num_workers=2)
    assert (data_dir / "chestxray14" / cxr.config_name(SIZE)).is_dir()
    data = [f"--config.data.data_dir={data_dir}", f"--config.data.tfds_name=chestxray14/{cxr.config_name(SIZE)}"]
    mae_dir, ft_dir = tmp / "mae", tmp / "finetune"
    assert main(["train", "--config", str(REPO / "configs/cxr14_mae.py:quick"), "--workdir", str(mae_dir),
                 *data]) == 0
    spec = f"{REPO / 'configs/cxr14_finetune.py'}:quick,init=mae,init_checkpoint={mae_dir}"
    overrides = [*data, "--config.eval_every_steps=3"]
    assert main(["train", "--config", spec, "--workdir", str(ft_dir), *overrides]) == 0
    config = config_loading.config_from_args(spec, [o[len("--config."):] for o in overrides])
    return {"tmp": tmp, "mae": mae_dir, "finetune": ft_dir, "config": config}


@pytest.mark.slow
def test_pretrain_finetune_evaluate_on_real_xrays(runs):
    ft_dir, config = runs["finetune"], runs["config"]
    saved = json.loads((ft_dir / "config.json").read_text())
    assert (saved["task"], saved["init"], saved["init_checkpoint"]) == ("classification", "mae", str(runs["mae"]))
    # Evaluation through the trainer (validation split): every label is either scored or marked undefined.
    evals = [json.loads(x) for x in (ft_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert e["num_labels_defined"] + e["num_labels_undefined"] == 14
        scored = [k for k in e if k.startswith("auc/")]
        assert len(scored) == e["num_labels_defined"]
        assert len([k for k in e if k.startswith("undefined/")]) == e["num_labels_undefined"]
        if scored:
            assert math.isfinite(e["mean_auc"]) and all(0.0 <= e[k] <= 1.0 for k in scored)
    # The final report on the official-style test split.
    report = evaluate_checkpoint(config, str(ft_dir), "test")
    test_rows = [r for r in ROWS if int(r["Patient ID"]) in TEST_PATIENTS]
    labels = np.array([[float(r[f"chexnet_{n}"]) for n in CXR14_LABELS] for r in test_rows])
    one_class = [n for n, col in zip(CXR14_LABELS, labels.T) if len(np.unique(col)) == 1]
    assert report["num_examples"] == len(test_rows) and report["step"] == config.num_train_steps
    assert sorted(report["undefined_labels"]) == sorted(one_class) and one_class, "some labels are undefined here"
    assert report["num_labels_defined"] == 14 - len(one_class) > 0
    assert math.isfinite(report["mean_auc"])
    scored = [v for v in report["per_class"].values() if v is not None]
    assert len(scored) == report["num_labels_defined"] and all(math.isfinite(v) for v in scored)
    np.testing.assert_allclose(report["mean_auc"], np.mean(scored))
    assert all(report["per_class"][n] is None for n in one_class)


def test_reconstruct_two_real_pngs_one_rgba(runs, tmp_path):
    with Image.open(FULLRES / "images" / RGBA) as im:
        assert im.mode == "RGBA"
    out = tmp_path / "figs" / "reconstruction.png"
    code = main(["reconstruct", "--checkpoint", str(runs["mae"]), "--images", str(FULLRES / "images" / RGBA),
                 str(FULLRES / "images" / GRAY), "--output", str(out), "--mask-ratio", "0.5", "--seed", "3"])
    assert code == 0 and out.is_file()
    with Image.open(out) as fig:
        assert fig.format == "PNG" and fig.size[0] > 100 and fig.size[1] > 300
        pixels = np.asarray(fig.convert("RGB"))
    assert pixels.std() > 10  # a drawn figure, not a blank canvas
    # A fine-tuned classifier is no MAE: a clear error, not a traceback.
    assert main(["reconstruct", "--checkpoint", str(runs["finetune"]), "--images", str(FULLRES / "images" / GRAY),
                 "--output", str(tmp_path / "x.png")]) == 2


NIH1000 = REPO.parent / "shared" / "data" / "cxr" / "nih1000_64"


@pytest.mark.skipif(not (NIH1000 / "labels.csv").exists(), reason="nih1000_64 not found")
def test_nih1000_folders_are_checked_for_patient_leakage():
    from medmae_jax.errors import DataError
    from medmae_jax.experiments import cxr14_mini

    with pytest.raises(DataError, match=r"patients have images in more than one of the train/valid/test folders"):
        cxr14_mini.load_nih1000(str(NIH1000), "error")
    loaded = cxr14_mini.load_nih1000(str(NIH1000), "reassign")
    sources, summary = loaded["sources"], loaded["summary"]
    with open(NIH1000 / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["relpath"].startswith("NIH1000/")]
    assert sum(len(s) for s in sources.values()) == len(rows) == 1000
    patients = {k: set(s.patient_ids.tolist()) for k, s in sources.items()}
    assert not (patients["train"] & patients["test"] or patients["train"] & patients["validation"]
                or patients["validation"] & patients["test"])
    moved = {m["patient"] for m in summary["moves"]}
    assert len(moved) == summary["crossing_patients"] > 0
    by_rel = {r["relpath"]: r for r in rows}
    folder = {"train": "train", "valid": "validation", "test": "test"}
    for split, source in sources.items():
        for i in (0, len(source) - 1):
            row = by_rel[source.names[i]]
            ex = source[i]
            assert ex["image"].shape == (64, 64, 1) and ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["labels"], [float(row[f"chexnet_{n}"]) for n in CXR14_LABELS])
            if int(row["Patient ID"]) not in moved:  # everyone else stays in their folder
                assert folder[row["relpath"].split("/")[1]] == split


@pytest.mark.skipif(not (NIH1000 / "labels.csv").exists(), reason="nih1000_64 not found")
@pytest.mark.slow
def test_mini_reproduction_runner_quick(tmp_path):
    from medmae_jax.experiments import cxr14_mini

    assert cxr14_mini.main(["--data", str(NIH1000), "--workdir", str(tmp_path / "x"), "--seeds", "1", "--quick"]) == 2
    code = cxr14_mini.main(["--data", str(NIH1000), "--workdir", str(tmp_path), "--seeds", "1", "--quick",
                            "--patient-overlap", "reassign"])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [(r["seed"], r["init"]) for r in result["runs"]] == [(0, "mae"), (0, "scratch")]
    for r in result["runs"]:
        assert math.isfinite(r["test_mean_auc"]) and r["test_examples"] == result["data"]["splits"]["test"]["images"]
        assert r["test_undefined_labels"] == ["Pneumothorax", "Emphysema", "Hernia"]  # no positive in the test part
    finetune_mae = json.loads((tmp_path / "seed0" / "finetune_mae" / "config.json").read_text())
    assert finetune_mae["init"] == "mae" and finetune_mae["init_checkpoint"].endswith("seed0/mae")
    assert "| MAE self pre-trained |" in (tmp_path / "results.md").read_text()
