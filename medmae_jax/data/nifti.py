"""NIfTI volumes in and out: read, reorient to RAS, resample to a target spacing, write back.

Array convention (the whole project): channels-last, spatial axes in the voxel order of the
RAS-reoriented file. A volume is ``(X, Y, Z)`` (a label map) or ``(X, Y, Z, C)`` (an image, C = 1
for CT, 4 for MSD MRI); after :func:`reorient_to_ras` a growing index along axes 0, 1, 2 moves
towards the patient's Right, Anterior and Superior. This is MONAI's channel-first
``(C, H, W, D)`` transposed to ``(H, W, D, C)``; models call these axes ``(D, H, W, C)``, but no
axis is ever swapped, so MONAI-trained weights and our arrays see the same voxel order.

Resampling follows MONAI ``Orientationd(axcodes="RAS")`` + ``Spacingd(pixdim, diagonal=False,
mode=("bilinear", "nearest"), padding_mode="border", align_corners=False)``: same output shape, same
output affine, output voxel ``j`` samples input voxel coordinate ``inv(A_in) @ A_out @ j``; linear
interpolation for images, round-half-to-even nearest for labels, edge values outside the grid.

:class:`Geometry` records where an array came from (file affine and shape, target spacing, crop
box) so that :func:`to_original` / :func:`write_nifti` put a prediction back on the file's own grid
with exactly its shape and affine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence, Union

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from medmae_jax.data.resample import (
    AFFINE_TOL,
    MAX_GRID_VOXELS,
    RAS,
    ras_ornt,
    reorient,
    resample,
    spacing_grid,
    voxel_spacing,
)
from medmae_jax.errors import DataError

PathLike = Union[str, os.PathLike]



# --------------------------------------------------------------------------------------------
# reading


def _load_image(path: PathLike) -> nib.Nifti1Image:
    """Opens a NIfTI file, turning every failure into a DataError that names the file."""
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    try:
        img = nib.load(os.fspath(path))
    except Exception as e:  # nibabel raises many kinds (ImageFileError, EOFError, zlib.error...)
        raise DataError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"expected a NIfTI image, got {type(img).__name__}")
    return img


def _read_data(img, path: PathLike) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError, ValueError ...
        raise DataError(path, f"cannot read the voxel data, file truncated or corrupt ({type(e).__name__}: {e})") from e
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


def _spatial_and_channels(shape: Sequence[int], path: PathLike, channels) -> tuple[tuple[int, ...], int]:
    """Splits a file shape into 3 spatial dims and a channel count, or raises naming the file."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise DataError(path, f"{len(shape)}-D file of shape {shape}; expected a 3-D volume")
    extra = shape[3:]
    # NIfTI stores vector images as 5-D (X, Y, Z, 1, C); squeeze singleton non-spatial dims.
    extra = tuple(s for s in extra if s != 1)
    if len(extra) > 1:
        raise DataError(path, f"{len(shape)}-D file of shape {shape}; expected a 3-D volume or (X, Y, Z, C)")
    n = extra[0] if extra else 1
    if channels is None and n != 1:
        raise DataError(path, f"4-D file of shape {shape} where a 3-D volume is expected")
    if isinstance(channels, int) and channels > 0 and n != channels:
        raise DataError(path, f"file of shape {shape} has {n} channel(s); expected {channels}")
    return shape[:3], n


def read_nifti(path: PathLike, *, channels: Optional[int] = None, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Reads a NIfTI file as ``(data, affine)`` in the file's own voxel order (no reorientation).

    ``channels=None``: a 3-D volume is expected and ``data`` is ``(X, Y, Z)``; a 4-D file with more
    than one volume is a DataError. ``channels=k > 0``: ``data`` is ``(X, Y, Z, k)`` and the file must
    hold k volumes (a 3-D file counts as one). ``channels=0``: any number, ``(X, Y, Z, C)``.
    ``dtype=None`` keeps the stored type (after scaling), in native byte order.
    """
    img = _load_image(path)
    spatial, n = _spatial_and_channels(img.shape, path, channels)
    data = _read_data(img, path)
    data = data.reshape(spatial + ((n,) if channels is not None else ()), order="F" if data.flags.f_contiguous else "C")
    # NIfTI data is column-major; one copy gives a C-ordered array of the wanted dtype.
    data = np.asarray(data, dtype=dtype if dtype is not None else data.dtype, order="C")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(path, "contains NaN or infinite voxel values")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, f"affine is not invertible:\n{affine}")
    return data, affine


def read_label(path: PathLike, num_classes: Optional[int] = None, *, values: Optional[Sequence[int]] = None):
    """Reads a 3-D integer label map as ``(uint8 or int32 data, affine)``, checking its values.

    Allowed values are ``0..num_classes-1`` or exactly ``values``; anything else (and any
    non-integer value) is a DataError that lists the offending values.
    """
    data, affine = read_nifti(path, channels=None, dtype=None)
    if data.dtype.kind == "f":
        if not np.all(data == np.round(data)):
            raise DataError(path, "label map has non-integer values")
    if data.dtype.kind not in "iu" or data.dtype.itemsize > 4:
        data = data.astype(np.int64)
    allowed = None
    if values is not None:
        allowed = np.asarray(sorted(set(int(v) for v in values)))
    elif num_classes is not None:
        allowed = np.arange(int(num_classes))
    if allowed is not None:
        lo, hi = int(data.min()), int(data.max())
        bad = []
        if lo < 0 or hi > allowed.max():
            bad = np.unique(data[(data < 0) | (data > allowed.max())]).tolist()
        else:
            present = np.flatnonzero(np.bincount(data.reshape(-1).astype(np.int64), minlength=hi + 1))
            bad = sorted(set(present.tolist()) - set(allowed.tolist()))
        if bad:
            more = f", ... ({len(bad)} values up to {bad[-1]})" if len(bad) > 10 else ""
            shown = ", ".join(str(v) for v in bad[:10]) + more
            raise DataError(path, f"label values {{{shown}}} outside the declared classes {allowed.tolist()}")
        out_dtype = np.uint8 if allowed.max() < 256 and allowed.min() >= 0 else np.int32
    else:
        out_dtype = np.uint8 if data.min() >= 0 and data.max() < 256 else np.int32
    return data.astype(out_dtype), affine


# --------------------------------------------------------------------------------------------
# the geometry record


def _as_int_tuple(x) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(x).reshape(-1))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a preprocessed array came from: the file's grid, the target spacing and a crop box.

    The array is the file reoriented to RAS, resampled to ``pixdim`` (None: not resampled) and
    cropped to ``[crop_start, crop_stop)`` on that grid (None: not cropped).
    """

    affine: np.ndarray  # (4, 4) the file's own affine
    shape: tuple[int, int, int]  # the file's spatial shape
    pixdim: Optional[tuple[float, float, float]] = None
    crop_start: Optional[tuple[int, int, int]] = None
    crop_stop: Optional[tuple[int, int, int]] = None

    def __post_init__(self):
        object.__setattr__(self, "affine", np.asarray(self.affine, np.float64).reshape(4, 4))
        object.__setattr__(self, "shape", _as_int_tuple(self.shape))
        if self.pixdim is not None:
            object.__setattr__(self, "pixdim", tuple(float(v) for v in np.asarray(self.pixdim).reshape(-1)))
        if (self.crop_start is None) != (self.crop_stop is None):
            raise ValueError("crop_start and crop_stop go together")
        if self.crop_start is not None:
            object.__setattr__(self, "crop_start", _as_int_tuple(self.crop_start))
            object.__setattr__(self, "crop_stop", _as_int_tuple(self.crop_stop))

    @property
    def spacing(self) -> np.ndarray:
        """The file's voxel sizes in mm, in the file's axis order."""
        return voxel_spacing(self.affine)

    @property
    def ornt(self) -> np.ndarray:
        return ras_ornt(self.affine)

    @property
    def ras_affine(self) -> np.ndarray:
        return self.affine @ nio.inv_ornt_aff(self.ornt, self.shape)

    @property
    def ras_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[int(a)] for a in np.argsort(self.ornt[:, 0]))

    @property
    def grid_affine(self) -> np.ndarray:
        """Affine of the resampled (uncropped) grid."""
        if self.pixdim is None:
            return self.ras_affine
        return spacing_grid(self.ras_affine, self.ras_shape, self.pixdim)[0]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        if self.pixdim is None:
            return self.ras_shape
        return spacing_grid(self.ras_affine, self.ras_shape, self.pixdim)[1]

    @property
    def array_affine(self) -> np.ndarray:
        """Affine of the preprocessed array itself (grid shifted by the crop start)."""
        a = self.grid_affine.copy()
        if self.crop_start is not None:
            a[:3, 3] += a[:3, :3] @ np.asarray(self.crop_start, np.float64)
        return a

    @property
    def array_shape(self) -> tuple[int, ...]:
        if self.crop_start is None:
            return self.grid_shape
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop))

    def with_crop(self, start: Sequence[int], stop: Sequence[int]) -> "Geometry":
        """This geometry after cropping the current array to ``[start, stop)``."""
        start, stop = np.asarray(start, int), np.asarray(stop, int)
        base = np.zeros(3, int) if self.crop_start is None else np.asarray(self.crop_start)
        shape = np.asarray(self.array_shape)
        if np.any(start < 0) or np.any(stop > shape) or np.any(stop < start):
            raise ValueError(f"crop [{start.tolist()}, {stop.tolist()}) outside the array of shape {shape.tolist()}")
        return dataclasses.replace(self, crop_start=tuple(base + start), crop_stop=tuple(base + stop))

    def to_features(self) -> dict[str, np.ndarray]:
        """Fixed-shape arrays for a data set example (see :meth:`from_features`)."""
        crop_start = (0, 0, 0) if self.crop_start is None else self.crop_start
        crop_stop = self.grid_shape if self.crop_stop is None else self.crop_stop
        return {
            "original_affine": self.affine.astype(np.float64),
            "original_shape": np.asarray(self.shape, np.int32),
            "original_spacing": self.spacing.astype(np.float32),
            "pixdim": np.asarray(self.pixdim if self.pixdim is not None else (0.0, 0.0, 0.0), np.float32),
            "crop_box": np.asarray([crop_start, crop_stop], np.int32),
        }

    @classmethod
    def from_features(cls, ex: Mapping[str, np.ndarray]) -> "Geometry":
        """Inverse of :meth:`to_features` (extra keys in ``ex`` are ignored)."""
        pixdim = np.asarray(ex["pixdim"], np.float64)
        box = np.asarray(ex["crop_box"]).reshape(2, 3)
        return cls(
            affine=np.asarray(ex["original_affine"], np.float64),
            shape=_as_int_tuple(ex["original_shape"]),
            pixdim=None if np.all(pixdim == 0) else tuple(pixdim),
            crop_start=tuple(box[0]),
            crop_stop=tuple(box[1]),
        )


# --------------------------------------------------------------------------------------------
# cases: image (+ label) preprocessed together


@dataclasses.dataclass
class Case:
    """A preprocessed case: ``image`` (X, Y, Z, C) float32, ``label`` (X, Y, Z) or None, and its geometry."""

    image: np.ndarray
    label: Optional[np.ndarray]
    geometry: Geometry


def check_same_grid(image_path, image_shape, image_affine, label_path, label_shape, label_affine,
                    atol: float = AFFINE_TOL):
    """Raises a DataError naming ``label_path`` if its grid differs from the image's."""
    if tuple(label_shape[:3]) != tuple(image_shape[:3]):
        raise DataError(label_path, f"label shape {tuple(label_shape)} does not match image shape "
                                    f"{tuple(image_shape[:3])} of {image_path}")
    diff = np.max(np.abs(np.asarray(label_affine) - np.asarray(image_affine)))
    if diff > atol:
        raise DataError(
            label_path,
            f"label affine differs from the affine of {image_path} by up to {diff:.4g} (tolerance {atol}):\n"
            f"label:\n{np.asarray(label_affine)}\nimage:\n{np.asarray(image_affine)}",
        )


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_grid_size(path: PathLike, shape: Sequence[int], spacing: Sequence[float], grid_shape: Sequence[int],
                    pixdim: Sequence[float], channels: int = 1) -> None:
    """A DataError naming the file, both sizes and the reason when resampling would need an unreasonable grid.

    The estimate is what :func:`resample` holds at once: float64 sample coordinates and values per voxel.
    """
    voxels = int(np.prod([int(s) for s in grid_shape], dtype=np.float64))
    need = voxels * 8 * (3 + max(int(channels), 1))
    memory = _memory_bytes()
    reason = None
    if voxels > MAX_GRID_VOXELS:
        reason = f"over the limit of {MAX_GRID_VOXELS:,} voxels"
    elif memory is not None and need > memory:
        reason = f"more than this machine's {memory / 2 ** 30:.1f} GiB of memory"
    if reason:
        spacing_mm = "x".join(f"{float(x):.4g}" for x in spacing)
        pixdim_mm = "x".join(f"{float(x):.4g}" for x in pixdim)
        raise DataError(path, f"resampling {tuple(int(s) for s in shape)} voxels of {spacing_mm} mm to {pixdim_mm} mm "
                              f"gives a {tuple(int(s) for s in grid_shape)} grid ({voxels:,} voxels, "
                              f"~{need / 2 ** 30:.3g} GiB), {reason}; check the voxel size in the file's header")


def load_case(
    image_path: PathLike,
    label_path: Optional[PathLike] = None,
    *,
    pixdim: Optional[Sequence[float]] = None,
    channels: int = 1,
    num_classes: Optional[int] = None,
    label_values: Optional[Sequence[int]] = None,
    affine_atol: float = AFFINE_TOL,
) -> Case:
    """Reads an image (and label), checks they share a grid, reorients to RAS, resamples to ``pixdim``.

    ``channels``: the number of volumes the image file must hold (0: any); the image comes back
    ``(X, Y, Z, C)`` float32 (linear resampling), the label ``(X, Y, Z)`` uint8 (nearest).
    """
    image, affine = read_nifti(image_path, channels=channels, dtype=np.float32)
    label = None
    if label_path is not None:
        label, label_affine = read_label(label_path, num_classes, values=label_values)
        check_same_grid(image_path, image.shape, affine, label_path, label.shape, label_affine, affine_atol)
    geometry = Geometry(affine=affine, shape=image.shape[:3], pixdim=None if pixdim is None else tuple(pixdim))
    ornt = geometry.ornt
    image, ras_affine = reorient(image, affine, ornt)
    if label is not None:
        label, _ = reorient(label, affine, ornt)
    if pixdim is not None:
        grid_affine, grid_shape = spacing_grid(ras_affine, image.shape[:3], pixdim)
        check_grid_size(image_path, image.shape[:3], voxel_spacing(ras_affine), grid_shape, pixdim,
                        image.shape[3] if image.ndim == 4 else 1)
        image = resample(image, ras_affine, grid_affine, grid_shape, mode="linear")
        if label is not None:
            label = resample(label, ras_affine, grid_affine, grid_shape, mode="nearest")
    return Case(image=np.ascontiguousarray(image, np.float32), label=label, geometry=geometry)


# --------------------------------------------------------------------------------------------
# back to the file's grid


def to_original(array: np.ndarray, geometry: Geometry, *, mode: str = "nearest", fill=0) -> np.ndarray:
    """Puts an array on the preprocessed grid (spatial axes first) back on the file's own voxel grid.

    Undoes the crop (outside filled with ``fill``), the resampling (``mode``: "nearest" for labels,
    "linear" for probabilities) and the reorientation; the result has the file's spatial shape.
    """
    array = np.asarray(array)
    if tuple(array.shape[:3]) != tuple(geometry.array_shape):
        raise ValueError(f"array of shape {array.shape} does not match the preprocessed shape {geometry.array_shape}")
    trailing = array.shape[3:]
    if geometry.crop_start is not None:
        full = np.full(tuple(geometry.grid_shape) + trailing, fill, dtype=array.dtype)
        sl = tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop))
        full[sl] = array
        array = full
    if geometry.pixdim is not None:
        array = resample(array, geometry.grid_affine, geometry.ras_affine, geometry.ras_shape, mode=mode,
                         dtype=None if mode == "nearest" else np.float32)
    inverse = nio.ornt_transform(RAS, nio.io_orientation(geometry.affine))
    out = np.ascontiguousarray(nio.apply_orientation(array, inverse))
    assert out.shape[:3] == tuple(geometry.shape), (out.shape, geometry.shape)
    return out


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_output_path(path: PathLike) -> None:
    """Before any work: ``path`` is a ``.nii``/``.nii.gz`` name, not a folder, in a folder that is or can be made
    writable (the nearest existing ancestor); else a DataError naming it."""
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(NIFTI_SUFFIXES):
        raise DataError(path, "the output must be named .nii or .nii.gz")
    if os.path.isdir(path):
        raise DataError(path, "the output is an existing folder; name a .nii.gz file")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DataError(path, f"cannot write here: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(path, f"cannot write here: no write permission in {parent}")


def write_nifti(
    path: PathLike,
    array: np.ndarray,
    geometry: Geometry,
    *,
    mode: str = "nearest",
    dtype=None,
    reference: Optional[PathLike] = None,
) -> np.ndarray:
    """Writes a preprocessed-grid array (e.g. a predicted label map) in the file's own geometry.

    The written file has exactly the original spatial shape and affine; with ``reference`` (the
    original file) its header (qform/sform codes, units, description) is copied as well.
    ``dtype`` converts before writing (None keeps the array's). Returns the array as written.
    """
    out = to_original(array, geometry, mode=mode)
    if dtype is not None:
        out = out.astype(dtype)
    if reference is not None:
        ref = _load_image(reference)
        header = ref.header.copy()
        header.set_data_shape(out.shape)
        header.set_data_dtype(out.dtype)
        header.set_slope_inter(1.0, 0.0)
        # affine=None keeps the reference header's own sform/qform, so the affine is bit-identical.
        img = type(ref)(out, None, header=header)
    else:
        img = nib.Nifti1Image(out, geometry.affine)
        img.header.set_data_dtype(out.dtype)
    try:
        nib.save(img, os.fspath(path))
    except Exception as e:
        raise DataError(path, f"cannot write NIfTI ({type(e).__name__}: {e})") from e
    return out
