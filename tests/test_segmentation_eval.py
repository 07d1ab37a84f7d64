"""Split evaluation takes any predictor and the label conventions: no task, no model."""

import ml_collections
import numpy as np
import pytest

from medmae_jax.data.labels import SegmentationLabels, label_to_regions
from medmae_jax.evaluate.segmentation_eval import evaluate_split


def _config(**segmentation):
    return ml_collections.ConfigDict({"segmentation": segmentation})


def _cases(rng, n=2, shape=(12, 10, 8), labels=4):
    cases = []
    for i in range(n):
        label = rng.integers(0, labels, size=shape).astype(np.uint8)
        cases.append({"case_id": f"case{i}", "image": rng.normal(size=shape + (1,)).astype(np.float32),
                      "label": label, "pixdim": np.array([1.5, 1.5, 2.0])})
    return cases


def test_multiclass_conventions_and_a_plain_function_predictor():
    rng = np.random.default_rng(0)
    cases = _cases(rng)
    conventions = SegmentationLabels.from_config(_config(kind="multiclass", num_classes=4))
    assert conventions.names == ("class_1", "class_2", "class_3") and conventions.channels == (1, 2, 3)
    lookup = lambda image: next(c["label"] for c in cases if np.array_equal(c["image"], image))  # noqa: E731
    perfect = evaluate_split(lookup, cases, conventions, split="validation", hd95=True, original=False)
    assert [c.case_id for c in perfect.cases] == ["case0", "case1"]
    np.testing.assert_array_equal(np.stack([c.dice for c in perfect.cases]), 1.0)
    np.testing.assert_array_equal(np.stack([c.hd95_mm for c in perfect.cases]), 0.0)
    empty = evaluate_split(lambda image: np.zeros(image.shape[:-1], np.uint8), cases, conventions,
                           split="validation", hd95=False)
    np.testing.assert_array_equal(np.stack([c.dice for c in empty.cases]), 0.0)
    assert empty.summary()["mean_dice"] == 0.0


def test_btcv_conventions_report_the_8_organ_mean():
    conventions = SegmentationLabels.from_config(_config(kind="multiclass", num_classes=14))
    assert conventions.btcv and conventions.names[0] == "spleen" and len(conventions.names) == 13
    named = SegmentationLabels.from_config(_config(kind="multiclass", num_classes=14, class_names=[f"c{i}" for i in
                                                                                                   range(1, 14)]))
    assert not named.btcv and named.names[:2] == ("c1", "c2")


@pytest.mark.parametrize("convention", ["msd", "monai"])
def test_region_conventions_report_wt_tc_et_whatever_the_channel_order(convention):
    rng = np.random.default_rng(1)
    cases = _cases(rng, n=1)
    conventions = SegmentationLabels.from_config(
        _config(kind="regions", regions=["TC", "WT", "ET"], label_convention=convention))
    assert conventions.names == ("WT", "TC", "ET") and conventions.channels == (1, 0, 2)
    label = cases[0]["label"]
    masks = label_to_regions(label, ("TC", "WT", "ET"), convention)  # the model's channel order
    np.testing.assert_array_equal(conventions.targets(label), masks[..., [1, 0, 2]].astype(bool))
    np.testing.assert_array_equal(conventions.label_map(masks) > 0, label > 0)  # every tumour voxel painted
    # A predictor that gets only TC right: WT and ET Dice below 1, TC exactly 1.
    only_tc = masks.copy()
    only_tc[..., 1] = only_tc[..., 0]
    only_tc[..., 2] = 0
    result = evaluate_split(lambda image: only_tc, cases, conventions, split="validation", hd95=False)
    dice = result.cases[0].dice
    assert dice[1] == 1.0 and dice[0] < 1.0 and dice[2] == 0.0


def test_unlabelled_cases_are_counted_not_scored():
    rng = np.random.default_rng(2)
    cases = _cases(rng, n=2)
    cases[1]["has_label"] = np.bool_(False)
    conventions = SegmentationLabels.from_config(_config(kind="multiclass", num_classes=4))
    result = evaluate_split(lambda image: np.zeros(image.shape[:-1], np.uint8), cases, conventions,
                            split="validation", hd95=False)
    assert len(result.cases) == 1 and result.unlabelled == 1
