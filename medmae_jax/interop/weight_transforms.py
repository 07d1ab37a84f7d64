"""Weight transposes between torch and flax layouts, tree path helpers, and the checks that tell a grid,
the number of heads or a sin-cos table from the weights alone.
"""


from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.models.vit import SINCOS_AXIS_ORDER, sincos_position_table

StateDict = dict[str, np.ndarray]

HINT_KEYS = ("num_heads", "decoder_heads", "patch_size", "in_channels", "grid", "layer_norm_eps", "pooling")

# Tolerance under which a stored fixed table counts as the project's sin-cos table.
SINCOS_ATOL = 1e-5




# --------------------------------------------------------------------------
# Array transforms.
# --------------------------------------------------------------------------
def linear_to_dense(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
    return np.ascontiguousarray(np.asarray(w).T)


def dense_to_linear(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(k).T)


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """torch conv weight (out, in, *k) -> flax kernel (*k, in, out)."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.transpose(*range(2, w.ndim), 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k)
    return np.ascontiguousarray(k.transpose(k.ndim - 1, k.ndim - 2, *range(k.ndim - 2)))


def qkv_to_flax(w: np.ndarray, heads: int) -> np.ndarray:
    """Fused qkv Linear (3D, D), rows ordered (qkv, head, head_dim) -> (D, 3, heads, head_dim)."""
    w = np.asarray(w)
    d = w.shape[1]
    return np.ascontiguousarray(w.T.reshape(d, 3, heads, w.shape[0] // (3 * heads)))


def qkv_to_torch(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k)
    return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def out_proj_to_flax(w: np.ndarray, heads: int) -> np.ndarray:
    """Attention output Linear (D, heads*head_dim) -> (heads, head_dim, D)."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.T.reshape(heads, w.shape[1] // heads, w.shape[0]))


def out_proj_to_torch(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k)
    return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)


# --------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------
def _plain(params: Any) -> dict:
    """Unbox logical-partitioning boxes, drop a ``{'params': ...}`` wrapper, and make leaves numpy."""
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]

    def conv(x):
        if isinstance(x, Mapping):
            return {k: conv(v) for k, v in x.items()}
        return np.asarray(x)

    return conv(params)


def _get(tree: Mapping, path: str, default=None):
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _require(tree: Mapping, path: str, where: str) -> np.ndarray:
    value = _get(tree, path)
    if value is None:
        raise ConversionError(f"{where}: parameter {path!r} is missing from the JAX params")
    return np.asarray(value)


def _put(tree: dict, path: str, value) -> None:
    if value is None:
        return
    parts = path.split("/")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def infer_grid(num_tokens: int, ndim: int) -> Optional[tuple[int, ...]]:
    """Square/cubic grid with ``num_tokens`` cells, or None when there is none."""
    r = int(round(num_tokens ** (1.0 / ndim)))
    for c in (r - 1, r, r + 1):
        if c > 0 and c**ndim == num_tokens:
            return (c,) * ndim
    return None


_KNOWN_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}


def default_heads(width: int) -> int:
    """Heads of the standard ViT with this width (Ti/S/M/B/L/H), else width // 64 (at least 1)."""
    if width in _KNOWN_HEADS:
        return _KNOWN_HEADS[width]
    heads = max(width // 64, 1)
    while width % heads:
        heads -= 1
    return heads


def _axis_orders(ndim: int, preferred=None) -> list:
    """Sin-cos channel orders to try: ``preferred``, the default (None), then every reference's order."""
    out = [tuple(preferred) if preferred is not None else None]
    for order in [None, *SINCOS_AXIS_ORDER.values()]:
        if order is not None and len(order) != ndim:
            continue
        if order not in out:
            out.append(order)
    return out


def _find_sincos_order(table: np.ndarray, grid, width: int, prefix_in_table: int, orders: Sequence):
    """The first axis order whose fixed sin-cos table equals ``table`` (``False`` when none does)."""
    for order in orders:
        if _sincos_matches(table, grid, width, prefix_in_table, order):
            return order
    return False


def _sincos_matches(table: np.ndarray, grid, width: int, prefix_in_table: int, axis_order=None) -> bool:
    if grid is None:
        return False
    try:
        ref = sincos_position_table(grid, width, axis_order=axis_order)
    except ValueError:
        return False
    body = np.asarray(table, np.float64).reshape(-1, width)
    if body.shape[0] != prefix_in_table + ref.shape[0]:
        return False
    if prefix_in_table and np.any(body[:prefix_in_table] != 0):
        return False
    return bool(np.allclose(body[prefix_in_table:], ref, rtol=0.0, atol=SINCOS_ATOL))
