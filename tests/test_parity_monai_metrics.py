"""Dice, HD95, region masks and sliding-window inference against MONAI on the same inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from scipy import ndimage  # noqa: E402

from medmae_jax.evaluate import metrics as M  # noqa: E402
from medmae_jax.evaluate.sliding_window import sliding_window_inference, window_plan  # noqa: E402

pytestmark = pytest.mark.parity

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CT_SEG = DATA / "ct" / "totalseg_small" / "example_seg.nii.gz"
MSD_LABEL = DATA / "layouts" / "msd" / "Task01_BrainTumour" / "labelsTr" / "BRATS_001.nii.gz"
BRATS_LABEL = DATA / "mri" / "brats2015_pat0001" / "OTMultiClass.nii.gz"


def _load(path: Path) -> np.ndarray:
    nib = pytest.importorskip("nibabel")
    if not path.exists():
        pytest.skip(f"test data not found: {path}")
    return np.asarray(nib.load(str(path)).dataobj)


def _one_hot(x: np.ndarray, k: int):
    """(*spatial) labels -> MONAI's (1, K, *spatial) float one-hot."""
    t = torch.nn.functional.one_hot(torch.from_numpy(x.astype(np.int64)), k)
    return t.movedim(-1, 0)[None].float()


@pytest.fixture(scope="module")
def ct_pair():
    """Real organ map (10 of its organs, renumbered 1..10, plus an absent class 11) and a perturbed copy."""
    seg = _load(CT_SEG)
    present = [v for v in np.unique(seg) if v != 0]
    keep = present[:: max(len(present) // 10, 1)][:10]
    target = np.zeros(seg.shape, np.uint8)
    for i, v in enumerate(keep, start=1):
        target[seg == v] = i
    pred = np.roll(target, 1, axis=0)             # everything shifted by one voxel
    for c in (2, 5):                               # two organs eroded
        m = pred == c
        pred[m & ~ndimage.binary_erosion(m, iterations=2)] = 0
    pred[ndimage.binary_dilation(pred == 3)] = 3   # one dilated
    pred[pred == 7] = 0                            # one organ missed entirely
    pred[2:6, 3:8, 1:4] = 11                       # a false-positive blob of a class absent from the truth
    return pred, target, 12                        # classes 0..11


def test_dice_matches_monai(ct_pair):
    from monai.metrics import compute_dice

    pred, target, k = ct_pair
    for ignore_empty in (True, False):
        ref = compute_dice(_one_hot(pred, k), _one_hot(target, k), include_background=False,
                           ignore_empty=ignore_empty)[0].numpy()
        ours = M.dice_per_class(pred, target, num_classes=k, ignore_empty=ignore_empty)
        ours_oh = M.dice_per_class(np.eye(k, dtype=bool)[pred], np.eye(k, dtype=bool)[target], one_hot=True,
                                   ignore_empty=ignore_empty)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
        np.testing.assert_allclose(ours, ref, atol=1e-4, equal_nan=True)
        np.testing.assert_allclose(ours_oh, ref, atol=1e-4, equal_nan=True)
        # class 11 is absent from the truth: undefined (NaN) or, without ignore_empty, 0 (false positives)
        assert (np.isnan(ours[-1]) if ignore_empty else ours[-1] == 0.0)


def test_hd95_matches_monai_in_voxels_and_mm(ct_pair):
    from monai.metrics import compute_hausdorff_distance

    pred, target, k = ct_pair
    spacing = (3.0, 2.0, 1.5)  # anisotropic on purpose: mm must differ from voxels axis by axis
    res = M.segmentation_metrics(pred, target, num_classes=k, spacing=spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about the empty classes
        ref_vox = compute_hausdorff_distance(_one_hot(pred, k), _one_hot(target, k), percentile=95)[0].numpy()
        ref_mm = compute_hausdorff_distance(_one_hot(pred, k), _one_hot(target, k), percentile=95,
                                            spacing=spacing)[0].numpy()
        ref_max = compute_hausdorff_distance(_one_hot(pred, k), _one_hot(target, k))[0].numpy()
    for ours, ref in ((res.hd95, ref_vox), (res.hd95_mm, ref_mm),
                      (M.hausdorff_distance(pred, target, num_classes=k, percentile=None), ref_max),
                      (M.hausdorff_distance(np.eye(k, dtype=bool)[pred], np.eye(k, dtype=bool)[target],
                                            one_hot=True, spacing=spacing), ref_mm)):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        ok = np.isfinite(ref)
        np.testing.assert_allclose(ours[ok], ref[ok], atol=1e-4, rtol=1e-6)
    assert np.isfinite(res.hd95).sum() >= 8 and np.nanmax(res.hd95) > 1.0


def test_regions_match_monai_brats_convention():
    """BraTS-file regions equal MONAI's ConvertToMultiChannelBasedOnBratsClasses (order TC, WT, ET)."""
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    lab = _load(BRATS_LABEL)[40:200, 40:200, 30:130]
    ref = ConvertToMultiChannelBasedOnBratsClasses(et_label=4)(lab)
    ours = M.region_masks(lab, "brats", regions=("TC", "WT", "ET"))
    np.testing.assert_array_equal(np.moveaxis(ours, -1, 0), ref)
    assert ours.any(axis=tuple(range(3))).all()


def test_region_metrics_match_monai_on_msd_labels():
    from monai.metrics import compute_dice, compute_hausdorff_distance

    target = _load(MSD_LABEL)[50:120, 45:125, 50:120]
    pred = np.roll(target, (1, -1, 0), axis=(0, 1, 2))
    pred[pred == 3] = np.where(ndimage.binary_erosion(pred == 3), 3, 2)[pred == 3]
    for conv, et in (("msd", 3), ("monai_tutorial", 2)):
        res = M.region_metrics(pred, target, conv, spacing=(1.0, 1.0, 1.0))
        masks = lambda x: np.stack([np.isin(x, [1, 2, 3]), np.isin(x, [2, 3]), x == et])  # noqa: E731
        p, t = torch.from_numpy(masks(pred))[None].float(), torch.from_numpy(masks(target))[None].float()
        np.testing.assert_allclose(res.dice, compute_dice(p, t, include_background=True)[0].numpy(), atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's own deprecation notice from get_mask_edges
            ref = compute_hausdorff_distance(p, t, include_background=True, percentile=95)[0].numpy()
        np.testing.assert_allclose(res.hd95, ref, atol=1e-4)
        assert np.isfinite(res.hd95).all() and (res.dice > 0.5).all()


# ---------------------------------------------------------------- sliding window

_RNG = np.random.default_rng(0)
_K3 = _RNG.normal(size=(3, 3, 3, 2, 3)).astype(np.float32) * 0.3   # (kD, kH, kW, Cin, Cout)
_K2 = _RNG.normal(size=(3, 3, 2, 3)).astype(np.float32) * 0.3


def _jax_predictor(kernel):
    """Zero-padded 3x3(x3) conv + tanh + a running sum along the first axis: output depends on the window's place."""
    nd = kernel.ndim - 2
    dn = ("NDHWC", "DHWIO", "NDHWC") if nd == 3 else ("NHWC", "HWIO", "NHWC")

    def f(x):
        y = lax.conv_general_dilated(x, jnp.asarray(kernel), (1,) * nd, "SAME", dimension_numbers=dn)
        return jnp.tanh(y) + jnp.cumsum(x[..., :1], axis=1) * 0.1
    return f


def _torch_predictor(kernel):
    nd = kernel.ndim - 2
    w = torch.from_numpy(np.ascontiguousarray(np.moveaxis(kernel, (-1, -2), (0, 1))))
    conv = torch.nn.functional.conv3d if nd == 3 else torch.nn.functional.conv2d

    def f(x):  # x (N, C, *spatial)
        return torch.tanh(conv(x, w, padding=1)) + torch.cumsum(x[:, :1], dim=2) * 0.1
    return f


@pytest.mark.parametrize("shape,roi", [
    ((2, 37, 29, 19), (16, 12, 8)),   # not divisible by the roi; two volumes (window batches span both)
    ((1, 10, 7, 5), (16, 12, 8)),     # smaller than the roi on every axis (padding)
    ((1, 10, 30, 6), (16, 12, 6)),    # smaller on one axis, equal on another
    ((1, 41, 33), (16, 16)),          # 2-D
])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_sliding_window_matches_monai(shape, roi, mode, overlap):
    from monai.inferers import sliding_window_inference as monai_swi

    kernel = _K3 if len(roi) == 3 else _K2
    x = _RNG.normal(size=shape + (2,)).astype(np.float32)
    ours = np.asarray(sliding_window_inference(x, _jax_predictor(kernel), roi, sw_batch_size=3, overlap=overlap,
                                               mode=mode, cval=0.5))
    with torch.no_grad():
        ref = monai_swi(torch.from_numpy(np.moveaxis(x, -1, 1).copy()), roi, 3, _torch_predictor(kernel),
                        overlap=overlap, mode=mode, cval=0.5).numpy()
    np.testing.assert_allclose(ours, np.moveaxis(ref, 1, -1), atol=1e-5, rtol=1e-5)


def test_window_positions_and_gaussian_map_match_monai():
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for image, roi, ov in [((37, 29, 19), (16, 12, 8), 0.25), ((96, 96, 40), (96, 96, 96), 0.5),
                           ((512, 512, 200), (96, 96, 96), 0.5), ((41, 33), (16, 16), 0.7)]:
        plan = window_plan(image, roi, ov)
        padded = tuple(max(a, b) for a, b in zip(image, roi))
        slices = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, len(roi), (ov,) * len(roi)))
        np.testing.assert_array_equal(plan.starts, [[s.start for s in sl] for sl in slices])
    for roi, sigma in (((16, 12, 8), 0.125), ((96, 96, 96), 0.125), ((20, 9), (0.25, 0.1))):
        from medmae_jax.evaluate.sliding_window import importance_map
        ref = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma).numpy()
        np.testing.assert_allclose(importance_map(roi, "gaussian", sigma), ref, rtol=1e-6)
