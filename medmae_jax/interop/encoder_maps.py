"""ViT encoders and MAE decoders between a torch state dict (through its key map) and the project's trees.
"""


from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.interop.key_maps import (
    DecoderKeys,
    EncoderKeys,
    _blocks_to_jax,
    _blocks_to_torch,
    _count_blocks,
    _hint,
    _Reader,
)
from medmae_jax.interop.weight_transforms import (
    StateDict,
    _axis_orders,
    _find_sincos_order,
    _get,
    _put,
    _require,
    _sincos_matches,
    conv_to_flax,
    conv_to_torch,
    default_heads,
    dense_to_linear,
    infer_grid,
    linear_to_dense,
)
from medmae_jax.models.vit import sincos_position_table


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
