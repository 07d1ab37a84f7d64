"""UNETR (Hatamizadeh et al., arXiv 2103.10504) on the project's ViT, layer for layer MONAI's ``UNETR``.

A ViT encoder with patch 16 feeds a convolutional decoder: three intermediate
block outputs and the final normed output are reshaped to the patch grid and
upsampled with transposed convolutions (kernel 2, stride 2) back to the input
resolution, U-Net style, with residual conv blocks (3x3x3 convs without bias,
InstanceNorm without affine, eps 1e-5, LeakyReLU 0.01). The same code serves
2-D ``(B, H, W, C)`` and 3-D ``(B, D, H, W, C)`` inputs; outputs are logits of
shape ``(B, *spatial, out_channels)``.

Parameter names mirror MONAI's module names (``vit``, ``encoder1``..``encoder4``,
``decoder5``..``decoder2``, ``out``) so :mod:`medmae_jax.interop.monai_unetr`
converts MONAI checkpoints one key to one parameter.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medmae_jax.models.precision import at_least_float32
from medmae_jax.models.vit import ViT, _axes

Dtype = Any

# Indices into the ViT's list of block outputs (0-based) used as skip connections.
MONAI_SKIP_LAYERS = (3, 6, 9)   # MONAI's hidden_states_out[3], [6], [9]: outputs of blocks 4, 7, 10
PAPER_SKIP_LAYERS = (2, 5, 8)   # the paper's z3, z6, z9 read as 1-based block numbers (z12 = final output)

# ViT settings of MONAI's UNETR encoder; the ``encoder`` dict of :class:`UNETR` overrides them.
ENCODER_DEFAULTS = dict(
    patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, patch_embed="conv", cls_token=False,
    pos_embed="learn", pos_embed_init="normal", qkv_bias=False, layer_norm_eps=1e-5,
)

# The decoder upsamples the patch grid four times by 2: the patch must be 16 on every axis.
_UPSAMPLINGS = 4


def _flat_init(init):
    """Draws an (..., in, out) kernel as (prod(...) * in, out) and reshapes: same fan-in, same distribution.

    XLA:CPU takes ~2 s to compile one random draw of a 4-/5-D shape (threefry), ~0.2 s for a 2-D one.
    """
    def flat(key, shape, dtype=jnp.float32):
        return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
    return flat


# PyTorch's default conv init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = _flat_init(nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm without affine parameters: per sample and channel over the spatial axes (biased variance)."""
    axes = tuple(range(1, x.ndim - 1))
    x32 = at_least_float32(x)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def conv3d_via_2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                  feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for ``nn.Conv``; on CPU a stride-1 channels-last 3-D conv runs as one 2-D conv
    over depth-stacked channels (out[d] = sum_i x[d + i] * k[i]), which XLA:CPU does ~3x faster than its 3-D conv
    (forward and backward). Same parameters and result up to float rounding; other cases go to ``lax`` unchanged."""
    channels_last = (dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) == (0, 4, 1, 2, 3)
                     and tuple(dimension_numbers.rhs_spec) == (4, 3, 0, 1, 2)
                     and tuple(dimension_numbers.out_spec) == (0, 4, 1, 2, 3))
    if not (channels_last and jax.default_backend() == "cpu" and rhs.shape[0] > 1 and not kwargs
            and tuple(window_strides) == (1, 1, 1) and not isinstance(padding, str) and feature_group_count == 1
            and all(v == 1 for v in (lhs_dilation or ())) and all(v == 1 for v in (rhs_dilation or ()))):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    (before, after), kd = tuple(padding[0]), rhs.shape[0]
    b, d, h, w, c = lhs.shape
    out_d = d + before + after - kd + 1
    x = jnp.pad(lhs, ((0, 0), (before, after), (0, 0), (0, 0), (0, 0)))
    x = jnp.concatenate([x[:, i:i + out_d] for i in range(kd)], axis=-1).reshape(b * out_d, h, w, kd * c)
    kernel = jnp.moveaxis(rhs, 0, 2).reshape(rhs.shape[1], rhs.shape[2], kd * c, rhs.shape[-1])
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), tuple(tuple(p) for p in padding[1:]),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y.reshape(b, out_d, *y.shape[1:])


class _ConvFactory:
    """Builds the decoder's convs and upsamplings with a shared dtype, init and logical axis names."""

    def __init__(self, nd: int, dtype, param_dtype):
        self.nd, self.dtype, self.param_dtype = nd, dtype, param_dtype

    def conv(self, features: int, kernel: int, name: str, bias: bool = False) -> nn.Conv:
        pad = (kernel - 1) // 2
        return nn.Conv(features, (kernel,) * self.nd, padding=((pad, pad),) * self.nd, use_bias=bias,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                       kernel_init=_axes(_torch_conv_init, (None,) * (self.nd + 2)),
                       bias_init=_axes(nn.initializers.zeros, (None,)), conv_general_dilated=conv3d_via_2d)

    def up(self, features: int, name: str, from_embed: bool = False) -> "UpConv":
        return UpConv(features, from_embed=from_embed, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class UpConv(nn.Module):
    """Transposed conv with kernel = stride = 2 and no bias (MONAI's upsampling): every input voxel becomes a 2x..x2
    block ``out[2i + a] = x[i] @ kernel[a]``. The blocks do not overlap, so it is one matmul plus a reshape (on CPU
    ~20x faster than ``nn.ConvTranspose``'s dilated conv). ``kernel`` is (2,..,2, in, out), PyTorch's
    ``ConvTranspose`` weight (in, out, 2,..,2) moved axes, not flipped."""

    features: int
    factor: int = 2
    from_embed: bool = False   # input channels are the ViT width: name that axis 'embed'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, *grid, c = x.shape
        nd = len(grid)
        in_axis = "embed" if self.from_embed else None
        kernel = self.param("kernel", _axes(_torch_conv_init, (None,) * nd + (in_axis, None)),
                            (self.factor,) * nd + (c, self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = jnp.tensordot(x, kernel, axes=((x.ndim - 1,), (nd,)))   # (B, *grid, *factor, out)
        perm = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
        return y.transpose(perm).reshape(b, *(g * self.factor for g in grid), self.features)


class ResBlock(nn.Module):
    """MONAI ``UnetResBlock`` (``residual``) or ``UnetBasicBlock``: conv-IN-LReLU-conv-IN (+ skip) - LReLU."""

    features: int
    residual: bool = True
    kernel_size: int = 3
    norm_eps: float = 1e-5
    negative_slope: float = 0.01
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        make = _ConvFactory(x.ndim - 2, self.dtype, self.param_dtype)
        h = instance_norm(make.conv(self.features, self.kernel_size, "conv1")(x), self.norm_eps)
        h = nn.leaky_relu(h, self.negative_slope)
        h = instance_norm(make.conv(self.features, self.kernel_size, "conv2")(h), self.norm_eps)
        if self.residual:
            skip = x
            if x.shape[-1] != self.features:  # 1x1 conv + IN on the residual when channels change
                skip = instance_norm(make.conv(self.features, 1, "conv3")(x), self.norm_eps)
            h = h + skip.astype(h.dtype)
        return nn.leaky_relu(h, self.negative_slope)


class PrUpBlock(nn.Module):
    """MONAI ``UnetrPrUpBlock``: transposed conv from the ViT width, then ``num_layer`` x [transposed conv +
    ResBlock]."""

    features: int
    num_layer: int
    conv_block: bool = True
    residual: bool = True
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        make = _ConvFactory(x.ndim - 2, self.dtype, self.param_dtype)
        x = make.up(self.features, "transp_conv_init", from_embed=True)(x)
        for i in range(self.num_layer):
            if self.conv_block:
                x = make.up(self.features, f"blocks_{i}_transp_conv")(x)
                x = ResBlock(self.features, self.residual, norm_eps=self.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"blocks_{i}_conv_block")(x)
            else:
                x = make.up(self.features, f"blocks_{i}")(x)
        return x


class UpBlock(nn.Module):
    """MONAI ``UnetrUpBlock``: transposed conv, concatenate [upsampled, skip] on channels, ResBlock(2C -> C)."""

    features: int
    from_embed: bool = False
    residual: bool = True
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        make = _ConvFactory(x.ndim - 2, self.dtype, self.param_dtype)
        x = make.up(self.features, "transp_conv", from_embed=self.from_embed)(x)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        return ResBlock(self.features, self.residual, norm_eps=self.norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="conv_block")(x)


class UNETR(nn.Module):
    """UNETR segmentation network: ViT (patch 16) encoder + convolutional decoder; returns logits.

    ``encoder`` holds :class:`~medmae_jax.models.vit.ViT` keyword arguments that
    override :data:`ENCODER_DEFAULTS` (MONAI's: ViT-B, no cls token, learnable
    position table, qkv without bias, LayerNorm eps 1e-5). A cls token (e.g. an
    MAE-pretrained encoder kept as is) is dropped before the decoder.
    ``skip_layers`` are 0-based indices into the ViT's block outputs
    (:data:`MONAI_SKIP_LAYERS` or :data:`PAPER_SKIP_LAYERS`); the deepest skip is
    always the final normed output. ``dropout``/``attn_dropout``/``drop_path``
    (rng streams ``dropout``/``droppath``) override the encoder dict when set.
    """

    out_channels: int
    encoder: Optional[dict] = None
    feature_size: int = 16
    skip_layers: Sequence[int] = MONAI_SKIP_LAYERS
    res_block: bool = True     # MONAI res_block: residual conv blocks (UnetResBlock) vs plain (UnetBasicBlock)
    conv_block: bool = True    # MONAI conv_block: conv blocks between the projection upsamplings
    norm_eps: float = 1e-5
    dropout: Optional[float] = None
    attn_dropout: Optional[float] = None
    drop_path: Optional[float] = None
    remat: bool = False        # rematerialise the Transformer blocks (memory for compute)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def encoder_kwargs(self, nd: int) -> dict:
        """The ViT's keyword arguments for ``nd`` spatial dimensions (defaults + ``encoder`` + overrides)."""
        kw = dict(ENCODER_DEFAULTS)
        kw.update(self.encoder or {})
        for key in ("dtype", "param_dtype"):
            if key in kw:
                raise ValueError(f"UNETR: give {key} on UNETR, not in the encoder dict")
        patch = kw["patch_size"]
        patch = (int(patch),) * nd if isinstance(patch, int) else tuple(int(p) for p in patch)
        if len(patch) != nd or any(p != 2 ** _UPSAMPLINGS for p in patch):
            raise ValueError(f"UNETR needs patch size 16 on each of the {nd} spatial axes (its decoder upsamples "
                             f"the patch grid 4 times by 2), got {patch}")
        kw["patch_size"] = patch
        for key in ("dropout", "attn_dropout", "drop_path"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        if self.remat:
            kw["remat"] = True
        return kw

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim not in (4, 5):
            raise ValueError(f"UNETR expects (B, H, W, C) or (B, D, H, W, C) channels-last inputs, got shape {x.shape}")
        nd = x.ndim - 2
        kw = self.encoder_kwargs(nd)
        depth = kw["depth"]
        skips = tuple(int(i) for i in self.skip_layers)
        if len(skips) != 3 or any(not -depth <= i < depth for i in skips):
            raise ValueError(f"UNETR skip_layers must be 3 block indices in [0, {depth}), "
                             f"got {tuple(self.skip_layers)}")
        vit = ViT(**kw, dtype=self.dtype, param_dtype=self.param_dtype, name="vit")
        grid = vit.grid(x.shape[1:-1])
        tokens, hidden = vit(x, train=train)
        prefix = int(kw.get("cls_token", False))
        width = kw["width"]

        def to_grid(t):  # (B, prefix + L, width) -> (B, *grid, width); tokens are row-major over the grid
            return t[:, prefix:].reshape(t.shape[0], *grid, width)

        f = self.feature_size
        common = dict(norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        enc1 = ResBlock(f, self.res_block, name="encoder1", **common)(x.astype(self.dtype))
        enc2 = PrUpBlock(2 * f, 2, self.conv_block, self.res_block, name="encoder2",
                         **common)(to_grid(hidden[skips[0]]))
        enc3 = PrUpBlock(4 * f, 1, self.conv_block, self.res_block, name="encoder3",
                         **common)(to_grid(hidden[skips[1]]))
        enc4 = PrUpBlock(8 * f, 0, self.conv_block, self.res_block, name="encoder4",
                         **common)(to_grid(hidden[skips[2]]))
        dec = UpBlock(8 * f, True, self.res_block, name="decoder5", **common)(to_grid(tokens), enc4)
        dec = UpBlock(4 * f, False, self.res_block, name="decoder4", **common)(dec, enc3)
        dec = UpBlock(2 * f, False, self.res_block, name="decoder3", **common)(dec, enc2)
        dec = UpBlock(f, False, self.res_block, name="decoder2", **common)(dec, enc1)
        return _ConvFactory(nd, self.dtype, self.param_dtype).conv(self.out_channels, 1, "out", bias=True)(dec)
