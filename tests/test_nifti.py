"""NIfTI reading, RAS reorientation, resampling, write-back in the original geometry, and bad files."""

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio

from medmae_jax.data import nifti, resample
from medmae_jax.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ANAT = DATA / "mri/nibabel/anatomical.nii"  # LAS, big-endian int16, 2 mm
FOUR_D = DATA / "mri/nibabel/example4d.nii.gz"
TS_CT = DATA / "ct/totalseg_small/example_ct_sm.nii.gz"  # RAS, 3 mm
TS_SEG = DATA / "ct/totalseg_small/example_seg.nii.gz"
SPLEEN = DATA / "ct/msd_spleen2_crop/sub-spleen2_ct.nii.gz"
SPLEEN_SEG = DATA / "ct/msd_spleen2_crop/sub-spleen2_ct_seg-manual.nii.gz"
BRATS_LABEL = DATA / "layouts/msd/Task01_BrainTumour/labelsTr/BRATS_001.nii.gz"  # LPS

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not present")


def _save(path, data, affine, like=None):
    img = nib.Nifti1Image(np.asarray(data), affine, header=None if like is None else nib.load(like).header.copy())
    img.header.set_data_dtype(np.asarray(data).dtype)
    nib.save(img, str(path))
    return path


def test_read_any_orientation_and_byte_order():
    data, affine = nifti.read_nifti(ANAT)
    raw = nib.load(str(ANAT))
    assert raw.get_data_dtype().byteorder == ">" and nib.aff2axcodes(raw.affine) == ("L", "A", "S")
    assert data.dtype == np.float32 and data.dtype.isnative and data.flags.c_contiguous
    assert np.array_equal(data, raw.get_fdata())
    ras, ras_affine = resample.reorient_to_ras(data, affine)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    assert np.array_equal(ras, data[::-1])  # LAS -> RAS flips the first axis only
    # every voxel keeps its world position
    ijk = np.array([3, 7, 11])
    flipped = np.array([data.shape[0] - 1 - 3, 7, 11])
    np.testing.assert_allclose(affine[:3, :3] @ ijk + affine[:3, 3], ras_affine[:3, :3] @ flipped + ras_affine[:3, 3])
    # a permuted, flipped (P, S, L) copy reorients back to the same RAS array
    perm = np.transpose(data, (1, 2, 0))[::-1]
    perm_affine = affine @ nio.inv_ornt_aff(np.array([[2, 1], [0, -1], [1, 1]], float), data.shape)
    tmp_ras, tmp_affine = resample.reorient_to_ras(np.ascontiguousarray(perm), perm_affine)
    assert np.array_equal(tmp_ras, ras) and np.allclose(tmp_affine, ras_affine)


def test_four_d_channels_last():
    data, _ = nifti.read_nifti(FOUR_D, channels=2)
    raw = np.asanyarray(nib.load(str(FOUR_D)).dataobj)
    assert data.shape == (128, 96, 24, 2) and np.array_equal(data, raw)
    assert nifti.read_nifti(FOUR_D, channels=0)[0].shape == (128, 96, 24, 2)
    assert nifti.read_nifti(ANAT, channels=1)[0].shape == (33, 41, 25, 1)
    with pytest.raises(DataError, match="2 channel"):
        nifti.read_nifti(FOUR_D, channels=4)


def test_spacing_grid_shape_and_extent():
    affine = nib.load(str(TS_CT)).affine
    grid_affine, shape = nifti.spacing_grid(affine, (122, 101, 30), (1.5, 1.5, 2.0))
    # first to last voxel centre: 121*3/1.5+1, 100*3/1.5+1, round(29*3/2+1) (half to even)
    assert shape == (243, 201, 44)
    np.testing.assert_allclose(nifti.voxel_spacing(grid_affine), (1.5, 1.5, 2.0))
    np.testing.assert_allclose(grid_affine[:3, 3], affine[:3, 3])  # same first voxel centre


def test_linear_resampling_preserves_a_linear_ramp():
    # trilinear interpolation is exact on an affine function of the world coordinates
    shape = (20, 16, 12)
    affine = np.diag([3.0, 2.5, 4.0, 1.0])
    affine[:3, 3] = (-10, 5, 2)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    ramp = (world @ np.array([0.3, -0.2, 0.1]) + 4.0).astype(np.float32)
    out_affine, out_shape = nifti.spacing_grid(affine, shape, (1.5, 1.0, 2.2))
    out = nifti.resample(ramp, affine, out_affine, out_shape, mode="linear")
    ijk2 = np.stack(np.meshgrid(*[np.arange(s) for s in out_shape], indexing="ij"), -1).astype(np.float64)
    world2 = ijk2 @ out_affine[:3, :3].T + out_affine[:3, 3]
    expected = world2 @ np.array([0.3, -0.2, 0.1]) + 4.0
    inside = np.all((world2 >= world.min((0, 1, 2))) & (world2 <= world.max((0, 1, 2))), -1)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-4)


@pytest.mark.parametrize(
    "path,pixdim,exact",
    [
        (TS_SEG, (1.5, 1.5, 2.0), False),  # RAS, upsampled in x, y and z
        (TS_SEG, (1.5, 1.5, 3.0), True),  # 3 mm -> 1.5 mm and back: nearest is lossless
        (ANAT, (2.0, 2.0, 2.0), True),  # LAS, big-endian, pure reorientation
        (SPLEEN_SEG, (1.5, 1.5, 2.0), False),
        (BRATS_LABEL, (1.0, 1.0, 1.0), True),  # LPS, no resampling
    ],
)
def test_round_trip_writes_the_input_geometry(tmp_path, path, pixdim, exact):
    original = nib.load(str(path))
    label, _ = nifti.read_label(path)
    case = nifti.load_case(path, path, pixdim=pixdim, channels=1)
    assert case.image.shape[:3] == case.label.shape == case.geometry.array_shape
    assert nib.aff2axcodes(case.geometry.array_affine) == ("R", "A", "S")
    # crop a margin off, as the builders do, and write back with and without the reference header
    start = tuple(min(2, s // 4) for s in case.label.shape)
    stop = tuple(s - b for s, b in zip(case.label.shape, start))
    geometry = case.geometry.with_crop(start, stop)
    cropped = case.label[tuple(slice(a, b) for a, b in zip(start, stop))]
    g2 = nifti.Geometry.from_features(geometry.to_features())
    assert g2.array_shape == cropped.shape and np.array_equal(g2.array_affine, geometry.array_affine)
    for ref in (path, None):
        out = tmp_path / f"pred_{ref is None}.nii.gz"
        nifti.write_nifti(out, cropped, g2, reference=ref)
        back = nib.load(str(out))
        assert back.shape == original.shape
        assert np.array_equal(back.affine, original.affine)
        data = np.asanyarray(back.dataobj)
        if exact:
            inner = nifti.to_original(np.ones(cropped.shape, np.uint8), g2).astype(bool)
            assert np.array_equal(data[inner], label[inner]) and not data[~inner].any()
        else:
            assert np.mean(data == label) > 0.9
    if exact and start == (0, 0, 0):
        assert np.array_equal(nifti.to_original(case.label, case.geometry), label)


def test_round_trip_of_a_permuted_flipped_file(tmp_path):
    """A file stored (S, R, P): Geometry must undo the permutation as well as the flips."""
    img = nib.load(str(TS_SEG))
    seg = np.asanyarray(img.dataobj)
    ornt = np.array([[1, 1], [2, -1], [0, 1]], float)  # file axis i goes to output axis ornt[i, 0]
    stored = np.ascontiguousarray(nio.apply_orientation(seg, ornt))
    affine = img.affine @ nio.inv_ornt_aff(ornt, seg.shape)
    path = _save(tmp_path / "permuted.nii.gz", stored, affine)
    assert nib.aff2axcodes(nib.load(str(path)).affine) == ("S", "R", "P")
    case = nifti.load_case(path, path, pixdim=(1.5, 1.5, 3.0))
    direct = nifti.load_case(TS_SEG, TS_SEG, pixdim=(1.5, 1.5, 3.0))
    assert np.array_equal(case.label, direct.label)  # same RAS grid whatever the storage order
    np.testing.assert_allclose(case.geometry.array_affine, direct.geometry.array_affine, atol=1e-4)
    out = tmp_path / "back.nii.gz"
    nifti.write_nifti(out, case.label, case.geometry, reference=path)
    back = nib.load(str(out))
    assert back.shape == stored.shape and np.array_equal(back.affine, nib.load(str(path)).affine)
    assert np.array_equal(np.asanyarray(back.dataobj), stored)


def test_round_trip_uncropped_is_identity_for_exact_factors():
    case = nifti.load_case(TS_CT, TS_SEG, pixdim=(1.5, 1.5, 1.5))
    label, _ = nifti.read_label(TS_SEG)
    assert np.array_equal(nifti.to_original(case.label, case.geometry), label)
    image, _ = nifti.read_nifti(TS_CT)
    back = nifti.to_original(case.image[..., 0], case.geometry, mode="linear")
    np.testing.assert_allclose(back, image, atol=1e-3)


# --------------------------------------------------------------------------------------------
# bad input


def test_missing_garbage_and_truncated_files(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        nifti.read_nifti(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(e.value)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(DataError) as e:
        nifti.read_nifti(garbage)
    assert e.value.path == str(garbage)
    truncated = tmp_path / "truncated.nii.gz"
    blob = SPLEEN.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated|corrupt|readable") as e:
        nifti.load_case(truncated, pixdim=(1.5, 1.5, 2.0))
    assert e.value.path == str(truncated)
    # a gzip stream whose NIfTI payload is short (valid gzip, too few voxels)
    short = tmp_path / "short.nii.gz"
    with gzip.open(str(short), "wb") as f:
        f.write(gzip.decompress(SPLEEN.read_bytes())[:10_000])
    with pytest.raises(DataError) as e:
        nifti.read_nifti(short)
    assert e.value.path == str(short)


def test_four_d_where_three_d_expected():
    with pytest.raises(DataError, match="4-D") as e:
        nifti.read_nifti(FOUR_D)
    assert e.value.path == str(FOUR_D)
    with pytest.raises(DataError, match="4-D"):
        nifti.load_case(TS_CT, FOUR_D)  # as a label


def test_image_label_mismatches(tmp_path):
    img = nib.load(str(TS_SEG))
    seg = np.asanyarray(img.dataobj)
    small = _save(tmp_path / "small.nii.gz", seg[:-1], img.affine)
    with pytest.raises(DataError, match="shape") as e:
        nifti.load_case(TS_CT, small)
    assert e.value.path == str(small)
    shifted_affine = img.affine.copy()
    shifted_affine[0, 3] += 1.5
    shifted = _save(tmp_path / "shifted.nii.gz", seg, shifted_affine)
    with pytest.raises(DataError, match="affine") as e:
        nifti.load_case(TS_CT, shifted)
    assert e.value.path == str(shifted)
    nudged_affine = img.affine.copy()
    nudged_affine[0, 3] += 1e-5  # within tolerance
    nifti.check_same_grid(TS_CT, seg.shape, img.affine, "x", seg.shape, nudged_affine)


def test_label_values_outside_declared_classes(tmp_path):
    img = nib.load(str(TS_SEG))
    with pytest.raises(DataError, match="outside the declared classes") as e:
        nifti.load_case(TS_CT, TS_SEG, num_classes=14)  # TotalSegmentator ids go up to 117
    assert e.value.path == str(TS_SEG) and "117" in str(e.value)
    seg = np.asanyarray(img.dataobj).astype(np.int16)
    seg[0, 0, 0] = -1
    neg = _save(tmp_path / "neg.nii.gz", seg, img.affine)
    with pytest.raises(DataError, match="-1"):
        nifti.read_label(neg, num_classes=200)
    brats_like = _save(tmp_path / "brats.nii.gz", np.array([0, 1, 2, 3] * 6, np.uint8).reshape(2, 3, 4), np.eye(4))
    with pytest.raises(DataError, match=r"\{3\}"):
        nifti.read_label(brats_like, values=(0, 1, 2, 4))
    frac = _save(tmp_path / "frac.nii.gz", np.full((2, 3, 4), 0.5, np.float32), np.eye(4))
    with pytest.raises(DataError, match="non-integer"):
        nifti.read_label(frac)


def test_non_finite_image_is_rejected(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    bad = _save(tmp_path / "nan.nii.gz", data, np.eye(4))
    with pytest.raises(DataError, match="NaN"):
        nifti.read_nifti(bad)
    assert os.path.exists(bad)
