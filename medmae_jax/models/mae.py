"""Masked autoencoder: ViT encoder on visible tokens + lightweight Transformer decoder.

Follows the official MAE (He et al.) and SelfMedMAE's MAE3D: fixed sin-cos
position tables, a cls token, the encoder sees only visible tokens, the decoder
re-inserts a learned mask token at the hidden positions, and the loss is the
mean squared error on masked patches against per-patch normalised targets.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medmae_jax.models import masking as masking_lib
from medmae_jax.models.precision import Dense, at_least_float32
from medmae_jax.models.vit import ViT, _axes, _trunc_normal, patchify, sincos_position_table, transformer_class

Dtype = Any


class MAEDecoder(nn.Module):
    """Embeds encoder tokens, restores the full token order with mask tokens, predicts patch pixels."""

    patch_size: Sequence[int]
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_dim: Optional[int] = None  # default 4 x width
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pos_axis_order: Optional[Sequence[int]] = None  # sin-cos channel blocks per axis (see vit.SINCOS_AXIS_ORDER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # 'sincos': fixed table (MAE); 'learn': a parameter ``pos_embedding`` (1, cls+L, width) initialised to that
    # table, for checkpoints whose decoder table is learned or differs from ours (MONAI's 3-D ordering).
    pos_embed: str = "sincos"
    remat: bool | str = False  # remat policy of the decoder blocks
    attention: str = "auto"    # attention implementation (see vit.Attention)
    scan: bool = False         # nn.scan over the decoder blocks (see vit.transformer_class)

    @nn.compact
    def __call__(self, latent: jax.Array, restore_indices: jax.Array, grid: Sequence[int], has_cls: bool,
                 out_channels: int, train: bool = False) -> jax.Array:
        x = Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embed",
                     kernel_init=_axes(nn.initializers.xavier_uniform(), ("embed", "decoder_embed")),
                     bias_init=_axes(nn.initializers.zeros, ("decoder_embed",)))(latent)
        prefix = int(has_cls)
        b, num_tokens = restore_indices.shape
        mask_token = self.param("mask_token", _axes(_trunc_normal(0.02), (None, None, "decoder_embed")),
                                (1, 1, self.width), self.param_dtype).astype(x.dtype)
        visible = x[:, prefix:]
        filler = jnp.broadcast_to(mask_token, (b, num_tokens - visible.shape[1], self.width))
        tokens = masking_lib.gather_tokens(jnp.concatenate([visible, filler], axis=1), restore_indices)
        table = jnp.asarray(sincos_position_table(grid, self.width, axis_order=self.pos_axis_order))[None]
        cls = x[:, :1]
        if self.pos_embed == "learn":
            init_table = jnp.concatenate([jnp.zeros((1, prefix, self.width), table.dtype), table], axis=1)
            pos = self.param("pos_embedding", _axes(lambda *_: init_table.astype(self.param_dtype),
                                                    (None, None, "decoder_embed")),
                             (1, prefix + num_tokens, self.width), self.param_dtype)
            table = pos[:, prefix:]
            if has_cls:
                cls = cls + pos[:, :1].astype(x.dtype)
        elif self.pos_embed != "sincos":
            raise ValueError(f"unknown decoder pos_embed {self.pos_embed!r}; use 'sincos' or 'learn'")
        tokens = tokens + table.astype(x.dtype)
        if has_cls:
            tokens = jnp.concatenate([cls, tokens], axis=1)
        tokens, _ = transformer_class(self.scan, self.depth)(
            self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.qkv_bias,
            layer_norm_eps=self.layer_norm_eps, remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
            attention=self.attention, scan=self.scan, name="transformer")(tokens, train)
        pred = Dense(math.prod(self.patch_size) * out_channels, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="pred",
                        kernel_init=_axes(nn.initializers.xavier_uniform(), ("decoder_embed", "patch")),
                        bias_init=_axes(nn.initializers.zeros, ("patch",)))(tokens)
        return pred[:, prefix:]


class MAE(nn.Module):
    """Masked autoencoder over 2-D or 3-D inputs.

    Call with images ``(B, *spatial, C)``; the mask comes from the ``masking``
    rng stream unless an explicit :class:`~medmae_jax.models.masking.Masking`
    is passed. Returns ``(pred, masking)`` with ``pred`` (B, L, prod(patch)*C)
    in :func:`~medmae_jax.models.vit.patchify` order (float32, or float64 in the float64 mode).
    """

    encoder: dict                 # keyword arguments of ViT (patch_size, width, depth, ...)
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: Optional[int] = None
    mask_ratio: float = 0.75
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decoder_pos_embed: str = "sincos"  # 'sincos' (fixed) | 'learn' (see MAEDecoder.pos_embed)

    def setup(self):
        kw = dict(self.encoder)
        kw.setdefault("pos_embed", "sincos")
        self.vit = ViT(**kw, dtype=self.dtype, param_dtype=self.param_dtype, name="encoder")
        self.decoder = MAEDecoder(tuple(kw["patch_size"]), self.decoder_width, self.decoder_depth,
                                  self.decoder_heads, self.decoder_mlp_dim, kw.get("qkv_bias", True),
                                  kw.get("layer_norm_eps", 1e-6), pos_axis_order=kw.get("pos_axis_order"),
                                  dtype=self.dtype, param_dtype=self.param_dtype, pos_embed=self.decoder_pos_embed,
                                  remat=kw.get("remat", False), attention=kw.get("attention", "auto"),
                                  scan=kw.get("scan_blocks", False))

    def __call__(self, images: jax.Array, *, train: bool = False,
                 masking: Optional[masking_lib.Masking] = None):
        grid = self.vit.grid(images.shape[1:-1])
        num_tokens = math.prod(grid)
        if masking is None:
            masking = masking_lib.random_masking(self.make_rng("masking"), images.shape[0], num_tokens,
                                                 self.mask_ratio)
        latent, _ = self.vit(images, train=train, keep_indices=masking.keep_indices)
        pred = self.decoder(latent, masking.restore_indices, grid, self.vit.cls_token, images.shape[-1], train)
        return at_least_float32(pred), masking


def patch_targets(images: jax.Array, patch_size: Sequence[int], norm_pix: bool, eps: float = 1e-6) -> jax.Array:
    """Reconstruction targets (B, L, prod(patch)*C); per-patch normalised when ``norm_pix``."""
    target = patchify(at_least_float32(images), patch_size)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + eps)
    return target


def mae_loss_per_example(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """(B,) mean squared error over each example's masked patches (their mean is :func:`mae_loss` when every
    example masks the same number of patches, as random masking does)."""
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    return jnp.sum(per_patch * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error per patch, averaged over the masked patches only."""
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def trivial_loss(target: jax.Array, mask: jax.Array) -> jax.Array:
    """``mae_loss`` of the trivial predictor that outputs each masked patch's own mean: the bar a model must beat.

    With norm-pix targets that is predicting zeros (loss = mean of var / (var + eps) over the masked patches, ~1
    on textured patches, ~0 on flat ones); with raw targets, the mean over masked patches of each patch's variance.
    """
    return mae_loss(jnp.broadcast_to(target.mean(axis=-1, keepdims=True), target.shape), target, mask)
