"""Models from ``config.model``, and raw batches -> model inputs; shared by every task."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from medmae_jax.models.mae import MAE
from medmae_jax.models.precision import at_least_float32, resolve_dtype
from medmae_jax.models.vit import vit_kwargs


def dtype(name: str):
    """Config dtype name -> jnp dtype; 'auto' is bfloat16 on GPU/TPU and float32 on CPU."""
    return resolve_dtype(name)


def encoder_kwargs(m: Mapping) -> dict:
    """ViT keyword arguments from ``config.model`` (variant plus explicit > 0 overrides)."""
    kw = vit_kwargs(m["variant"].split("/")[0], width=m["width"] or None, depth=m["depth"] or None,
                    num_heads=m["num_heads"] or None, mlp_dim=m["mlp_dim"] or None)
    patch = m["patch_size"]
    if not patch and "/" in m["variant"]:
        patch = int(m["variant"].split("/")[1])
    kw["patch_size"] = (patch,) * m["spatial_dims"] if isinstance(patch, int) else tuple(patch)
    kw.update(qkv_bias=m["qkv_bias"], layer_norm_eps=m["layer_norm_eps"], drop_path=m["drop_path"],
              dropout=m["dropout"], remat=m["remat"], attention=m.get("attention", "auto"),
              scan_blocks=bool(m.get("scan_blocks", False)))
    return kw


def build_mae(m: Mapping) -> MAE:
    kw = encoder_kwargs(m)
    kw.update(pos_embed="sincos", drop_path=0.0)
    return MAE(encoder=kw, decoder_width=m["decoder_width"], decoder_depth=m["decoder_depth"],
               decoder_heads=m["decoder_heads"], mask_ratio=m["mask_ratio"], dtype=dtype(m["dtype"]),
               param_dtype=dtype(m["param_dtype"]))


def model_input(images: jax.Array, config) -> jax.Array:
    """uint8 images -> normalised float32 (float images: at least float32); gray repeated to the model's channel
    count."""
    if images.dtype == jnp.uint8:
        x = (images.astype(jnp.float32) / 255.0 - config.data.pixel_mean) / config.data.pixel_std
    else:
        x = at_least_float32(images)
    want = config.model.in_channels
    if x.shape[-1] != want:
        if x.shape[-1] != 1:
            raise ValueError(f"data has {x.shape[-1]} channels, model expects {want}")
        x = jnp.repeat(x, want, axis=-1)
    return x
