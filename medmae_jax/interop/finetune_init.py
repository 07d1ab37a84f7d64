"""Initialise a fine-tuning ViT (UNETR's or the classifier's) from an MAE's encoder.

The MAE encoder uses a fixed sin-cos table; the fine-tune ViT learns its table,
starting from the MAE's (SelfMedMAE ``seg_trainer`` / MAE ``main_finetune``).
UNETR's ViT has no cls token, so the table's cls slot is dropped; the classifier
keeps it. When the patch grids differ the table is resized like MAE's
``interpolate_pos_embed`` (2-D bicubic, ``align_corners=False``, no antialias;
3-D trilinear), the cls slot kept as is.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.interop.report import ConversionReport
from medmae_jax.models.vit import sincos_position_table

# --------------------------------------------------------------------------
# Position-table resizing (PyTorch F.interpolate semantics, align_corners=False).
# --------------------------------------------------------------------------
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _CUBIC_A
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def interpolation_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D ``linear`` or ``cubic`` resampling as torch's ``interpolate`` does it."""
    if n_in == n_out:
        return np.eye(n_in)
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if method == "linear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(int)
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        np.add.at(m, (rows, i0), 1.0 - lam)
        np.add.at(m, (rows, i1), lam)
    elif method == "cubic":
        i0 = np.floor(src).astype(int)
        t = src - i0
        for off in (-1, 0, 1, 2):
            idx = np.clip(i0 + off, 0, n_in - 1)
            np.add.at(m, (rows, idx), _cubic(t - off))
    else:
        raise ValueError(f"unknown interpolation {method!r}; use 'linear' or 'cubic'")
    return m


def resize_position_embedding(table: Any, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int = 1,
                              method: Optional[str] = None) -> np.ndarray:
    """Resample a position table from ``old_grid`` to ``new_grid``; the first ``num_prefix`` rows are kept.

    ``table`` is ``(1, prefix + L, D)`` or ``(prefix + L, D)``; the result has the
    same rank. ``method`` defaults to ``cubic`` in 2-D (timm/MAE bicubic) and
    ``linear`` otherwise (3-D trilinear); equal grids give the table back unchanged.
    """
    arr = np.asarray(table)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"position table must be (1, N, D) or (N, D), got shape {np.shape(table)}")
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if len(old_grid) != len(new_grid):
        raise ValueError(f"grids {old_grid} and {new_grid} differ in dimensionality")
    n_old = math.prod(old_grid)
    if arr.shape[1] != num_prefix + n_old:
        raise ValueError(f"position table has {arr.shape[1]} rows, expected {num_prefix} + prod{old_grid} = "
                         f"{num_prefix + n_old}")
    if old_grid == new_grid:
        return np.asarray(table).copy()
    method = method or ("cubic" if len(old_grid) == 2 else "linear")
    prefix, body = arr[:, :num_prefix], arr[:, num_prefix:]
    d = arr.shape[-1]
    x = body.reshape(arr.shape[0], *old_grid, d).astype(np.float64)
    for axis, (n_in, n_out) in enumerate(zip(old_grid, new_grid)):
        mat = interpolation_matrix(n_in, n_out, method)
        x = np.moveaxis(np.tensordot(mat, np.moveaxis(x, axis + 1, 0), axes=(1, 0)), 0, axis + 1)
    body = x.reshape(arr.shape[0], math.prod(new_grid), d).astype(arr.dtype)
    out = np.concatenate([prefix, body], axis=1)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------
# Copying the MAE encoder.
# --------------------------------------------------------------------------
def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _unbox_leaf(x):
    """(plain value, re-boxer) for a leaf that may be an ``nn.Partitioned``-style box."""
    if hasattr(x, "unbox") and hasattr(x, "replace_boxed"):
        return x.unbox(), x.replace_boxed
    return x, lambda v: v


def _grid_of(num_tokens: int, ndim: int, given, what: str):
    if given is not None:
        given = tuple(int(g) for g in given)
        if math.prod(given) != num_tokens:
            raise ConversionError(f"{what}: grid {given} has {math.prod(given)} cells, the table {num_tokens} rows")
        return given
    r = int(round(num_tokens ** (1.0 / ndim)))
    for c in (r - 1, r, r + 1):
        if c > 0 and c**ndim == num_tokens:
            return (c,) * ndim
    raise ConversionError(f"{what}: {num_tokens} tokens form no square/cubic grid; pass the grid explicitly")


def encoder_init_from_mae(target_encoder_params: Mapping, mae_params: Mapping, *, drop_cls: Optional[bool] = None,
                          resize: bool = True, mae_grid: Optional[Sequence[int]] = None,
                          target_grid: Optional[Sequence[int]] = None) -> tuple[dict, ConversionReport]:
    """Copy an MAE encoder into a fine-tune ViT's params; returns ``(params, report)``.

    ``target_encoder_params`` is the fine-tune ViT's subtree (UNETR: ``params['vit']``,
    classifier: ``params['encoder']``), boxed or plain; the result keeps its structure
    and boxes. ``mae_params`` is the MAE's params (``{'encoder', 'decoder'}``) or its
    encoder subtree. The learnable ``pos_embedding`` starts from the MAE's table (its
    parameter, or the fixed sin-cos table computed for the target grid); the cls slot is
    dropped when the target has no cls token (``drop_cls=None``: decided by the target;
    ``True``/``False`` assert it). Grids are inferred as squares/cubes unless given.
    Parameters the MAE lacks keep the target's values (``report.missing``); the MAE's
    decoder, a dropped cls token and a final norm the target lacks go to ``report.ignored``.
    """
    mae = dict(mae_params.get("params", mae_params)) if isinstance(mae_params, Mapping) else mae_params
    ignored: list[str] = []
    if "encoder" in mae and isinstance(mae["encoder"], Mapping):
        ignored += [f"decoder/{p}" for p in _flatten(mae.get("decoder", {}))]
        ignored += [k for k in mae if k not in ("encoder", "decoder")]
        source = mae["encoder"]
    else:
        source = mae
    src = {k: _unbox_leaf(v)[0] for k, v in _flatten(source).items()}
    tgt = _flatten(target_encoder_params)
    target_cls = "cls_token" in tgt
    if drop_cls is not None and drop_cls == target_cls:
        raise ConversionError(f"drop_cls={drop_cls} but the target ViT {'has' if target_cls else 'has no'} cls token")
    kernel = src.get("patch_embed/proj/kernel")
    ndim = (np.ndim(kernel) - 2) if kernel is not None and np.ndim(kernel) >= 4 else None
    if ndim is None:
        tk = _unbox_leaf(tgt.get("patch_embed/proj/kernel"))[0]
        ndim = (np.ndim(tk) - 2) if tk is not None and np.ndim(tk) >= 4 else (len(target_grid) if target_grid else
                                                                              len(mae_grid) if mae_grid else None)
    source_cls = "cls_token" in src

    out: dict[str, Any] = {}
    missing: list[str] = []
    used: set[str] = set()
    for path, leaf in tgt.items():
        value, rebox = _unbox_leaf(leaf)
        if path == "pos_embedding":
            new = _position_init(src, value, source_cls, target_cls, ndim, mae_grid, target_grid, resize, used,
                                 ignored)
            out[path] = rebox(np.asarray(new, dtype=np.asarray(value).dtype))
            continue
        if path not in src:
            missing.append(path)
            out[path] = leaf
            continue
        s = np.asarray(src[path])
        if tuple(s.shape) != tuple(np.shape(value)):
            raise ConversionError(f"MAE encoder parameter {path!r} has shape {tuple(s.shape)}, the fine-tune model "
                                  f"expects {tuple(np.shape(value))}")
        used.add(path)
        out[path] = rebox(s.astype(np.asarray(value).dtype))
    target_has_norm = any(p.startswith("transformer/norm/") for p in tgt)
    unused = []
    for path in sorted(src):
        if path in used:
            continue
        if path == "cls_token" and not target_cls:
            ignored.append("encoder/cls_token (the target ViT has no cls token)")
        elif path.startswith("transformer/norm/") and not target_has_norm:
            ignored.append(f"encoder/{path} (the target ViT has no final norm: it pools into fc_norm)")
        else:
            unused.append(f"encoder/{path}")
    report = ConversionReport("mae-encoder->finetune", unused=unused, missing=missing, ignored=ignored)
    return _unflatten(out), report


def _position_init(src, target_table, source_cls, target_cls, ndim, mae_grid, target_grid, resize, used, ignored):
    target_table = np.asarray(target_table)
    width = target_table.shape[-1]
    t_prefix = int(target_cls)
    n_target = target_table.shape[1] - t_prefix
    if ndim is None:
        raise ConversionError("cannot tell the grid's dimensionality: pass target_grid= / mae_grid=")
    tgrid = _grid_of(n_target, ndim, target_grid, "target pos_embedding")
    if "pos_embedding" in src:
        table = np.asarray(src["pos_embedding"])
        used.add("pos_embedding")
        s_prefix = int(source_cls)
        if table.shape[-1] != width:
            raise ConversionError(f"MAE pos_embedding has shape {table.shape}, the fine-tune model expects width "
                                  f"{width} ({target_table.shape})")
        sgrid = _grid_of(table.shape[1] - s_prefix, ndim, mae_grid, "MAE pos_embedding")
        if sgrid != tgrid:
            if not resize:
                raise ConversionError(f"MAE pos_embedding has shape {table.shape} (grid {sgrid}), the fine-tune model "
                                      f"expects {target_table.shape} (grid {tgrid}); pass resize=True")
            table = resize_position_embedding(table, sgrid, tgrid, num_prefix=s_prefix)
        prefix_rows, body = table[:, :s_prefix], table[:, s_prefix:]
    else:
        # The MAE's table is the fixed sin-cos one: compute it for the target grid directly.
        body = sincos_position_table(tgrid, width)[None]
        prefix_rows = np.zeros((1, int(source_cls), width), body.dtype)
    if target_cls:
        cls_row = prefix_rows if prefix_rows.shape[1] else np.zeros((1, 1, width), body.dtype)
        return np.concatenate([cls_row, body], axis=1)
    if prefix_rows.shape[1]:
        ignored.append("encoder/pos_embedding cls slot (the target ViT has no cls token)")
    return body
