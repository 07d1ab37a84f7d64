"""Host metrics: ROC-AUC against scikit-learn, Dice/HD against scipy/scikit-learn peers, label conventions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import directed_hausdorff

from medmae_jax.evaluate import metrics as M

sk_metrics = pytest.importorskip("sklearn.metrics")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MSD_LABEL = DATA / "layouts" / "msd" / "Task01_BrainTumour" / "labelsTr" / "BRATS_001.nii.gz"


# ---------------------------------------------------------------- ROC-AUC

@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auc_matches_sklearn_random_and_tied(decimals):
    rng = np.random.default_rng(1 if decimals is None else 10 + decimals)
    n, k = 500, 6
    y = (rng.random((n, k)) < np.linspace(0.03, 0.6, k)).astype(np.int64)
    s = rng.normal(size=(n, k)) + 0.8 * y
    if decimals is not None:
        s = np.round(s, decimals)     # heavy ties (decimals 0: a handful of distinct scores)
    res = M.roc_auc_per_class(y, s, names=[f"c{i}" for i in range(k)])
    ref = np.array([sk_metrics.roc_auc_score(y[:, j], s[:, j]) for j in range(k)])
    np.testing.assert_allclose(res.per_class, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(res.mean, sk_metrics.roc_auc_score(y, s, average="macro"), atol=1e-6)
    assert res.skipped == ()
    assert M.binary_roc_auc(y[:, 0], s[:, 0]) == pytest.approx(ref[0], abs=1e-6)


def test_auc_probabilities_and_bool_targets():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    p = np.round(1.0 / (1.0 + np.exp(-rng.normal(size=300) - y)), 2).astype(np.float32)
    assert M.binary_roc_auc(y, p) == pytest.approx(sk_metrics.roc_auc_score(y, p), abs=1e-6)


def test_single_class_label_undefined_and_left_out_of_mean():
    rng = np.random.default_rng(2)
    n = 200
    y = (rng.random((n, 4)) < 0.4).astype(int)
    y[:, 1] = 0          # no positives (e.g. Hernia absent from a small test split)
    y[:, 3] = 1          # no negatives
    s = rng.random((n, 4))
    names = ["Atelectasis", "Hernia", "Mass", "AllPositive"]
    res = M.roc_auc_per_class(y, s, names=names)
    assert np.isnan(res.per_class[1]) and np.isnan(res.per_class[3])
    assert res.skipped == ("Hernia", "AllPositive")
    ok = [sk_metrics.roc_auc_score(y[:, j], s[:, j]) for j in (0, 2)]
    np.testing.assert_allclose(res.per_class[[0, 2]], ok, atol=1e-6)
    assert res.mean == pytest.approx(np.mean(ok), abs=1e-9)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["per_class"]["Hernia"] is None and d["skipped"] == ["Hernia", "AllPositive"]
    assert "Hernia" in res.table()
    all_single = M.roc_auc_per_class(np.zeros((5, 2)), np.zeros((5, 2)))
    assert math.isnan(all_single.mean) and len(all_single.skipped) == 2


def test_auc_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        M.roc_auc_per_class(np.array([[0], [2]]), np.array([[0.1], [0.2]]))
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc_per_class(np.array([0, 1]), np.array([np.nan, 0.2]))
    with pytest.raises(ValueError, match="y_true"):
        M.roc_auc_per_class(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="names"):
        M.roc_auc_per_class(np.zeros((4, 2)), np.zeros((4, 2)), names=["a"])


# ---------------------------------------------------------------- Dice

def _random_label_maps(seed=0, shape=(24, 20, 16), k=5):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    target = np.digitize(field, np.quantile(field, np.linspace(0, 1, k + 1)[1:-1])).astype(np.int16)
    pred = target.copy()
    noise = rng.random(shape) < 0.15
    pred[noise] = rng.integers(0, k, noise.sum())
    return pred, target, k


def test_dice_equals_f1_score_per_class():
    pred, target, k = _random_label_maps()
    ours = M.dice_per_class(pred, target, num_classes=k)
    ref = [sk_metrics.f1_score((target == c).ravel(), (pred == c).ravel()) for c in range(1, k)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    onehot = M.dice_per_class(np.eye(k)[pred], np.eye(k)[target], one_hot=True)
    np.testing.assert_allclose(onehot, ours, atol=1e-12)
    # float label maps (NIfTI get_fdata) give the same; a chosen subset keeps its order
    np.testing.assert_allclose(M.dice_per_class(pred.astype(np.float32), target, labels=[3, 1]), ours[[2, 0]])


def test_dice_empty_classes_follow_monai_semantics():
    t = np.zeros((6, 6), np.uint8)
    t[1:3, 1:3] = 1
    p = t.copy()
    p[4, 4] = 2                        # class 2: absent from truth, predicted (false positive)
    d = M.dice_per_class(p, t, num_classes=4)          # class 3: absent from both
    assert d[0] == 1.0 and np.isnan(d[1]) and np.isnan(d[2])
    d = M.dice_per_class(p, t, num_classes=4, ignore_empty=False)
    assert d.tolist() == [1.0, 0.0, 1.0]


def test_bad_label_maps_raise():
    with pytest.raises(ValueError, match="shape"):
        M.dice_per_class(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="negative"):
        M.dice_per_class(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="non-integer"):
        M.hausdorff_distance(np.full((3, 3), 0.5), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="binary"):
        M.dice_per_class(np.full((3, 3, 2), 0.3), np.zeros((3, 3, 2)), one_hot=True)
    with pytest.raises(ValueError, match="spacing"):
        M.hausdorff_distance(np.ones((3, 3), int), np.ones((3, 3), int), spacing=(1.0, 2.0, 3.0))


# ---------------------------------------------------------------- Hausdorff

def _surface_points(mask, spacing):
    m = np.pad(mask, 1)
    surf = m & ~ndimage.binary_erosion(m)
    return (np.argwhere(surf) - 1) * np.asarray(spacing, float)


@pytest.mark.parametrize("spacing", [None, (2.0, 0.8, 1.5)])
def test_hausdorff_against_scipy_point_sets(spacing):
    pred, target, k = _random_label_maps(seed=4)
    sp = (1.0, 1.0, 1.0) if spacing is None else spacing
    hd = M.hausdorff_distance(pred, target, num_classes=k, spacing=spacing, percentile=None)
    hd95 = M.hausdorff_distance(pred, target, num_classes=k, spacing=spacing)
    for j, c in enumerate(range(1, k)):
        a, b = _surface_points(pred == c, sp), _surface_points(target == c, sp)
        ref = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
        assert hd[j] == pytest.approx(ref, abs=1e-9)
        ref95 = max(np.percentile(cKDTree(b).query(a)[0], 95), np.percentile(cKDTree(a).query(b)[0], 95))
        assert hd95[j] == pytest.approx(ref95, abs=1e-9)


def test_hausdorff_empty_cases_and_border_surfaces():
    t = np.zeros((10, 10), np.uint8)
    t[:4, :4] = 1                               # touches the image border: the border is surface too
    p = np.zeros_like(t)
    p[:4, :6] = 1
    assert M.hausdorff_distance(p, t, percentile=None)[0] == pytest.approx(2.0)
    p2 = np.zeros_like(t)
    p2[7, 7] = 2
    out = M.hausdorff_distance(p2, t, num_classes=4)
    assert np.isnan(out).all()                 # 1: missed, 2: false positive, 3: absent (HD95 undefined)
    out = M.hausdorff_distance(p2, t, num_classes=4, percentile=None)
    assert np.isinf(out[:2]).all() and np.isnan(out[2])


# ---------------------------------------------------------------- BTCV and MSD summaries, tables

def test_btcv_means_and_table():
    rng = np.random.default_rng(5)
    field = ndimage.gaussian_filter(rng.normal(size=(30, 30, 12)), 1.5)
    target = np.digitize(field, np.quantile(field, np.linspace(0, 1, 15)[1:-1])).astype(np.uint8)
    target[target == 5] = 0                              # esophagus absent (as in the shared BTCV crop)
    pred = np.where(rng.random(target.shape) < 0.1, rng.integers(0, 14, target.shape), target).astype(np.uint8)
    res = M.btcv_metrics(pred, target, spacing=(1.5, 1.5, 2.0))
    summ = M.btcv_summary(res)
    dice = M.dice_per_class(pred, target, labels=range(1, 14))
    assert np.isnan(dice[4])
    assert summ["dice_mean_13"] == pytest.approx(np.nanmean(dice))
    assert summ["dice_mean_8"] == pytest.approx(np.mean(dice[[0, 1, 2, 3, 5, 6, 7, 10]]))
    assert summ["hd95_mm_mean_8"] == pytest.approx(np.mean(res.hd95_mm[[0, 1, 2, 3, 5, 6, 7, 10]]))
    table = res.table()
    assert "spleen" in table and "pancreas" in table and "HD95 (mm)" in table
    assert table.splitlines()[2 + 4].split()[1] == "-"    # esophagus row: undefined
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["per_class"]["esophagus"]["dice"] is None
    assert d["per_class"]["liver"]["dice"] == pytest.approx(dice[5])
    assert json.loads(json.dumps(M.to_jsonable(summ))) == pytest.approx(summ)


def test_region_conventions():
    lab = np.arange(5).reshape(5, 1).repeat(3, 1)      # one row per label 0..4
    msd = M.region_masks(lab, "msd")
    np.testing.assert_array_equal(msd[..., 0], np.isin(lab, [1, 2, 3]))    # WT: edema + non-enh + enh
    np.testing.assert_array_equal(msd[..., 1], np.isin(lab, [2, 3]))       # TC
    np.testing.assert_array_equal(msd[..., 2], lab == 3)                   # ET (dataset.json)
    np.testing.assert_array_equal(M.region_masks(lab, "monai_tutorial")[..., 2], lab == 2)
    brats = M.region_masks(lab, "brats")
    np.testing.assert_array_equal(brats, np.stack([np.isin(lab, [1, 2, 4]), np.isin(lab, [1, 4]), lab == 4], -1))
    custom = M.region_masks(lab, {"TC": [1, 4]}, regions=("TC",))
    np.testing.assert_array_equal(custom[..., 0], brats[..., 1])
    with pytest.raises(ValueError, match="unknown region convention"):
        M.region_masks(lab, "bratz")


def test_region_metrics_on_real_msd_labels():
    nib = pytest.importorskip("nibabel")
    if not MSD_LABEL.exists():
        pytest.skip(f"test data not found: {MSD_LABEL}")
    target = np.asarray(nib.load(str(MSD_LABEL)).dataobj)[50:120, 45:125, 50:120]
    pred = np.roll(target, 2, axis=1)
    res = M.region_metrics(pred, target, "msd")
    for j, labs in enumerate(([1, 2, 3], [2, 3], [3])):
        t, p = np.isin(target, labs).ravel(), np.isin(pred, labs).ravel()
        assert res.dice[j] == pytest.approx(sk_metrics.f1_score(t, p), abs=1e-12)
    # region masks as the prediction (thresholded sigmoid channels) give the same numbers
    again = M.region_metrics(M.region_masks(pred, "msd"), target, "msd")
    np.testing.assert_allclose(again.dice, res.dice)
    np.testing.assert_allclose(again.hd95, res.hd95)
    assert res.names == ("WT", "TC", "ET") and np.all(res.hd95 >= 2.0)
    with pytest.raises(ValueError, match="prediction shape"):
        M.region_metrics(pred[:-1], target)


def test_format_metrics_table_marks_undefined():
    text = M.format_metrics_table(["a", "bb"], [0.5, float("nan")], [1.0, float("inf")])
    lines = text.splitlines()
    assert lines[0].split() == ["class", "Dice", "HD95", "(vox)"]
    assert lines[3].split() == ["bb", "-", "inf"]
    assert lines[-1].split()[:2] == ["mean", "0.5000"]
    with pytest.raises(ValueError, match="values"):
        M.format_metrics_table(["a"], [0.1, 0.2])
