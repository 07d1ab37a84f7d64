"""Import/export between PyTorch ViT-family state dicts and the project's parameter trees.

Layouts (names as in :func:`medmae_jax.interop.torch_checkpoints.detect_layout`):

* ``fair-mae``: FAIR's ``models_mae.py`` (``patch_embed.proj``, ``cls_token``,
  ``pos_embed`` (1, L+1, D) fixed buffer, ``blocks.N.*``, ``norm``,
  ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N.*``,
  ``decoder_norm``, ``decoder_pred``).
* ``timm-vit``: timm ``VisionTransformer`` / MAE's ``models_vit.py`` (same encoder
  names, ``head``, ``fc_norm`` when pooled by average).
* ``monai-vit``: MONAI ``ViT`` (``patch_embedding.patch_embeddings`` conv or
  ``.patch_embeddings.1`` perceptron Linear, ``patch_embedding.position_embeddings``
  (1, L, D) without a cls slot, ``blocks.N.{norm1, attn.qkv, attn.out_proj, norm2,
  mlp.linear1, mlp.linear2}``, ``norm``, ``classification_head[.0]``).
* ``monai-mae``: MONAI ``MaskedAutoEncoderViT`` (encoder as MONAI ViT with the final
  norm stored as ``blocks.{depth}``, ``decoder_embed``, ``mask_tokens``,
  ``decoder_pos_embedding`` (1, L, Dd), ``decoder_blocks.N``, ``decoder_blocks.{depth}``
  (norm), ``decoder_pred``).
* ``selfmedmae-mae3d``: SelfMedMAE ``lib/models/mae3d.py`` (``encoder.patch_embed.proj``,
  ``encoder.cls_token``, ``encoder.blocks.N`` (timm), ``encoder.norm``,
  ``encoder_pos_embed`` (1, L, D) fixed, ``encoder_to_decoder``, ``mask_token``,
  ``decoder_pos_embed`` (1, L, Dd) fixed, ``decoder.blocks.N``, ``decoder.norm``,
  ``decoder.head`` = pixel prediction in (ph, pw, pd, C) order, the project's order).
  The 2-D ``lib/models/mae.py`` variant (pos tables with a cls slot, ``encoder_to_decoder``
  without bias) uses the same names and is accepted too.
* ``selfmedmae-unetr``: SelfMedMAE ``UNETR3D``: ``encoder.*`` is a timm-style ViT with a
  cls token and a learnable ``encoder.pos_embed`` (1, L+1, D); ``decoder.*`` is MONAI's
  UNETR decoder, converted by :mod:`medmae_jax.interop.monai_unetr` when that module is present.

Each layout has ``to_jax(state_dict, *, strict=False, config=None, **hints) -> (params,
config, ConversionReport)`` and ``to_torch(params, config) -> dict[str, np.ndarray]``.
``config`` is what the weights imply (``model``: ``mae`` | ``classifier`` | ``vit`` | ``unetr``;
``encoder``: :class:`~medmae_jax.models.vit.ViT` keyword arguments; ``decoder`` / ``head``;
``grid``, ``in_channels``, ``ndim``; ``assumed``: what the weights could not tell, such as
the number of heads; ``layout_options``: details needed to write the same layout back).
Passing ``config=`` (e.g. a model's configuration) makes it the target: every checkpoint
shape is checked against it. Hints: ``num_heads``, ``decoder_heads``, ``patch_size``,
``in_channels``, ``grid``, ``layer_norm_eps``, ``pooling``.

Weight layouts: torch Linear (out, in) <-> Dense (in, out); conv (out, in, *k) <->
(*k, in, out); fused qkv (3D, D) <-> (D, 3, heads, head_dim); out projection (D, D) <->
(heads, head_dim, D); LayerNorm weight <-> scale.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.interop.report import ConversionReport
from medmae_jax.interop.torch_checkpoints import detect_layout, load_state_dict, save_state_dict
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
    try:
        import flax.linen as nn

        params = nn.unbox(params)
    except Exception:  # pragma: no cover - flax always present; stay usable on plain dicts
        pass
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


# --------------------------------------------------------------------------
# Reading a state dict.
# --------------------------------------------------------------------------
class _Reader:
    """Hands out state-dict entries with shape checks and records what was used, missed or ignored."""

    def __init__(self, state_dict: Mapping[str, Any], layout: str):
        self.sd = {k: v for k, v in state_dict.items()}
        self.layout = layout
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.ignored: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def shape(self, key: str) -> Optional[tuple[int, ...]]:
        return tuple(np.shape(self.sd[key])) if key in self.sd else None

    def take(self, key: str, shape: Optional[Sequence[int]]) -> Optional[np.ndarray]:
        if key not in self.sd:
            self.missing.append(key)
            return None
        arr = np.asarray(self.sd[key])
        if shape is not None and tuple(arr.shape) != tuple(int(s) for s in shape):
            raise ConversionError(f"{self.layout}: key {key!r} has shape {tuple(arr.shape)} in the checkpoint, "
                                  f"the model expects {tuple(int(s) for s in shape)}")
        self.used.add(key)
        return arr

    def ignore_matching(self, pattern: str) -> None:
        rx = re.compile(pattern)
        for k in self.sd:
            if k not in self.used and rx.fullmatch(k):
                self.used.add(k)
                self.ignored.append(k)

    def report(self, extra_missing: Sequence[str] = ()) -> ConversionReport:
        unused = sorted(k for k in self.sd if k not in self.used)
        return ConversionReport(self.layout, unused=unused, missing=list(self.missing) + list(extra_missing),
                                ignored=sorted(self.ignored))


# --------------------------------------------------------------------------
# Layout descriptions.
# --------------------------------------------------------------------------
TIMM_BLOCK = dict(norm1="norm1", qkv="attn.qkv", proj="attn.proj", norm2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")
MONAI_BLOCK = dict(norm1="norm1", qkv="attn.qkv", proj="attn.out_proj", norm2="norm2", fc1="mlp.linear1",
                   fc2="mlp.linear2")


@dataclasses.dataclass(frozen=True)
class EncoderKeys:
    """Where a layout keeps the ViT encoder's tensors."""

    patch: str                      # conv (or Linear) projection stem, e.g. 'patch_embed.proj'
    perceptron: Optional[str]       # Linear projection stem of a 'perceptron' patch embedding, if the layout has one
    pos: str                        # position table key
    pos_cls_slot: Optional[bool]    # the table has a cls slot: True / False / None = infer from shapes
    cls: str
    blocks: str                     # 'blocks' -> 'blocks.N.<name>'
    block_names: dict
    norm: str                       # final norm stem; '{depth}' is replaced by the depth
    eps: float


@dataclasses.dataclass(frozen=True)
class DecoderKeys:
    """Where a layout keeps the MAE decoder's tensors."""

    embed: str
    mask: str
    pos: str
    pos_cls_slot: Optional[bool]
    blocks: str
    block_names: dict
    norm: str
    pred: str
    default_heads: Any              # int or callable(width) -> int


def _count_blocks(reader: _Reader, stem: str, names: dict) -> int:
    rx = re.compile(re.escape(stem) + r"\.(\d+)\." + re.escape(names["qkv"]) + r"\.weight")
    idx = [int(m.group(1)) for k in reader.sd for m in [rx.fullmatch(k)] if m]
    return max(idx) + 1 if idx else 0


def _block_shapes(width: int, mlp_dim: int, qkv_bias: bool, names: dict) -> dict[str, tuple]:
    shapes = {
        f"{names['norm1']}.weight": (width,), f"{names['norm1']}.bias": (width,),
        f"{names['qkv']}.weight": (3 * width, width),
        f"{names['proj']}.weight": (width, width), f"{names['proj']}.bias": (width,),
        f"{names['norm2']}.weight": (width,), f"{names['norm2']}.bias": (width,),
        f"{names['fc1']}.weight": (mlp_dim, width), f"{names['fc1']}.bias": (mlp_dim,),
        f"{names['fc2']}.weight": (width, mlp_dim), f"{names['fc2']}.bias": (width,),
    }
    if qkv_bias:
        shapes[f"{names['qkv']}.bias"] = (3 * width,)
    return shapes


def _blocks_to_jax(reader: _Reader, stem: str, names: dict, depth: int, width: int, heads: int, mlp_dim: int,
                   qkv_bias: bool) -> dict:
    out: dict = {}
    shapes = _block_shapes(width, mlp_dim, qkv_bias, names)
    for i in range(depth):
        p = f"{stem}.{i}."
        t = lambda name: reader.take(p + name, shapes[name])  # noqa: E731
        blk: dict = {}
        _put(blk, "norm1/scale", t(f"{names['norm1']}.weight"))
        _put(blk, "norm1/bias", t(f"{names['norm1']}.bias"))
        w = t(f"{names['qkv']}.weight")
        _put(blk, "attn/qkv/kernel", None if w is None else qkv_to_flax(w, heads))
        if qkv_bias:
            b = t(f"{names['qkv']}.bias")
            _put(blk, "attn/qkv/bias", None if b is None else b.reshape(3, heads, width // heads).copy())
        w = t(f"{names['proj']}.weight")
        _put(blk, "attn/proj/kernel", None if w is None else out_proj_to_flax(w, heads))
        _put(blk, "attn/proj/bias", t(f"{names['proj']}.bias"))
        _put(blk, "norm2/scale", t(f"{names['norm2']}.weight"))
        _put(blk, "norm2/bias", t(f"{names['norm2']}.bias"))
        for fc in ("fc1", "fc2"):
            w = t(f"{names[fc]}.weight")
            _put(blk, f"mlp/{fc}/kernel", None if w is None else linear_to_dense(w))
            _put(blk, f"mlp/{fc}/bias", t(f"{names[fc]}.bias"))
        out[f"block_{i}"] = blk
    return out


def _blocks_to_torch(transformer: Mapping, stem: str, names: dict, where: str) -> StateDict:
    out: StateDict = {}
    i = 0
    while f"block_{i}" in transformer:
        blk = transformer[f"block_{i}"]
        p = f"{stem}.{i}."
        r = lambda path: _require(blk, path, f"{where} block_{i}")  # noqa: E731
        out[p + f"{names['norm1']}.weight"] = r("norm1/scale")
        out[p + f"{names['norm1']}.bias"] = r("norm1/bias")
        out[p + f"{names['qkv']}.weight"] = qkv_to_torch(r("attn/qkv/kernel"))
        if _get(blk, "attn/qkv/bias") is not None:
            out[p + f"{names['qkv']}.bias"] = np.ascontiguousarray(r("attn/qkv/bias").reshape(-1))
        out[p + f"{names['proj']}.weight"] = out_proj_to_torch(r("attn/proj/kernel"))
        out[p + f"{names['proj']}.bias"] = r("attn/proj/bias")
        out[p + f"{names['norm2']}.weight"] = r("norm2/scale")
        out[p + f"{names['norm2']}.bias"] = r("norm2/bias")
        for fc in ("fc1", "fc2"):
            out[p + f"{names[fc]}.weight"] = dense_to_linear(r(f"mlp/{fc}/kernel"))
            out[p + f"{names[fc]}.bias"] = r(f"mlp/{fc}/bias")
        i += 1
    extra = sorted(k for k in transformer if k.startswith("block_") and not re.fullmatch(r"block_\d+", k))
    if extra:
        raise ConversionError(f"{where}: unexpected transformer entries {extra}")
    return out


def _hint(hints: Mapping, config: Optional[Mapping], key: str, section: Optional[str] = None):
    if hints.get(key) is not None:
        return hints[key]
    if config:
        src = config.get(section, {}) if section else config
        if isinstance(src, Mapping) and src.get(key) is not None:
            return src[key]
    return None


# --------------------------------------------------------------------------
# Encoder import / export.
# --------------------------------------------------------------------------
def _encoder_to_jax(reader: _Reader, keys: EncoderKeys, hints: Mapping, config: Optional[Mapping],
                    assumed: list, fixed_pos: bool) -> tuple[dict, dict, dict]:
    """Returns (ViT params, ViT kwargs, info {grid, in_channels, ndim, options})."""
    enc_cfg = dict((config or {}).get("encoder", {}))
    layout = reader.layout
    options: dict = {}
    # --- patch embedding: conv (out, in, *k) or perceptron Linear (out, prod(p)*C)
    conv_key, lin_key = f"{keys.patch}.weight", (f"{keys.perceptron}.weight" if keys.perceptron else None)
    if conv_key in reader and len(reader.shape(conv_key)) >= 4:
        kind, wkey = "conv", conv_key
        wshape = reader.shape(conv_key)
        width, in_ch, patch = wshape[0], wshape[1], tuple(wshape[2:])
    elif lin_key and lin_key in reader:
        kind, wkey = "perceptron", lin_key
        width, patch_dim = reader.shape(lin_key)
        patch = _hint(hints, config, "patch_size", "encoder")
        in_ch = _hint(hints, config, "in_channels")
        if patch is None and in_ch is None:
            raise ConversionError(f"{layout}: {lin_key} is a perceptron patch embedding of shape "
                                  f"{reader.shape(lin_key)}, which gives only prod(patch) * channels = {patch_dim}: "
                                  "pass patch_size= (and in_channels=)")
        if patch is not None:
            patch = tuple(int(p) for p in patch)
            in_ch = int(in_ch) if in_ch is not None else patch_dim // math.prod(patch)
        else:
            raise ConversionError(f"{layout}: pass patch_size= for the perceptron patch embedding {lin_key}")
    else:
        raise ConversionError(f"{layout}: no patch embedding weight ({conv_key}"
                              f"{' or ' + lin_key if lin_key else ''}) in the checkpoint")
    # A target config fixes the shapes every key is checked against.
    width = int(enc_cfg.get("width", width))
    if enc_cfg.get("patch_size") is not None:
        patch = tuple(int(p) for p in enc_cfg["patch_size"])
    in_ch = int((config or {}).get("in_channels") or in_ch)
    if kind == "perceptron" and enc_cfg.get("patch_embed") == "conv" or \
            kind == "conv" and enc_cfg.get("patch_embed") == "perceptron":
        raise ConversionError(f"{layout}: the checkpoint has a {kind} patch embedding ({wkey}), the model a "
                              f"{enc_cfg['patch_embed']} one")
    ndim = len(patch)
    depth = int(enc_cfg.get("depth", _count_blocks(reader, keys.blocks, keys.block_names)))
    if depth == 0:
        raise ConversionError(f"{layout}: no transformer blocks ({keys.blocks}.N.{keys.block_names['qkv']}.weight)")
    fc1 = f"{keys.blocks}.0.{keys.block_names['fc1']}.weight"
    mlp_dim = int(enc_cfg.get("mlp_dim") or (reader.shape(fc1) or (4 * width,))[0])
    qkv_bias = bool(enc_cfg.get("qkv_bias", f"{keys.blocks}.0.{keys.block_names['qkv']}.bias" in reader))
    heads = _hint(hints, config, "num_heads", "encoder")
    if heads is None:
        heads = default_heads(width)
        assumed.append(f"encoder num_heads={heads} (not stored in the weights; pass num_heads=)")
    heads = int(heads)
    if width % heads:
        raise ConversionError(f"{layout}: width {width} is not divisible by num_heads={heads}")
    eps = _hint(hints, config, "layer_norm_eps", "encoder")
    eps = float(keys.eps if eps is None else eps)
    has_cls = bool(enc_cfg.get("cls_token", keys.cls in reader))
    norm_stem = keys.norm.format(depth=depth)
    final_norm = bool(enc_cfg.get("final_norm", f"{norm_stem}.weight" in reader))

    # --- position table
    grid = _hint(hints, config, "grid")
    grid = tuple(int(g) for g in grid) if grid is not None else None
    pos_shape = reader.shape(keys.pos)
    slot = keys.pos_cls_slot
    if pos_shape is not None:
        n = pos_shape[1] if len(pos_shape) == 3 else pos_shape[0]
        if slot is None:
            if not has_cls:
                slot = False
            elif grid is not None:
                slot = n == math.prod(grid) + 1
            else:
                slot = infer_grid(n - 1, ndim) is not None or infer_grid(n, ndim) is None
        num_tokens = n - int(slot)
        if grid is None:
            grid = infer_grid(num_tokens, ndim)
            if grid is None:
                assumed.append(f"grid unknown: {num_tokens} tokens is no square/cube; pass grid=")
        elif math.prod(grid) != num_tokens:
            raise ConversionError(f"{layout}: key {keys.pos!r} has shape {pos_shape}, the model expects "
                                  f"{(1, int(slot) + math.prod(grid), width)} for grid {grid}")
    else:
        slot = bool(slot) and has_cls
        num_tokens = math.prod(grid) if grid is not None else None
    options["pos_cls_slot"] = bool(slot)

    params: dict = {}
    if kind == "conv":
        w = reader.take(wkey, (width, in_ch, *patch))
        _put(params, "patch_embed/proj/kernel", None if w is None else conv_to_flax(w))
    else:
        w = reader.take(wkey, (width, math.prod(patch) * in_ch))
        _put(params, "patch_embed/proj/kernel", None if w is None else linear_to_dense(w))
    bkey = (keys.patch if kind == "conv" else keys.perceptron) + ".bias"
    _put(params, "patch_embed/proj/bias", reader.take(bkey, (width,)))
    if has_cls:
        _put(params, "cls_token", reader.take(keys.cls, (1, 1, width)))
    pos_mode = enc_cfg.get("pos_embed")
    if pos_shape is not None:
        table = reader.take(keys.pos, (1, int(slot) + num_tokens, width) if len(pos_shape) == 3 else
                            (int(slot) + num_tokens, width))
        table = table.reshape(1, -1, width)
        order = enc_cfg.get("pos_axis_order")
        if pos_mode is None:
            found = _find_sincos_order(table, grid, width, int(slot), _axis_orders(ndim, order)) if fixed_pos \
                else False
            pos_mode = "learn" if found is False else "sincos"
            if found is not False:
                order = found
        if order is not None:
            options["pos_axis_order"] = tuple(order)
        if pos_mode == "learn":
            if has_cls and not slot:
                table = np.concatenate([np.zeros((1, 1, width), table.dtype), table], axis=1)
            elif slot and not has_cls:
                raise ConversionError(f"{layout}: {keys.pos} has a cls slot but the checkpoint has no {keys.cls}")
            _put(params, "pos_embedding", table)
        elif pos_mode == "sincos" and not _sincos_matches(table, grid, width, int(slot), order):
            raise ConversionError(f"{layout}: {keys.pos} is not the fixed sin-cos table the model config "
                                  "(pos_embed='sincos') uses; import with pos_embed='learn'")
    else:
        reader.missing.append(keys.pos)  # every layout stores a table (zeros for MONAI's 'none')
        pos_mode = pos_mode or "learn"
    params["transformer"] = _blocks_to_jax(reader, keys.blocks, keys.block_names, depth, width, heads, mlp_dim,
                                           qkv_bias)
    if final_norm:
        _put(params, "transformer/norm/scale", reader.take(f"{norm_stem}.weight", (width,)))
        _put(params, "transformer/norm/bias", reader.take(f"{norm_stem}.bias", (width,)))
    vit_kwargs = dict(patch_size=tuple(patch), width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                      patch_embed=kind, cls_token=has_cls, pos_embed=pos_mode, qkv_bias=qkv_bias,
                      layer_norm_eps=eps, final_norm=final_norm)
    if options.get("pos_axis_order") is not None:
        vit_kwargs["pos_axis_order"] = options.pop("pos_axis_order")
    info = dict(grid=grid, in_channels=in_ch, ndim=ndim, options=options)
    return params, vit_kwargs, info


def _options(config: Mapping, layout: str) -> dict:
    """Layout details recorded by ``to_jax``; only meaningful when writing back the same layout."""
    return dict(config.get("layout_options", {})) if config.get("layout") == layout else {}


def _encoder_to_torch(vit: Mapping, keys: EncoderKeys, config: Mapping, where: str,
                      default_slot: Optional[bool] = None) -> StateDict:
    enc = dict(config.get("encoder", {}))
    opts = _options(config, where)
    out: StateDict = {}
    kernel = _require(vit, "patch_embed/proj/kernel", where)
    width = kernel.shape[-1]
    if kernel.ndim >= 4:
        out[f"{keys.patch}.weight"] = conv_to_torch(kernel)
        out[f"{keys.patch}.bias"] = _require(vit, "patch_embed/proj/bias", where)
    else:
        if not keys.perceptron:
            raise ConversionError(f"{where}: this layout has no perceptron (Linear) patch embedding; "
                                  "only conv kernels (*patch, C, width) can be written")
        out[f"{keys.perceptron}.weight"] = dense_to_linear(kernel)
        out[f"{keys.perceptron}.bias"] = _require(vit, "patch_embed/proj/bias", where)
    has_cls = _get(vit, "cls_token") is not None
    cls = np.asarray(vit["cls_token"]) if has_cls else None
    if keys.pos_cls_slot is not None:
        slot = keys.pos_cls_slot
    else:
        slot = bool(opts.get("pos_cls_slot", has_cls if default_slot is None else default_slot))
    slot = slot and has_cls
    table = _get(vit, "pos_embedding")
    if table is not None:
        table = np.asarray(table)
    else:
        mode = enc.get("pos_embed", "sincos")
        n = math.prod(config["grid"]) if config.get("grid") is not None else None
        if mode == "none" and n is not None:
            table = np.zeros((1, int(has_cls) + n, width), kernel.dtype)  # the layouts always store a table
        elif mode == "none":
            raise ConversionError(f"{where}: no position table in the params; config['grid'] is needed to write "
                                  "a zero table")
        else:
            grid = config.get("grid")
            if grid is None:
                raise ConversionError(f"{where}: the encoder uses the fixed sin-cos table; config['grid'] is needed "
                                      "to write it")
            body = sincos_position_table(tuple(grid), width, axis_order=enc.get("pos_axis_order"))
            if has_cls:
                body = np.concatenate([np.zeros((1, width), np.float32), body], axis=0)
            table = body[None].astype(kernel.dtype)
    if table is not None:
        if has_cls and not slot:
            # The layout adds no position to the cls token: fold our cls slot into the token (same forward).
            cls = (cls + table[:, :1]).astype(cls.dtype)
            table = table[:, 1:]
        out[keys.pos] = np.ascontiguousarray(table)
    if has_cls:
        out[keys.cls] = cls
    transformer = _require_tree(vit, "transformer", where)
    out.update(_blocks_to_torch(transformer, keys.blocks, keys.block_names, where))
    depth = sum(1 for k in transformer if re.fullmatch(r"block_\d+", k))
    if "norm" in transformer:
        stem = keys.norm.format(depth=depth)
        out[f"{stem}.weight"] = _require(transformer, "norm/scale", where)
        out[f"{stem}.bias"] = _require(transformer, "norm/bias", where)
    return out


def _require_tree(tree: Mapping, key: str, where: str) -> Mapping:
    node = _get(tree, key)
    if not isinstance(node, Mapping):
        raise ConversionError(f"{where}: parameter subtree {key!r} is missing from the JAX params")
    return node


# --------------------------------------------------------------------------
# MAE decoder import / export.
# --------------------------------------------------------------------------
def _decoder_to_jax(reader: _Reader, keys: DecoderKeys, hints: Mapping, config: Optional[Mapping], assumed: list,
                    enc: dict, info: dict, options: dict) -> tuple[dict, dict]:
    layout = reader.layout
    dec_cfg = dict((config or {}).get("decoder", {}))
    width_in = enc["width"]
    eshape = reader.shape(f"{keys.embed}.weight")
    if eshape is None:
        raise ConversionError(f"{layout}: no decoder embedding ({keys.embed}.weight) in the checkpoint")
    width = int(dec_cfg.get("width", eshape[0]))
    depth = int(dec_cfg.get("depth", _count_blocks(reader, keys.blocks, keys.block_names)))
    fc1 = f"{keys.blocks}.0.{keys.block_names['fc1']}.weight"
    mlp_dim = int(dec_cfg.get("mlp_dim") or (reader.shape(fc1) or (4 * width,))[0])
    heads = _hint(hints, config, "decoder_heads") or dec_cfg.get("num_heads")
    if heads is None:
        heads = keys.default_heads(width) if callable(keys.default_heads) else keys.default_heads
        if width % heads:
            heads = default_heads(width)
        assumed.append(f"decoder num_heads={heads} (not stored in the weights; pass decoder_heads=)")
    heads = int(heads)
    if width % heads:
        raise ConversionError(f"{layout}: decoder width {width} is not divisible by decoder_heads={heads}")
    dec_qkv_bias = f"{keys.blocks}.0.{keys.block_names['qkv']}.bias" in reader if depth else enc["qkv_bias"]
    if dec_qkv_bias != enc["qkv_bias"]:
        raise ConversionError(f"{layout}: the decoder's qkv bias ({dec_qkv_bias}) differs from the encoder's "
                              f"({enc['qkv_bias']}); the project's MAE uses one setting for both")
    params: dict = {}
    w = reader.take(f"{keys.embed}.weight", (width, width_in))
    _put(params, "embed/kernel", None if w is None else linear_to_dense(w))
    embed_bias = f"{keys.embed}.bias" in reader
    options["decoder_embed_bias"] = embed_bias
    if embed_bias:
        _put(params, "embed/bias", reader.take(f"{keys.embed}.bias", (width,)))
    elif w is not None:
        _put(params, "embed/bias", np.zeros((width,), w.dtype))
        assumed.append(f"{keys.embed} has no bias: zeros used")
    _put(params, "mask_token", reader.take(keys.mask, (1, 1, width)))
    grid, has_cls = info["grid"], enc["cls_token"]
    pos_shape = reader.shape(keys.pos)
    pos_mode = dec_cfg.get("pos_embed")
    if pos_shape is not None:
        n = pos_shape[1]
        slot = keys.pos_cls_slot
        if slot is None:
            slot = has_cls and (grid is None and infer_grid(n - 1, info["ndim"]) is not None or
                                grid is not None and n == math.prod(grid) + 1)
        options["decoder_pos_cls_slot"] = bool(slot)
        table = reader.take(keys.pos, (1, n, width))
        if grid is not None and n - int(slot) != math.prod(grid):
            raise ConversionError(f"{layout}: key {keys.pos!r} has shape {pos_shape}, the model expects "
                                  f"{(1, int(slot) + math.prod(grid), width)} for grid {grid}")
        # The project's MAE builds its decoder table with the encoder's axis order.
        order = enc.get("pos_axis_order")
        if pos_mode is None:
            orders = [order] if enc["pos_embed"] == "sincos" else _axis_orders(info["ndim"], order)
            found = _find_sincos_order(table, grid, width, int(slot), orders)
            pos_mode = "learn" if found is False else "sincos"
            if found is not False and found != order:
                order = found
                if found is None:
                    enc.pop("pos_axis_order", None)
                else:
                    enc["pos_axis_order"] = tuple(found)
        if pos_mode == "learn":
            if slot and not has_cls:
                raise ConversionError(f"{layout}: {keys.pos} has a cls slot but the encoder has no cls token")
            if has_cls and not slot:
                table = np.concatenate([np.zeros((1, 1, width), table.dtype), table], axis=1)
            _put(params, "pos_embedding", table)
        elif not _sincos_matches(table, grid, width, int(slot), order):
            raise ConversionError(f"{layout}: {keys.pos} is not the fixed sin-cos table of the model config "
                                  "(decoder pos_embed='sincos')")
    else:
        reader.missing.append(keys.pos)
        pos_mode = pos_mode or "sincos"
    params["transformer"] = _blocks_to_jax(reader, keys.blocks, keys.block_names, depth, width, heads, mlp_dim,
                                           dec_qkv_bias)
    norm_stem = keys.norm.format(depth=depth)
    _put(params, "transformer/norm/scale", reader.take(f"{norm_stem}.weight", (width,)))
    _put(params, "transformer/norm/bias", reader.take(f"{norm_stem}.bias", (width,)))
    out_dim = math.prod(enc["patch_size"]) * info["in_channels"]
    w = reader.take(f"{keys.pred}.weight", (out_dim, width))
    _put(params, "pred/kernel", None if w is None else linear_to_dense(w))
    _put(params, "pred/bias", reader.take(f"{keys.pred}.bias", (out_dim,)))
    dec = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim, pos_embed=pos_mode)
    return params, dec


def _decoder_to_torch(dec: Mapping, keys: DecoderKeys, config: Mapping, has_cls: bool, where: str,
                      default_slot: Optional[bool] = None) -> StateDict:
    opts = _options(config, where)
    out: StateDict = {}
    kernel = _require(dec, "embed/kernel", where)
    width = kernel.shape[1]
    out[f"{keys.embed}.weight"] = dense_to_linear(kernel)
    bias = _require(dec, "embed/bias", where)
    if opts.get("decoder_embed_bias", True):
        out[f"{keys.embed}.bias"] = bias
    elif np.any(bias != 0):
        raise ConversionError(f"{where}: {keys.embed} has no bias in this layout but decoder/embed/bias is non-zero")
    out[keys.mask] = _require(dec, "mask_token", where)
    if keys.pos_cls_slot is not None:
        slot = keys.pos_cls_slot
    else:
        slot = bool(opts.get("decoder_pos_cls_slot", has_cls if default_slot is None else default_slot))
    slot = slot and has_cls
    table = _get(dec, "pos_embedding")
    if table is None:
        grid = config.get("grid")
        if grid is None:
            raise ConversionError(f"{where}: the decoder uses the fixed sin-cos table; config['grid'] is needed")
        order = dict(config.get("encoder", {})).get("pos_axis_order")
        table = sincos_position_table(tuple(grid), width, axis_order=order)[None].astype(kernel.dtype)
        if has_cls:
            table = np.concatenate([np.zeros((1, 1, width), table.dtype), table], axis=1)
    table = np.asarray(table)
    if has_cls and not slot:
        if np.any(table[:, :1] != 0):
            raise ConversionError(f"{where}: {keys.pos} of this layout has no cls slot, but the decoder's "
                                  "pos_embedding has a non-zero one (not representable)")
        table = table[:, 1:]
    out[keys.pos] = np.ascontiguousarray(table)
    transformer = _require_tree(dec, "transformer", where)
    out.update(_blocks_to_torch(transformer, keys.blocks, keys.block_names, where))
    depth = sum(1 for k in transformer if re.fullmatch(r"block_\d+", k))
    stem = keys.norm.format(depth=depth)
    out[f"{stem}.weight"] = _require(transformer, "norm/scale", where)
    out[f"{stem}.bias"] = _require(transformer, "norm/bias", where)
    out[f"{keys.pred}.weight"] = dense_to_linear(_require(dec, "pred/kernel", where))
    out[f"{keys.pred}.bias"] = _require(dec, "pred/bias", where)
    return out


# --------------------------------------------------------------------------
# Layouts.
# --------------------------------------------------------------------------
def _check_hints(hints: Mapping) -> None:
    bad = sorted(set(hints) - set(HINT_KEYS))
    if bad:
        raise TypeError(f"unknown conversion hints {bad}; known: {list(HINT_KEYS)}")


def _base_config(layout: str, model: str, enc: dict, info: dict, options: dict, assumed: list) -> dict:
    return dict(layout=layout, model=model, ndim=info["ndim"], in_channels=info["in_channels"],
                grid=None if info["grid"] is None else tuple(info["grid"]), encoder=enc,
                layout_options=dict(info["options"], **options), assumed=list(assumed))


class Layout:
    """A PyTorch ViT-family layout: ``to_jax`` / ``to_torch`` (see the module docstring)."""

    name: str = ""
    model: str = "vit"

    def to_jax(self, state_dict: Mapping[str, Any], *, strict: bool = False, config: Optional[Mapping] = None,
               **hints) -> tuple[dict, dict, ConversionReport]:
        raise NotImplementedError

    def to_torch(self, params: Any, config: Optional[Mapping] = None) -> StateDict:
        raise NotImplementedError

    def _start(self, state_dict, hints) -> tuple["_Reader", list, dict]:
        """Checked hints, a reader that already ignores this layout's known-unused keys, empty notes."""
        _check_hints(hints)
        reader = _Reader(state_dict, self.name)
        for pattern in getattr(self, "ignore_patterns", ()):
            reader.ignore_matching(pattern)
        return reader, [], {}

    def __repr__(self) -> str:
        return f"<layout {self.name}>"


class _MAELayout(Layout):
    model = "mae"
    enc_keys: EncoderKeys
    dec_keys: DecoderKeys
    ignore_patterns: tuple = ()

    def to_jax(self, state_dict, *, strict=False, config=None, **hints):
        reader, assumed, options = self._start(state_dict, hints)
        enc_params, enc, info = _encoder_to_jax(reader, self.enc_keys, hints, config, assumed, fixed_pos=True)
        dec_params, dec = _decoder_to_jax(reader, self.dec_keys, hints, config, assumed, enc, info, options)
        cfg = _base_config(self.name, "mae", enc, info, options, assumed)
        cfg["decoder"] = dec
        report = reader.report().check(strict)
        return {"encoder": enc_params, "decoder": dec_params}, cfg, report

    def _default_slot(self, params) -> Optional[bool]:
        return None

    def to_torch(self, params, config=None):
        params = _plain(params)
        config = dict(config or {})
        slot = self._default_slot(params)
        out = _encoder_to_torch(_require_tree(params, "encoder", self.name), self.enc_keys, config, self.name, slot)
        has_cls = _get(params, "encoder/cls_token") is not None
        out.update(_decoder_to_torch(_require_tree(params, "decoder", self.name), self.dec_keys, config, has_cls,
                                     self.name, slot))
        return out


class FairMAELayout(_MAELayout):
    name = "fair-mae"
    enc_keys = EncoderKeys("patch_embed.proj", None, "pos_embed", True, "cls_token", "blocks", TIMM_BLOCK, "norm",
                           1e-6)
    dec_keys = DecoderKeys("decoder_embed", "mask_token", "decoder_pos_embed", True, "decoder_blocks", TIMM_BLOCK,
                           "decoder_norm", "decoder_pred", 16)


def _selfmedmae_decoder_heads(width: int) -> int:
    return {384: 12, 256: 8, 128: 3}.get(width, default_heads(width))


class SelfMedMAELayout(_MAELayout):
    name = "selfmedmae-mae3d"
    enc_keys = EncoderKeys("encoder.patch_embed.proj", None, "encoder_pos_embed", None, "encoder.cls_token",
                           "encoder.blocks", TIMM_BLOCK, "encoder.norm", 1e-6)
    dec_keys = DecoderKeys("encoder_to_decoder", "mask_token", "decoder_pos_embed", None, "decoder.blocks",
                           TIMM_BLOCK, "decoder.norm", "decoder.head", _selfmedmae_decoder_heads)

    def _default_slot(self, params) -> Optional[bool]:
        # 3-D MAE3D builds its tables without a cls slot (num_tokens=0); the 2-D MAE with one.
        return np.ndim(_require(params, "encoder/patch_embed/proj/kernel", self.name)) == 4


def _monai_decoder_heads(width: int) -> int:
    return 12 if width % 12 == 0 else default_heads(width)


class MonaiMAELayout(_MAELayout):
    name = "monai-mae"
    enc_keys = EncoderKeys("patch_embedding.patch_embeddings", "patch_embedding.patch_embeddings.1",
                           "patch_embedding.position_embeddings", False, "cls_token", "blocks", MONAI_BLOCK,
                           "blocks.{depth}", 1e-5)
    dec_keys = DecoderKeys("decoder_embed", "mask_tokens", "decoder_pos_embedding", False, "decoder_blocks",
                           MONAI_BLOCK, "decoder_blocks.{depth}", "decoder_pred", _monai_decoder_heads)
    ignore_patterns = (r"(decoder_)?blocks\.\d+\.(norm_cross_attn|cross_attn)\..*",)


class _ViTLayout(Layout):
    """Encoder plus optional classification head."""

    enc_keys: EncoderKeys
    ignore_patterns: tuple = ()

    def _head_to_jax(self, reader, enc, hints, config, assumed, options) -> tuple[dict, Optional[dict]]:
        return {}, None

    def _head_to_torch(self, params, config) -> StateDict:
        return {}

    def to_jax(self, state_dict, *, strict=False, config=None, **hints):
        reader, assumed, options = self._start(state_dict, hints)
        enc_params, enc, info = _encoder_to_jax(reader, self.enc_keys, hints, config, assumed, fixed_pos=False)
        head_params, head = self._head_to_jax(reader, enc, hints, config, assumed, options)
        model = "classifier" if head is not None else "vit"
        cfg = _base_config(self.name, model, enc, info, options, assumed)
        params = {"encoder": enc_params, **head_params}
        if head is not None:
            cfg["head"] = head
        report = reader.report().check(strict)
        return params, cfg, report

    def to_torch(self, params, config=None):
        params = _plain(params)
        config = dict(config or {})
        vit = params["encoder"] if "encoder" in params else params
        out = _encoder_to_torch(vit, self.enc_keys, config, self.name)
        out.update(self._head_to_torch(params, config))
        return out


class TimmViTLayout(_ViTLayout):
    name = "timm-vit"
    enc_keys = EncoderKeys("patch_embed.proj", None, "pos_embed", None, "cls_token", "blocks", TIMM_BLOCK, "norm",
                           1e-6)

    def _head_to_jax(self, reader, enc, hints, config, assumed, options):
        head_cfg = dict((config or {}).get("head", {}))
        width = enc["width"]
        params: dict = {}
        has_fc_norm = "fc_norm.weight" in reader
        if has_fc_norm:
            _put(params, "fc_norm/scale", reader.take("fc_norm.weight", (width,)))
            _put(params, "fc_norm/bias", reader.take("fc_norm.bias", (width,)))
        if "head.weight" not in reader:
            if has_fc_norm:
                raise ConversionError(f"{self.name}: fc_norm without a head; not a classifier checkpoint")
            return {}, None
        num_classes = int(head_cfg.get("num_classes", reader.shape("head.weight")[0]))
        w = reader.take("head.weight", (num_classes, width))
        _put(params, "head/kernel", None if w is None else linear_to_dense(w))
        _put(params, "head/bias", reader.take("head.bias", (num_classes,)))
        pooling = hints.get("pooling") or head_cfg.get("pooling")
        if pooling is None:
            pooling = "gap" if has_fc_norm else "cls"
            if not has_fc_norm:
                assumed.append("pooling='cls' (timm's global_pool is not stored; pass pooling='gap' for average)")
        return params, dict(num_classes=num_classes, pooling=pooling, fc_norm=has_fc_norm, post_activation=None)

    def _head_to_torch(self, params, config):
        out: StateDict = {}
        if "fc_norm" in params:
            out["fc_norm.weight"] = _require(params, "fc_norm/scale", self.name)
            out["fc_norm.bias"] = _require(params, "fc_norm/bias", self.name)
        if "head" in params:
            out["head.weight"] = dense_to_linear(_require(params, "head/kernel", self.name))
            out["head.bias"] = _require(params, "head/bias", self.name)
        return out


class MonaiViTLayout(_ViTLayout):
    name = "monai-vit"
    enc_keys = EncoderKeys("patch_embedding.patch_embeddings", "patch_embedding.patch_embeddings.1",
                           "patch_embedding.position_embeddings", False, "cls_token", "blocks", MONAI_BLOCK, "norm",
                           1e-5)
    ignore_patterns = (r"blocks\.\d+\.(norm_cross_attn|cross_attn)\..*",)

    def _head_to_jax(self, reader, enc, hints, config, assumed, options):
        head_cfg = dict((config or {}).get("head", {}))
        width = enc["width"]
        if "classification_head.0.weight" in reader:
            stem, act = "classification_head.0", "tanh"
        elif "classification_head.weight" in reader:
            stem, act = "classification_head", None
        else:
            return {}, None
        if not enc["cls_token"]:
            raise ConversionError(f"{self.name}: {stem} without cls_token; MONAI classifies the cls token")
        num_classes = int(head_cfg.get("num_classes", reader.shape(f"{stem}.weight")[0]))
        params: dict = {}
        w = reader.take(f"{stem}.weight", (num_classes, width))
        _put(params, "head/kernel", None if w is None else linear_to_dense(w))
        _put(params, "head/bias", reader.take(f"{stem}.bias", (num_classes,)))
        return params, dict(num_classes=num_classes, pooling="cls", fc_norm=False, post_activation=act)

    def _head_to_torch(self, params, config):
        if "head" not in params:
            return {}
        head = dict(config.get("head", {}))
        if head.get("pooling", "cls") != "cls" or "fc_norm" in params:
            raise ConversionError(f"{self.name}: MONAI's ViT classifies the cls token after the final norm; "
                                  "a 'gap'/fc_norm head cannot be written in this layout")
        stem = "classification_head.0" if head.get("post_activation", "tanh") == "tanh" else "classification_head"
        return {f"{stem}.weight": dense_to_linear(_require(params, "head/kernel", self.name)),
                f"{stem}.bias": _require(params, "head/bias", self.name)}


class SelfMedMAEUNETRLayout(Layout):
    """SelfMedMAE ``UNETR3D``: the encoder is converted here, ``decoder.*`` by :mod:`.monai_unetr` when present."""

    name = "selfmedmae-unetr"
    model = "unetr"
    enc_keys = EncoderKeys("encoder.patch_embed.proj", None, "encoder.pos_embed", None, "encoder.cls_token",
                           "encoder.blocks", TIMM_BLOCK, "encoder.norm", 1e-6)

    def to_jax(self, state_dict, *, strict=False, config=None, **hints):
        _check_hints(hints)
        reader = _Reader(state_dict, self.name)
        assumed: list = []
        vit, enc, info = _encoder_to_jax(reader, self.enc_keys, hints, config, assumed, fixed_pos=False)
        cfg = _base_config(self.name, "unetr", enc, info, {}, assumed)
        params: dict = {"vit": vit}
        decoder_sd = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        extra_missing: list = []
        if decoder_sd:
            try:
                dec_params, dec_report = _convert_unetr_decoder(decoder_sd, vit, enc, info["grid"])
            except (ImportError, ConversionError) as err:
                assumed.append(f"decoder.* (UNETR decoder) left unconverted: {err}")
            else:
                params.update({k: v for k, v in dec_params.items() if k != "vit"})
                leftovers = {"decoder." + k for k in dec_report.unused if not k.startswith("vit.")}
                reader.used.update(k for k in ("decoder." + k for k in decoder_sd) if k not in leftovers)
                extra_missing = ["decoder." + k for k in dec_report.missing if not k.startswith("vit.")]
                cfg["unetr"] = dict(out_channels=int(np.shape(dec_params["out"]["kernel"])[-1]),
                                    feature_size=int(np.shape(dec_params["encoder1"]["conv1"]["kernel"])[-1]))
        report = reader.report(extra_missing)
        cfg["assumed"] = assumed
        return params, cfg, report.check(strict)

    def to_torch(self, params, config=None):
        params = _plain(params)
        config = dict(config or {})
        vit = params.get("vit", params.get("encoder"))
        if vit is None:
            raise ConversionError(f"{self.name}: params need a 'vit' (or 'encoder') subtree")
        out = _encoder_to_torch(vit, self.enc_keys, config, self.name)
        decoder = {k: v for k, v in params.items() if k not in ("vit", "encoder")}
        if decoder:
            try:
                from medmae_jax.interop.monai_unetr import jax_to_monai_unetr
            except ImportError as err:
                raise ConversionError(f"{self.name}: writing the UNETR decoder needs "
                                      "medmae_jax.interop.monai_unetr") from err
            sd = jax_to_monai_unetr(_strip_vit_for_monai(params))
            out.update({"decoder." + k: v for k, v in sd.items() if not k.startswith("vit.")})
        return out


def _convert_unetr_decoder(decoder_sd: Mapping[str, Any], vit: Mapping, enc: Mapping, grid):
    """MONAI-UNETR decoder keys -> (params, report) via :mod:`.monai_unetr`.

    That converter reads a whole MONAI UNETR; the ViT part is written here from the
    already converted encoder (without its cls token, which MONAI's UNETR lacks) so the
    decoder's shapes are checked against it.
    """
    from medmae_jax.interop.monai_unetr import monai_unetr_to_jax

    vit_sd = MonaiViTLayout().to_torch({"encoder": _strip_vit_for_monai({"vit": vit})["vit"]}, {})
    full = {"vit." + k: v for k, v in vit_sd.items()}
    full.update(decoder_sd)
    img_size = None if grid is None else tuple(16 * int(g) for g in grid)
    return monai_unetr_to_jax(full, strict=False, num_heads=enc["num_heads"], img_size=img_size)


def _strip_vit_for_monai(params: Mapping) -> dict:
    """A UNETR tree whose ViT MONAI can hold (no cls token), so the decoder exporter can run on it."""
    out = dict(params)
    vit = dict(out.get("vit", {}))
    vit.pop("cls_token", None)
    if "pos_embedding" in vit:
        vit["pos_embedding"] = np.asarray(vit["pos_embedding"])[:, 1:]
    out["vit"] = vit
    return out


class MonaiUNETRLayout(Layout):
    """MONAI ``UNETR``: delegated to :mod:`medmae_jax.interop.monai_unetr`."""

    name = "monai-unetr"
    model = "unetr"

    def to_jax(self, state_dict, *, strict=False, config=None, **hints):
        from medmae_jax.interop.monai_unetr import import_monai_unetr

        _check_hints(hints)
        return import_monai_unetr(state_dict, strict=strict, config=config, **hints)

    def to_torch(self, params, config=None):
        from medmae_jax.interop.monai_unetr import jax_to_monai_unetr

        return jax_to_monai_unetr(params)


LAYOUT_CLASSES = {cls.name: cls for cls in (FairMAELayout, TimmViTLayout, MonaiViTLayout, MonaiMAELayout,
                                            SelfMedMAELayout, SelfMedMAEUNETRLayout, MonaiUNETRLayout)}


def get_layout(name: str) -> Layout:
    """The :class:`Layout` called ``name`` (e.g. ``'fair-mae'``)."""
    if name not in LAYOUT_CLASSES:
        raise ConversionError(f"unknown layout {name!r}; known: {sorted(LAYOUT_CLASSES)}")
    return LAYOUT_CLASSES[name]()


def to_jax(state_dict: Mapping[str, Any], layout: Optional[str] = None, *, strict: bool = False,
           config: Optional[Mapping] = None, **hints) -> tuple[dict, dict, ConversionReport]:
    """Convert a state dict (layout detected when not given) into the project's params + implied config."""
    name = layout or (config or {}).get("layout") or detect_layout(state_dict)
    return get_layout(name).to_jax(state_dict, strict=strict, config=config, **hints)


def to_torch(params: Any, config: Mapping, layout: Optional[str] = None) -> StateDict:
    """Write params back in ``layout`` (default: the layout ``config`` came from)."""
    name = layout or config.get("layout")
    if not name:
        raise ConversionError("to_torch needs a layout: pass layout= or a config from to_jax")
    return get_layout(name).to_torch(params, config)


def import_checkpoint(path, layout: Optional[str] = None, *, strict: bool = False, config: Optional[Mapping] = None,
                      trust_pickle: bool = False, **hints) -> tuple[dict, dict, ConversionReport]:
    """Read a checkpoint file (.pth/.safetensors/.npz), detect its layout, convert: ``(params, config, report)``."""
    state_dict = load_state_dict(path, trust_pickle=trust_pickle)
    return to_jax(state_dict, layout, strict=strict, config=config, **hints)


def export_checkpoint(params: Any, config: Mapping, path, layout: Optional[str] = None):
    """Write params as a PyTorch-layout checkpoint file (.safetensors, .npz, or .pth with torch installed)."""
    return save_state_dict(to_torch(params, config, layout), path)


def conversion_hints(config: Mapping) -> dict:
    """Hints that make ``to_jax`` rebuild exactly ``config`` (what the weights alone cannot tell)."""
    hints = dict(num_heads=config["encoder"]["num_heads"], layer_norm_eps=config["encoder"]["layer_norm_eps"])
    if config.get("grid") is not None:
        hints["grid"] = tuple(config["grid"])
    if config["encoder"].get("patch_embed") == "perceptron":
        hints.update(patch_size=tuple(config["encoder"]["patch_size"]), in_channels=config["in_channels"])
    if config.get("decoder"):
        hints["decoder_heads"] = config["decoder"]["num_heads"]
    if config.get("head"):
        hints["pooling"] = config["head"]["pooling"]
    return hints


def model_kwargs(config: Mapping) -> dict:
    """Keyword arguments of the project model a config describes (ViT / MAE / ViTClassifier)."""
    enc = dict(config["encoder"])
    enc["patch_size"] = tuple(enc["patch_size"])
    model = config.get("model", "vit")
    if model == "mae":
        dec = config["decoder"]
        return dict(encoder=enc, decoder_width=dec["width"], decoder_depth=dec["depth"],
                    decoder_heads=dec["num_heads"], decoder_mlp_dim=dec["mlp_dim"],
                    decoder_pos_embed=dec.get("pos_embed", "sincos"))
    if model == "classifier":
        head = config["head"]
        return dict(encoder=enc, num_classes=head["num_classes"], pooling=head["pooling"],
                    fc_norm=head.get("fc_norm"), post_activation=head.get("post_activation"))
    if model == "vit":
        return enc
    raise ConversionError(f"no model kwargs for model kind {model!r}")


def build_model(config: Mapping, **overrides):
    """The flax module a config describes (``MAE``, ``ViTClassifier`` or ``ViT``)."""
    kw = model_kwargs(config)
    kw.update(overrides)
    model = config.get("model", "vit")
    if model == "mae":
        from medmae_jax.models.mae import MAE

        return MAE(**kw)
    if model == "classifier":
        from medmae_jax.models.classifier import ViTClassifier

        return ViTClassifier(**kw)
    from medmae_jax.models.vit import ViT

    return ViT(**kw)


def copy_config(config: Mapping) -> dict:
    return copy.deepcopy(dict(config))
