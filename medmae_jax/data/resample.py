"""Orientation and spacing as pure functions of an affine and a shape: RAS reorientation, the MONAI ``Spacingd``
output grid, and resampling onto it (linear for images, round-half-to-even nearest for labels, edge values outside).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
from nibabel import orientations as nio

AFFINE_TOL = 1e-3  # MONAI's tolerance for "this resampling changes nothing"
# Resampled grids above this many voxels are refused before anything is allocated: a wrong voxel size in a header
# (1000 mm instead of 1 mm) would otherwise ask numpy for hundreds of GiB.
MAX_GRID_VOXELS = 2 ** 30
RAS = nio.axcodes2ornt("RAS")


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (column norms of the 3x3 part) in millimetres."""
    return np.sqrt(np.sum(np.asarray(affine, np.float64)[:3, :3] ** 2, axis=0))


def ras_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform taking the file's voxel axes to RAS (as MONAI Orientationd)."""
    return nio.ornt_transform(nio.io_orientation(np.asarray(affine, np.float64)), RAS)


def reorient(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Applies an orientation transform to the first 3 axes (trailing channel axes ride along)."""
    shape = data.shape[:3]
    if np.array_equal(ornt, RAS):
        return data, np.asarray(affine, np.float64).copy()
    out = nio.apply_orientation(data, ornt)
    new_affine = np.asarray(affine, np.float64) @ nio.inv_ornt_aff(ornt, shape)
    return np.ascontiguousarray(out), new_affine


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flips/permutes voxel axes so they run towards R, A, S; returns ``(data, affine)``."""
    return reorient(data, affine, ras_ornt(affine))


def _rotation_of(affine: np.ndarray) -> np.ndarray:
    """The orthogonal factor Q of the 3x3 part = Q @ R (R upper triangular, positive diagonal)."""
    q, r = np.linalg.qr(np.asarray(affine, np.float64)[:3, :3])
    return q * np.sign(np.diag(r))[None, :]


def spacing_grid(affine: np.ndarray, shape: Sequence[int],
                 pixdim: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the grid that MONAI ``Spacing(pixdim)`` resamples ``(affine, shape)`` to.

    Axis directions are kept (shear dropped), voxel sizes become ``pixdim``; the grid spans the
    input's first to last voxel centre (shape = round(extent / pixdim) + 1, rounding half to even)
    and starts at the input corner that is lowest on every output axis, else is centred.
    """
    affine = np.asarray(affine, np.float64)
    shape = np.asarray(shape, np.float64)
    pixdim = np.asarray(pixdim, np.float64)
    if pixdim.shape != (3,) or np.any(pixdim <= 0):
        raise ValueError(f"pixdim must be 3 positive numbers, got {pixdim.tolist()}")
    out = np.eye(4)
    out[:3, :3] = _rotation_of(affine) * pixdim[None, :]
    # The 8 corners (voxel centres) of the input grid, in world and in output-index coordinates.
    corners = np.stack(np.meshgrid(*[[0.0, s - 1.0] for s in shape], indexing="ij"), 0).reshape(3, -1)
    corners = np.concatenate([corners, np.ones((1, corners.shape[1]))])
    world = affine @ corners
    in_out = np.linalg.solve(out, world)[:3]
    out_shape = np.round(np.ptp(in_out, axis=1) + 1.0)
    offset = None
    for i in range(in_out.shape[1]):
        if np.allclose(np.min(in_out - in_out[:, i : i + 1], axis=1), 0.0):
            offset = world[:3, i]
            break
    if offset is None:
        offset = affine[:3, :3] @ (shape / 2.0) + affine[:3, 3] - out[:3, :3] @ (out_shape / 2.0)
    out[:3, 3] = offset
    return out, tuple(int(s) for s in out_shape)


def _fma(a: float, b: float, c: float) -> float:
    """a * b + c with one rounding (as the vectorised CPU kernels of torch compute it)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def _torch_linspace(n: int) -> np.ndarray:
    """torch.linspace(-1, 1, n) in float64, bit for bit (halves computed from either end with FMA)."""
    if n == 1:
        return np.array([-1.0])
    step = 2.0 / (n - 1)
    return np.array([_fma(k, step, -1.0) if k < n // 2 else _fma(-(n - 1 - k), step, 1.0) for k in range(n)])


def _grid_norm(shape: Sequence[int]) -> np.ndarray:
    """Voxel index -> grid_sample's normalised [-1, 1] coordinate (align_corners=False)."""
    shape = np.asarray(shape, np.float64)
    m = np.diag(np.append(2.0 / shape, 1.0))
    m[:-1, -1] = 1.0 / shape - 1.0
    return m


def _nearest_indices_like_torch(xform: np.ndarray, in_shape, out_shape) -> list[np.ndarray]:
    """Per-axis source indices for nearest sampling with an axis-aligned ``xform`` (out index -> in index).

    Halving a spacing puts samples exactly half-way between two voxels; which one wins then
    depends on float64 rounding. The coordinates are computed with the same float operations as
    MONAI's path (normalised affine, ``affine_grid``, ``grid_sample`` unnormalise, round half to
    even), so label maps match MONAI voxel for voxel rather than differing on every tie.
    """
    theta = _grid_norm(in_shape) @ xform @ np.linalg.inv(_grid_norm(out_shape))
    idx = []
    for a, (n_in, n_out) in enumerate(zip(in_shape, out_shape)):
        base = _torch_linspace(n_out) * (n_out - 1) / n_out
        grid = base * theta[a, a] + theta[a, 3]
        coord = ((grid + 1.0) * n_in - 1.0) / 2.0
        idx.append(np.clip(np.rint(np.clip(coord, 0, n_in - 1)), 0, n_in - 1).astype(np.intp))
    return idx


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    out_affine: np.ndarray,
    out_shape: Sequence[int],
    *,
    mode: str = "linear",
    dtype=None,
) -> np.ndarray:
    """Resamples ``data`` (spatial axes first) from grid ``affine`` onto grid ``(out_affine, out_shape)``.

    ``mode="linear"`` (MONAI "bilinear": trilinear, computed in float64, returned as float32 unless
    ``dtype``) or ``"nearest"`` (round half to even like torch ``grid_sample``; keeps the dtype).
    Coordinates outside the input take the nearest edge value (MONAI ``padding_mode="border"``).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    out_shape = tuple(int(s) for s in out_shape)
    in_shape = data.shape[:3]
    xform = np.linalg.solve(np.asarray(affine, np.float64), np.asarray(out_affine, np.float64))
    if out_shape == tuple(in_shape) and np.allclose(xform, np.eye(4), atol=AFFINE_TOL):
        # MONAI skips resampling that changes nothing (no copy when the dtype already fits).
        return data.astype(dtype if dtype is not None else (np.float32 if mode == "linear" else data.dtype), copy=False)
    mat, off = xform[:3, :3], xform[:3, 3]
    diagonal = np.allclose(mat, np.diag(np.diag(mat)), atol=1e-9)
    trailing = data.shape[3:]
    if mode == "nearest":
        if diagonal:
            idx = _nearest_indices_like_torch(xform, in_shape, out_shape)
            out = data[np.ix_(*idx)]
        else:
            out = np.empty(out_shape + trailing, dtype=data.dtype)
            jj, kk = np.meshgrid(np.arange(out_shape[1]), np.arange(out_shape[2]), indexing="ij")
            for i in range(out_shape[0]):  # one slab at a time keeps memory at a few slices
                pts = mat @ np.stack([np.full(jj.shape, i), jj, kk]).reshape(3, -1) + off[:, None]
                ijk = np.rint(pts)
                for a in range(3):
                    np.clip(ijk[a], 0, in_shape[a] - 1, out=ijk[a])
                ijk = ijk.astype(np.intp)
                out[i] = data[ijk[0], ijk[1], ijk[2]].reshape(out_shape[1:] + trailing)
        return out.astype(dtype, copy=False) if dtype is not None else out
    src = data.reshape(in_shape + (-1,))
    out = np.empty(out_shape + (src.shape[-1],), dtype=dtype or np.float32)
    matrix = np.diag(mat) if diagonal else mat
    for c in range(src.shape[-1]):
        ndi.affine_transform(
            src[..., c].astype(np.float64 if src.dtype == np.float64 else np.float32, copy=False),
            matrix,
            offset=off,
            output_shape=out_shape,
            output=out[..., c],
            order=1,
            mode="nearest",
            prefilter=False,
        )
    return out.reshape(out_shape + trailing)
