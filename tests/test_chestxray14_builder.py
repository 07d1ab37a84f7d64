"""ChestX-ray14 TFDS builder on the 44 real NIH PNGs: splits, labels, decoding, naming, and every error path."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from medmae_jax.data import png  # noqa: E402
from medmae_jax.data.datasets import chestxray14 as cxr  # noqa: E402
from medmae_jax.data.labels import CXR14_LABELS  # noqa: E402
from medmae_jax.errors import DataError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr"
FULLRES = DATA / "nih_fullres"
FULL_CSV = DATA / "Data_Entry_2017_v2020.csv.gz"
RGBA_NAMES = ("00000100_000.png", "00001369_000.png")
SIZE = 64

if not (FULLRES / "labels.csv").exists():
    pytest.skip(f"shared test data not found at {FULLRES}", allow_module_level=True)


def _rows():
    with open(FULLRES / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


ROWS = _rows()
BY_NAME = {r["Image Index"]: r for r in ROWS}


def _split_lists(rows):
    """Official-style lists grouped by patient: every 4th patient (sorted by id) goes to test."""
    patients = sorted({int(r["Patient ID"]) for r in rows})
    test_patients = set(patients[::4])
    train_val = [r["Image Index"] for r in rows if int(r["Patient ID"]) not in test_patients]
    test = [r["Image Index"] for r in rows if int(r["Patient ID"]) in test_patients]
    return train_val, test


def _write_small_csv(path, rows, override=None):
    """The official columns of labels.csv (a subset of Data_Entry_2017_v2020.csv)."""
    cols = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
            "View Position"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            r = {**r, **(override or {}).get(r["Image Index"], {})}
            w.writerow([r[c] for c in cols])


def _make_manual(root: Path, *, train_val=None, test=None, csv_rows=None, csv_override=None, full_csv=False,
                 layout="nih", exclude=()):
    """A manual dir with symlinks to the real PNGs (nih: images_001/images/, flat: top level)."""
    root.mkdir(parents=True)
    img_dir = root / "images_001" / "images" if layout == "nih" else root
    img_dir.mkdir(parents=True, exist_ok=True)
    for r in ROWS:
        if r["Image Index"] not in exclude:
            (img_dir / r["Image Index"]).symlink_to(FULLRES / "images" / r["Image Index"])
    if full_csv:
        (root / FULL_CSV.name).symlink_to(FULL_CSV)
    else:
        _write_small_csv(root / "Data_Entry_2017_v2020.csv", ROWS if csv_rows is None else csv_rows, csv_override)
    tv, te = _split_lists(ROWS)
    (root / cxr.TRAIN_VAL_LIST).write_text("\n".join(tv if train_val is None else train_val) + "\n")
    (root / cxr.TEST_LIST).write_text("\n".join(te if test is None else test) + "\n")
    return root


def _reference_gray(name, size):
    """Pillow's own path: drop alpha, "L" conversion, antialiased BILINEAR resize."""
    with Image.open(FULLRES / "images" / name) as im:
        if im.mode != "L":
            im = im.convert("RGB").convert("L")
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))


def _read_all(data_source):
    return {split: {bytes(ex["image_name"]).decode(): ex for ex in (src[i] for i in range(len(src)))}
            for split, src in data_source.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cxr")
    manual = _make_manual(tmp / "manual", full_csv=True)
    data_dir = tmp / "data"
    builder = cxr.build_chestxray14(manual, data_dir, image_size=SIZE, num_workers=2)
    source = tfds.data_source(f"chestxray14/{cxr.config_name(SIZE)}", data_dir=os.fspath(data_dir))
    return builder, data_dir, _read_all(source)


def test_feature_spec_and_naming(built):
    builder, data_dir, _ = built
    assert builder.builder_config.name == "s64"
    assert (data_dir / "chestxray14" / "s64" / "1.0.0").is_dir()
    assert builder.info.file_format.value == "array_record"
    f = builder.info.features
    assert f["image"].shape == (SIZE, SIZE, 1) and f["image"].np_dtype == np.uint8
    assert f["labels"].shape == (14,) and f["labels"].np_dtype == np.float32
    assert set(f.keys()) == {"image", "labels", "patient_id", "view_position", "image_name"}
    assert builder.info.metadata["label_names"] == list(CXR14_LABELS)
    assert cxr.config_name(256) == cxr.ChestXray14.DEFAULT_CONFIG_NAME == "s256"
    assert cxr.config_name(32, 0.25, 1) == "s32_val0.25_seed1"


def test_splits_labels_and_images(built):
    _, _, data = built
    assert sum(len(v) for v in data.values()) == len(ROWS) == 44
    tv, te = _split_lists(ROWS)
    assert set(data["test"]) == set(te)
    assert set(data["train"]) | set(data["validation"]) == set(tv) and data["validation"]
    owner = {}
    for split, examples in data.items():
        for name, ex in examples.items():
            row = BY_NAME[name]
            expected = np.array([float(row[f"chexnet_{lab}"]) for lab in CXR14_LABELS], np.float32)
            np.testing.assert_array_equal(ex["labels"], expected, err_msg=name)
            assert int(ex["patient_id"]) == int(row["Patient ID"])
            assert bytes(ex["view_position"]).decode() == row["View Position"]
            assert ex["image"].shape == (SIZE, SIZE, 1) and ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["image"][..., 0], _reference_gray(name, SIZE), err_msg=name)
            assert owner.setdefault(int(ex["patient_id"]), split) == split, f"patient of {name} in two splits"


def test_rgba_images_decoded(built):
    _, _, data = built
    examples = {**data["train"], **data["validation"], **data["test"]}
    for name in RGBA_NAMES:
        with Image.open(FULLRES / "images" / name) as im:
            assert im.mode == "RGBA"
            rgb = np.asarray(im).astype(np.int64)[..., :3]
        # Pillow's fixed-point ITU-R 601-2 luma, computed independently in numpy.
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        np.testing.assert_array_equal(png.read_png_gray(FULLRES / "images" / name), luma)
        img = examples[name]["image"]
        assert img.shape == (SIZE, SIZE, 1) and img.min() < img.max()
        np.testing.assert_array_equal(img[..., 0], _reference_gray(name, SIZE))


def test_readback_without_tensorflow_or_this_module(built):
    _, data_dir, data = built
    code = textwrap.dedent(f"""
        import json, sys
        import tensorflow_datasets as tfds
        src = tfds.data_source("chestxray14/s64", data_dir={os.fspath(data_dir)!r})
        ex = src["test"][0]
        print(json.dumps({{"n": {{k: len(v) for k, v in src.items()}}, "shape": list(ex["image"].shape),
                           "tf": "tensorflow" in sys.modules,
                           "medmae": any(m.startswith("medmae_jax") for m in sys.modules)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == {k: len(v) for k, v in data.items()}
    assert res["shape"] == [SIZE, SIZE, 1] and not res["medmae"]
    assert not res["tf"] or __import__("importlib").util.find_spec("tensorflow") is not None


def test_flat_layout_rgb_16bit_and_second_config(tmp_path, built):
    """A flat layout with an RGB and a 16-bit copy; a second config coexists in the same data_dir."""
    _, data_dir, first = built
    manual = _make_manual(tmp_path / "manual", layout="flat", exclude=("00000001_000.png", "00000002_000.png"))
    with Image.open(FULLRES / "images" / "00000001_000.png") as im:
        im.convert("RGB").save(manual / "00000001_000.png")
    with Image.open(FULLRES / "images" / "00000002_000.png") as im:
        v8 = np.asarray(im)
    Image.fromarray((v8.astype(np.uint16) * 200 + 300)).save(manual / "00000002_000.png")
    with Image.open(manual / "00000002_000.png") as im:
        assert im.mode.startswith("I")
    builder = cxr.build_chestxray14(manual, data_dir, image_size=32, validation_fraction=0.25, seed=1,
                                    num_workers=1)
    assert builder.builder_config.name == "s32_val0.25_seed1"
    data = _read_all(tfds.data_source("chestxray14/s32_val0.25_seed1", data_dir=os.fspath(data_dir)))
    assert sum(map(len, data.values())) == 44 and len(data["validation"]) > len(first["validation"])
    ex = {**data["train"], **data["validation"], **data["test"]}
    np.testing.assert_array_equal(ex["00000001_000.png"]["image"][..., 0], _reference_gray("00000001_000.png", 32))
    lo, hi = int(v8.min()), int(v8.max())
    stretched = np.rint((v8.astype(np.float64) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    ref16 = np.asarray(Image.fromarray(stretched).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ex["00000002_000.png"]["image"][..., 0], ref16)
    # The first config is untouched.
    assert len(tfds.data_source("chestxray14/s64", data_dir=os.fspath(data_dir))["test"]) == len(first["test"])


def test_validation_is_by_patient(tmp_path):
    """Extra official images of the same patients (symlinked copies) must follow their patient."""
    wanted = {r["Patient ID"] for r in ROWS}
    with gzip.open(FULL_CSV, "rt", newline="") as f:
        by_patient = collections.defaultdict(list)
        for r in csv.reader(f):
            if r[3] in wanted:
                by_patient[r[3]].append(r[0])
    patient_of = {name: int(p) for p, names in by_patient.items() for name in names}
    manual = _make_manual(tmp_path / "m", full_csv=True)
    extra = []
    for r in ROWS:
        for other in by_patient[r["Patient ID"]][:4]:
            if other not in BY_NAME:
                (manual / "images_001" / "images" / other).symlink_to(FULLRES / "images" / r["Image Index"])
                extra.append(other)
    assert len(extra) > 30
    patients = {n: int(BY_NAME[n]["Patient ID"]) for n in BY_NAME}
    tv, te = _split_lists(ROWS)
    test_patients = {patients[n] for n in te}
    for other in extra:
        pid = patient_of[other]
        (te if pid in test_patients else tv).append(other)
        patients[other] = pid
    (manual / cxr.TRAIN_VAL_LIST).write_text("\n".join(tv))
    (manual / cxr.TEST_LIST).write_text("\n".join(te))
    for seed in (0, 1):
        plan = cxr.plan_splits(manual, validation_fraction=0.3, seed=seed)
        split_of = collections.defaultdict(set)
        for split, items in plan.splits.items():
            for name, _, entry in items:
                assert entry.patient_id == patients[name]
                split_of[entry.patient_id].add(split)
        assert all(len(s) == 1 for s in split_of.values())
        assert sum(map(len, plan.splits.values())) == 44 + len(extra)
        n_tv = len({patients[n] for n in tv})
        assert len({e.patient_id for _, _, e in plan.splits["validation"]}) == round(0.3 * n_tv)


def test_missing_image_error_and_skip_missing(tmp_path):
    gone = "00000353_000.png"
    manual = _make_manual(tmp_path / "m", exclude=(gone,))
    with pytest.raises(DataError, match=gone) as err:
        cxr.build_chestxray14(manual, tmp_path / "d", image_size=16)
    assert "skip_missing" in str(err.value)
    builder = cxr.build_chestxray14(manual, tmp_path / "d", image_size=16, skip_missing=True)
    assert builder.builder_config.name == "s16_skipmissing"
    assert builder.info.metadata["num_skipped_missing"] == 1
    assert builder.info.metadata["skipped_missing"] == [gone]
    src = tfds.data_source("chestxray14/s16_skipmissing", data_dir=os.fspath(tmp_path / "d"))
    assert sum(len(s) for s in src.values()) == 43


def test_image_absent_from_csv(tmp_path):
    absent = "00000211_000.png"
    manual = _make_manual(tmp_path / "m", csv_rows=[r for r in ROWS if r["Image Index"] != absent])
    with pytest.raises(DataError, match=absent):
        cxr.build_chestxray14(manual, tmp_path / "d", image_size=16)


def test_patient_in_both_lists(tmp_path):
    # 00000001_001.png is an official image of patient 1, whose 00000001_000.png is in the test list.
    tv, te = _split_lists(ROWS)
    assert "00000001_000.png" in te
    row = {**BY_NAME["00000001_000.png"], "Image Index": "00000001_001.png", "Follow-up #": "1"}
    manual = _make_manual(tmp_path / "m", csv_rows=ROWS + [row], train_val=tv + ["00000001_001.png"])
    shutil.copy(FULLRES / "images" / "00000001_000.png", manual / "images_001" / "images" / "00000001_001.png")
    with pytest.raises(DataError, match=r"patient id\(s\) 1;.*00000001_000\.png"):
        cxr.build_chestxray14(manual, tmp_path / "d", image_size=16)
    # The same image in both lists is caught too.
    (manual / cxr.TRAIN_VAL_LIST).write_text("\n".join(tv + ["00000001_000.png"]))
    with pytest.raises(DataError, match="also in .*train_val_list.txt: 00000001_000.png"):
        cxr.plan_splits(manual)


def test_corrupt_png(tmp_path):
    bad = "00000282_000.png"
    manual = _make_manual(tmp_path / "m", exclude=(bad,))
    data = (FULLRES / "images" / bad).read_bytes()
    (manual / "images_001" / "images" / bad).write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=bad):
        cxr.build_chestxray14(manual, tmp_path / "d", image_size=16, num_workers=1)
    with pytest.raises(DataError, match="unreadable PNG"):
        png.read_png_gray(b"\x89PNG\r\n\x1a\n garbage")


def test_unknown_finding_duplicate_name_and_missing_files(tmp_path):
    manual = _make_manual(tmp_path / "a", csv_override={"00000001_000.png": {"Finding Labels": "Pneumonitis"}})
    with pytest.raises(DataError, match="Pneumonitis"):
        cxr.plan_splits(manual)
    with pytest.raises(DataError, match="No Finding"):
        cxr.parse_findings("No Finding|Mass", where="x")
    np.testing.assert_array_equal(cxr.parse_findings("Hernia|Atelectasis", where="x"),
                                  np.eye(14, dtype=np.float32)[0] + np.eye(14, dtype=np.float32)[13])

    manual = _make_manual(tmp_path / "b")
    (manual / "images_002").mkdir()
    (manual / "images_002" / "00000001_000.png").symlink_to(FULLRES / "images" / "00000001_000.png")
    with pytest.raises(DataError, match="duplicate image file name"):
        cxr.plan_splits(manual)

    manual = _make_manual(tmp_path / "c")
    (manual / cxr.TEST_LIST).unlink()
    with pytest.raises(DataError, match="test_list.txt"):
        cxr.plan_splits(manual)


def test_png_conversions():
    """16-bit stretch, constant image, LA alpha dropping, and the shorter-side resize + centre crop."""
    ramp = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 50 + 1000)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    got = png.read_png_gray(buf.getvalue())
    expected = np.rint((ramp - 1000.0) * 255.0 / (ramp.max() - 1000.0)).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 5), 7, np.uint16)).save(buf, format="PNG")
    np.testing.assert_array_equal(png.read_png_gray(buf.getvalue()), np.zeros((5, 5), np.uint8))
    gray = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([gray, np.zeros_like(gray)], -1), mode="LA").save(buf, format="PNG")
    np.testing.assert_array_equal(png.read_png_gray(buf.getvalue()), gray)
    out = png.resize_square(gray, 20)
    ref = np.asarray(Image.fromarray(gray).resize((30, 20), Image.Resampling.BILINEAR))[:, 5:25]
    np.testing.assert_array_equal(out, ref)
