"""Our NIfTI preprocessing against MONAI's on the same real files (torch/monai only for the check).

MONAI: LoadImaged + EnsureChannelFirstd + Orientationd("RAS") + Spacingd(pixdim, ("bilinear",
"nearest")) + ScaleIntensityRanged(-175, 250 -> 0, 1, clip). Ours: ``nifti.load_case`` +
``transforms.scale_intensity_range``; arrays are MONAI's (C, X, Y, Z) as (X, Y, Z, C).
"""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
import monai.transforms as mt  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from medmae_jax.data import nifti, transforms  # noqa: E402
from medmae_jax.data.datasets import msd_brain_tumour  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [pytest.mark.parity, pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")]

CT_CASES = [
    (DATA / "ct/totalseg_small/example_ct_sm.nii.gz", DATA / "ct/totalseg_small/example_seg.nii.gz"),
    (DATA / "ct/msd_spleen2_crop/sub-spleen2_ct.nii.gz", DATA / "ct/msd_spleen2_crop/sub-spleen2_ct_seg-manual.nii.gz"),
]


def _monai(image, label=None, pixdim=(1.5, 1.5, 2.0), window=True):
    keys = ["image"] + (["label"] if label is not None else [])
    steps = [mt.LoadImaged(keys), mt.EnsureChannelFirstd(keys), mt.Orientationd(keys, axcodes="RAS")]
    if pixdim is not None:
        steps.append(mt.Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest")[: len(keys)]))
    if window:
        steps.append(mt.ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True))
    d = {"image": str(image)}
    if label is not None:
        d["label"] = str(label)
    return mt.Compose(steps)(d)


def _channels_last(t):
    return np.moveaxis(t.numpy(), 0, -1)


@pytest.mark.parametrize("image,label", CT_CASES, ids=["totalseg", "spleen"])
def test_ct_preprocessing_matches_monai(image, label):
    ref = _monai(image, label)
    case = nifti.load_case(image, label, pixdim=(1.5, 1.5, 2.0))
    ours = transforms.scale_intensity_range(case.image, -175, 250, 0.0, 1.0, clip=True)
    ref_image, ref_label = _channels_last(ref["image"]), _channels_last(ref["label"])[..., 0]
    assert ours.shape == ref_image.shape and case.label.shape == ref_label.shape  # same shapes, exactly
    np.testing.assert_allclose(case.geometry.array_affine, ref["image"].affine.numpy(), atol=1e-6)
    assert np.mean(np.abs(ours - ref_image)) < 0.01
    assert np.max(np.abs(ours - ref_image)) < 1e-4
    present = np.unique(ref_label)[1:]
    assert len(present) >= 1
    for v in present:
        a, b = ref_label == v, case.label == v
        dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
        assert dice >= 0.99, f"label {v}: Dice {dice:.4f}"
    assert set(np.unique(case.label)) == set(np.unique(ref_label).astype(int))


def test_foreground_crop_matches_monai():
    image, label = CT_CASES[0]
    ref = _monai(image, label)
    cropped = mt.CropForegroundd(["image", "label"], source_key="image", allow_smaller=True)(ref)
    ours = _channels_last(ref["image"])
    start, stop = transforms.foreground_box(ours)
    assert tuple(b - a for a, b in zip(start, stop)) == tuple(cropped["image"].shape[1:])
    np.testing.assert_array_equal(transforms.crop(ours, start, stop), _channels_last(cropped["image"]))


@pytest.mark.parametrize("pixdim", [None, (1.5, 1.5, 2.0)])
def test_las_big_endian_reorients_like_monai(pixdim):
    path = DATA / "mri/nibabel/anatomical.nii"
    ref = _monai(path, pixdim=pixdim, window=False)
    case = nifti.load_case(path, pixdim=pixdim)
    ref_image = _channels_last(ref["image"])
    assert case.image.shape == ref_image.shape
    np.testing.assert_allclose(case.image, ref_image, atol=1e-3)
    np.testing.assert_allclose(case.geometry.array_affine, ref["image"].affine.numpy(), atol=1e-6)


def test_lps_msd_label_reorients_like_monai():
    path = DATA / "layouts/msd/Task01_BrainTumour/labelsTr/BRATS_001.nii.gz"
    ref = _monai(path, pixdim=(1.0, 1.0, 1.0), window=False)
    case = nifti.load_case(path, path, pixdim=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(case.label, _channels_last(ref["image"])[..., 0].astype(np.uint8))
    np.testing.assert_allclose(case.geometry.array_affine, ref["image"].affine.numpy(), atol=1e-6)


def test_oblique_affine_matches_monai():
    """A rotated (non axis-aligned) grid exercises the general resampling path."""
    import nibabel as nib

    image, label = CT_CASES[1]
    img, seg = nib.load(str(image)), nib.load(str(label))
    a = np.deg2rad(12.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    affine = rot @ img.affine
    vol = np.asanyarray(img.dataobj)[::2, ::2].astype(np.float32)
    lab = np.asanyarray(seg.dataobj)[::2, ::2]
    affine[:3, :2] *= 2
    img_t = MetaTensor(torch.as_tensor(vol)[None], affine=torch.as_tensor(affine))
    lab_t = MetaTensor(torch.as_tensor(lab.astype(np.float32))[None], affine=torch.as_tensor(affine))
    ref_img = mt.Spacing(pixdim=(1.5, 1.5, 2.0), mode="bilinear")(img_t)
    ref_lab = mt.Spacing(pixdim=(1.5, 1.5, 2.0), mode="nearest")(lab_t)
    out_affine, out_shape = nifti.spacing_grid(affine, vol.shape, (1.5, 1.5, 2.0))
    assert out_shape == tuple(ref_img.shape[1:])
    np.testing.assert_allclose(out_affine, ref_img.affine.numpy(), atol=1e-6)
    ours = nifti.resample(vol, affine, out_affine, out_shape, mode="linear")
    ours_lab = nifti.resample(lab, affine, out_affine, out_shape, mode="nearest")
    scale = np.ptp(vol)
    assert np.mean(np.abs(ours - ref_img[0].numpy())) / scale < 1e-4
    a, b = ours_lab == 1, ref_lab[0].numpy() == 1
    assert 2 * np.sum(a & b) / (a.sum() + b.sum()) >= 0.99


def test_zscore_matches_monai_normalize_intensity():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, size=(24, 20, 16, 3)).astype(np.float32)
    x[rng.random(x.shape[:3]) < 0.5] = 0
    ref = mt.NormalizeIntensity(nonzero=True, channel_wise=True)(torch.as_tensor(np.moveaxis(x, -1, 0).copy()))
    np.testing.assert_allclose(transforms.normalize_nonzero(x), np.moveaxis(np.asarray(ref), 0, -1), atol=1e-5)


def test_crop_centre_correction_matches_monai():
    from monai.transforms.utils import correct_crop_centers

    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = rng.integers(8, 40, 3)
        roi = np.minimum(rng.integers(1, 40, 3), shape)
        centre = rng.integers(0, shape)
        ref = [int(c) for c in correct_crop_centers(centre.tolist(), roi.tolist(), shape.tolist())]
        assert transforms.valid_center(centre, roi, shape).tolist() == ref


def test_folds_match_monai_cross_validation_partition():
    from monai.data import partition_dataset

    n = 484
    parts = partition_dataset(list(range(n)), num_partitions=5, shuffle=True, seed=12345)
    folds = msd_brain_tumour.fold_assignment(n, 5, 12345)
    for k, part in enumerate(parts):
        assert sorted(np.flatnonzero(folds == k).tolist()) == sorted(part)
