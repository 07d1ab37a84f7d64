"""N-dimensional Vision Transformer (2-D images and 3-D volumes from one code path).

Inputs are channels-last: ``(B, H, W, C)`` or ``(B, D, H, W, C)``. Tokens are
ordered row-major over the patch grid, the order PyTorch/MONAI produce after
their channels-first ``flatten(2)``, so checkpoints convert without permuting
tokens. The encoder returns ``(output, intermediates)``: every block's output is
kept so UNETR can take its skip connections.

Kernels carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``patch``) that ``medmae_jax.train.mesh`` maps onto mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medmae_jax.models.masking import gather_tokens
from medmae_jax.models.precision import Dense, Dropout, at_least_float32, dot_product_attention, remat_block

Dtype = Any

# name -> (width, depth, mlp_dim, num_heads), as in the ViT/timm papers.
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: Optional[int]


def parse_variant(variant: str) -> VariantSpec:
    """``"B/16"`` -> width 768, depth 12, mlp 3072, 12 heads, patch 16 (patch optional)."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)} (e.g. 'B/16')")
    width, depth, mlp_dim, heads = VARIANTS[name]
    return VariantSpec(width, depth, mlp_dim, heads, int(patch) if patch else None)


def _trunc_normal(stddev: float = 0.02):
    return nn.initializers.truncated_normal(stddev=stddev)


def _axes(init, names):
    return nn.with_logical_partitioning(init, names)


# --------------------------------------------------------------------------
# Fixed sin-cos position tables.
# --------------------------------------------------------------------------
def _sincos_1d(dim: int, positions: np.ndarray, temperature: float = 10000.0) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / temperature**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# Channel blocks of the table in the order of these spatial axes (see sincos_position_table).
SINCOS_AXIS_ORDER = {"mae": None, "selfmedmae": (0, 1, 2), "monai": (1, 0, 2)}


def sincos_position_table(grid: Sequence[int], dim: int, temperature: float = 10000.0,
                          axis_order: Optional[Sequence[int]] = None) -> np.ndarray:
    """Fixed (L, dim) sin-cos table, row-major over ``grid``.

    Each spatial axis gets ``dim // (2 * ndim)`` frequencies as a [sin, cos]
    block; ``axis_order`` says which axis fills the first block, and so on.
    Defaults follow the references: 2-D ``(1, 0)`` (column first: official MAE
    ``get_2d_sincos_pos_embed`` and MONAI agree), 3-D ``(0, 1, 2)`` (SelfMedMAE's
    ``build_3d_sincos_position_embedding``). MONAI's 3-D table uses ``(1, 0, 2)``.
    """
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    if nd not in (1, 2, 3):
        raise ValueError(f"sin-cos tables exist for 1-, 2- and 3-D grids, got {grid}")
    if dim % (2 * nd):
        raise ValueError(f"{nd}-D sin-cos table needs dim divisible by {2 * nd}, got {dim}")
    if axis_order is None:
        axis_order = {1: (0,), 2: (1, 0), 3: (0, 1, 2)}[nd]
    if sorted(axis_order) != list(range(nd)):
        raise ValueError(f"axis_order {tuple(axis_order)} is not a permutation of the {nd} grid axes")
    coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    return np.concatenate([_sincos_1d(dim // nd, coords[a], temperature) for a in axis_order], 1).astype(np.float32)


# --------------------------------------------------------------------------
# Patchify / unpatchify.
# --------------------------------------------------------------------------
def patchify(images: jax.Array, patch_size: Sequence[int]) -> jax.Array:
    """(B, *spatial, C) -> (B, L, prod(patch) * C); pixels within a patch in (p, q[, r], c) order."""
    b, *spatial, c = images.shape
    nd = len(spatial)
    patch_size = tuple(patch_size)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    if any(s % p for s, p in zip(spatial, patch_size)):
        raise ValueError(f"spatial shape {tuple(spatial)} is not divisible by patch {patch_size}")
    shape = [b]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = images.reshape(*shape, c)
    # (b, g0, p0, g1, p1, ..., c) -> (b, g0, g1, ..., p0, p1, ..., c)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    x = x.transpose(perm)
    return x.reshape(b, math.prod(grid), math.prod(patch_size) * c)


def unpatchify(patches: jax.Array, patch_size: Sequence[int], spatial: Sequence[int], channels: int) -> jax.Array:
    """Inverse of :func:`patchify`."""
    b = patches.shape[0]
    nd = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    x = patches.reshape(b, *grid, *patch_size, channels)
    perm = [0]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    perm.append(1 + 2 * nd)
    return x.transpose(perm).reshape(b, *spatial, channels)


# --------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; ``conv`` (strided conv) or ``perceptron`` (Linear on flattened patches)."""

    patch_size: Sequence[int]
    width: int
    kind: str = "conv"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        patch = tuple(self.patch_size)
        nd = len(patch)
        if x.ndim != nd + 2:
            raise ValueError(f"expected a {nd}-D input (B, *spatial, C) for patch {patch}, got shape {x.shape}")
        if self.kind == "conv":
            y = nn.Conv(
                self.width, kernel_size=patch, strides=patch, padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj",
                kernel_init=_axes(nn.initializers.lecun_normal(), (None,) * (nd + 1) + ("embed",)),
                bias_init=_axes(nn.initializers.zeros, ("embed",)),
            )(x)
            return y.reshape(y.shape[0], -1, self.width)
        if self.kind == "perceptron":
            tokens = patchify(x, patch)
            return Dense(
                self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
                kernel_init=_axes(nn.initializers.lecun_normal(), ("patch", "embed")),
                bias_init=_axes(nn.initializers.zeros, ("embed",)),
            )(tokens)
        raise ValueError(f"unknown patch embedding {self.kind!r}; use 'conv' or 'perceptron'")


class Attention(nn.Module):
    """Multi-head self-attention with a fused (3, heads, head_dim) qkv projection."""

    num_heads: int
    qkv_bias: bool = True
    attn_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # 'auto' (cuDNN on GPU in 16-bit, XLA elsewhere) | 'xla' | 'cudnn'

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
        head_dim = width // self.num_heads
        qkv = Dense(
            (3, self.num_heads, head_dim), use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_axes(nn.initializers.xavier_uniform(), ("embed", None, "heads", "kv")),
            bias_init=_axes(nn.initializers.zeros, (None, "heads", "kv")), name="qkv",
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.attn_dropout > 0.0 and train:
            # Explicit path: dot_product_attention has no dropout.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
            weights = jax.nn.softmax(at_least_float32(logits), axis=-1).astype(self.dtype)
            weights = Dropout(self.attn_dropout)(weights, deterministic=False)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        else:
            out = dot_product_attention(q, k, v, self.attention)
        return Dense(
            width, num_in_axes=2, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_axes(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
            bias_init=_axes(nn.initializers.zeros, ("embed",)), name="proj",
        )(out)


class Mlp(nn.Module):
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        width = x.shape[-1]
        h = Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                     kernel_init=_axes(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                     bias_init=_axes(nn.initializers.zeros, ("mlp",)))(x)
        h = nn.gelu(h, approximate=False)
        h = Dropout(self.dropout)(h, deterministic=not train)
        h = Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                     kernel_init=_axes(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                     bias_init=_axes(nn.initializers.zeros, ("embed",)))(h)
        return Dropout(self.dropout)(h, deterministic=not train)


def _layer_norm(eps, dtype, param_dtype, name):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=_axes(nn.initializers.ones, ("embed",)),
                        bias_init=_axes(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
    """Pre-LN Transformer block with stochastic depth (rng stream ``droppath``)."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # see Attention.attention

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, drop_rate: Optional[jax.Array] = None) -> jax.Array:
        # ``drop_rate`` (traced) replaces the static ``drop_path`` inside a scan, where each layer has its own rate.
        if drop_rate is None:
            drop = Dropout(self.drop_path, broadcast_dims=tuple(range(1, x.ndim)), rng_collection="droppath")
            drop_path = lambda h: drop(h, deterministic=not train)  # noqa: E731
        else:
            drop_path = lambda h: _drop_path(self, h, drop_rate, train)  # noqa: E731
        h = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm1")(x)
        h = Attention(self.num_heads, self.qkv_bias, self.attn_dropout, self.dtype, self.param_dtype, self.attention,
                      name="attn")(h, train=train)
        x = x + drop_path(h)
        h = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name="mlp")(h, train=train)
        return x + drop_path(h)


def _drop_path(module: nn.Module, x: jax.Array, rate: jax.Array, train: bool) -> jax.Array:
    """Stochastic depth with a traced rate (one draw per example), as ``nn.Dropout`` with ``broadcast_dims``."""
    if not train:
        return x
    keep = 1.0 - rate  # float32 (the rates' dtype): the same draws under jax_enable_x64
    mask = jax.random.bernoulli(module.make_rng("droppath"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class _ScannedBlock(nn.Module):
    """One scan step: a block applied with this layer's drop-path rate; emits the block output as well."""

    block_kwargs: dict
    remat: bool | str = False

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: jax.Array, train: bool):
        y = remat_block(Block, self.remat, static_argnums=(2,))(**self.block_kwargs, name="block")(x, train,
                                                                                                   drop_rate)
        return y, y


def _stack_blocks(params: dict, depth: int) -> dict:
    """Unrolled layout ``{block_0: t, ..., block_{n-1}: t}`` -> scanned ``{layers: {block: t with a depth axis}}``."""
    if "block_0" not in params:  # nothing initialised yet
        return params
    blocks = [params[f"block_{i}"] for i in range(depth)]
    stacked = jax.tree.map(lambda *leaves: _map_box(leaves, lambda vs: jnp.stack(vs), add_axis=True), *blocks,
                           is_leaf=_is_box)
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    return {**rest, "layers": {"block": stacked}}


def _unstack_blocks(params: dict, depth: int) -> dict:
    """Inverse of :func:`_stack_blocks`, so checkpoints and PyTorch conversion see the unrolled layout."""
    if "layers" not in params:
        return params
    stacked = params["layers"]["block"]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(depth):
        out[f"block_{i}"] = jax.tree.map(lambda leaf, i=i: _map_box([leaf], lambda vs: vs[0][i], add_axis=False),
                                         stacked, is_leaf=_is_box)
    return out


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _map_box(leaves, fn, add_axis: bool):
    """Apply ``fn`` to the values of (possibly logically-partitioned) leaves, adding/removing the layer axis name."""
    if not _is_box(leaves[0]):
        return fn(list(leaves))
    box = leaves[0]
    value = fn([leaf.unbox() for leaf in leaves])
    names = getattr(box, "names", None)
    if names is None:
        return box.replace_boxed(value)
    names = (None,) + tuple(names) if add_axis else tuple(names)[1:]
    return box.replace(value=value, names=names)


class Transformer(nn.Module):
    """A stack of blocks; returns (final-normed output or raw output, [every block's output])."""

    depth: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    final_norm: bool = True
    remat: bool | str = False  # remat policy per block: see precision.REMAT_POLICIES (True = 'full')
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # see Attention.attention
    scan: bool = False       # one nn.scan over the blocks (compiles once); parameters keep the unrolled layout

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        if self.scan:
            x, intermediates = self._scanned(x, train)
        else:
            x, intermediates = self._unrolled(x, train)
        if self.final_norm:
            x = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm")(x)
        return x, intermediates

    def _rates(self) -> list[float]:
        # Linearly increasing drop-path rate, as in timm/MAE.
        return [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]

    def _block_kwargs(self, rate: float) -> dict:
        return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, qkv_bias=self.qkv_bias, dropout=self.dropout,
                    attn_dropout=self.attn_dropout, drop_path=rate, layer_norm_eps=self.layer_norm_eps,
                    dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)

    def _scanned(self, x: jax.Array, train: bool):
        depth = self.depth
        scan = nn.scan(_ScannedBlock, variable_axes={"params": 0}, in_axes=(0, nn.broadcast),
                       split_rngs={"params": True, "dropout": True, "droppath": True}, length=depth,
                       metadata_params={nn.PARTITION_NAME: None})
        rates = jnp.asarray(self._rates(), jnp.float32)
        x, stacked = scan(self._block_kwargs(0.0), self.remat, name="layers")(x, rates, train)
        return x, [stacked[i] for i in range(depth)]

    def _unrolled(self, x: jax.Array, train: bool):
        block_cls = remat_block(Block, self.remat)
        intermediates = []
        for i, rate in enumerate(self._rates()):
            x = block_cls(**self._block_kwargs(rate), name=f"block_{i}")(x, train)
            intermediates.append(x)
        return x, intermediates


def transformer_class(scan: bool, depth: int):
    """:class:`Transformer`, or (``scan``) its scanned form seen from outside in the unrolled parameter layout.

    The scanned stack stores ``layers/block`` with a leading depth axis; ``nn.map_variables`` converts to and from
    ``block_0 .. block_{depth-1}`` (also at init), so checkpoints, fine-tuning and PyTorch conversion never see it.
    """
    if not scan:
        return Transformer
    def per_collection(fn):  # the mapping functions receive {collection: variables}
        return lambda variables: {col: fn(dict(tree), depth) for col, tree in variables.items()}

    return nn.map_variables(Transformer, "params", trans_in_fn=per_collection(_stack_blocks),
                            trans_out_fn=per_collection(_unstack_blocks), init=True, mutable=True)


class ViT(nn.Module):
    """ViT encoder for 2-D or 3-D inputs (the dimensionality comes from ``patch_size``).

    ``keep_indices`` (B, K) selects the visible tokens after the position table
    is added (MAE pre-training); the cls token, if any, is prepended afterwards.
    Returns ``(tokens, intermediates)``; ``tokens`` includes the cls slot first.
    """

    patch_size: Sequence[int]
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_embed: str = "conv"          # 'conv' | 'perceptron'
    cls_token: bool = True
    pos_embed: str = "learn"           # 'learn' (param) | 'sincos' (fixed table) | 'none'
    pos_embed_init: str = "sincos"     # initial value of a learnable table: 'sincos' | 'normal'
    pos_axis_order: Optional[Sequence[int]] = None  # sin-cos channel blocks per axis (None: reference default)
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    final_norm: bool = True
    remat: bool | str = False  # remat policy per block: see precision.REMAT_POLICIES (True = 'full')
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # 'auto' | 'xla' | 'cudnn' (see Attention.attention)
    scan_blocks: bool = False  # nn.scan over the blocks: faster compile, same parameter layout

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        bad = [s for s, p in zip(spatial, self.patch_size) if s % p]
        if bad or len(spatial) != len(self.patch_size):
            raise ValueError(f"input spatial shape {tuple(spatial)} must be divisible by patch "
                             f"{tuple(self.patch_size)}")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))

    def position_table(self, grid: Sequence[int]) -> jax.Array:
        """(1, prefix + L, width) with a zero cls slot, as stored by timm/MAE."""
        table = sincos_position_table(grid, self.width, axis_order=self.pos_axis_order)
        if self.cls_token:
            table = np.concatenate([np.zeros((1, self.width), np.float32), table], 0)
        return jnp.asarray(table[None])

    def _pos(self, grid):
        n = math.prod(grid) + int(self.cls_token)
        if self.pos_embed == "none":
            return None
        if self.pos_embed == "sincos":
            return self.position_table(grid).astype(self.dtype)
        if self.pos_embed != "learn":
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; use 'learn', 'sincos' or 'none'")
        if self.pos_embed_init == "sincos":
            init = lambda *_: self.position_table(grid).astype(self.param_dtype)  # noqa: E731
        else:
            init = _trunc_normal(0.02)
        return self.param("pos_embedding", _axes(init, (None, None, "embed")), (1, n, self.width), self.param_dtype)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, keep_indices: Optional[jax.Array] = None):
        grid = self.grid(x.shape[1:-1])
        tokens = PatchEmbed(self.patch_size, self.width, self.patch_embed, self.dtype, self.param_dtype,
                            name="patch_embed")(x)
        pos = self._pos(grid)
        prefix = int(self.cls_token)
        if pos is not None:
            tokens = tokens + pos[:, prefix:].astype(tokens.dtype)
        if keep_indices is not None:
            tokens = gather_tokens(tokens, keep_indices)
        if self.cls_token:
            cls = self.param("cls_token", _axes(_trunc_normal(0.02), (None, None, "embed")), (1, 1, self.width),
                             self.param_dtype)
            if pos is not None:
                cls = cls + pos[:, :1]
            tokens = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, self.width)).astype(tokens.dtype),
                                      tokens], axis=1)
        tokens = Dropout(self.dropout)(tokens, deterministic=not train)
        return transformer_class(self.scan_blocks, self.depth)(
            self.depth, self.num_heads, self.mlp_dim, self.qkv_bias, self.dropout, self.attn_dropout, self.drop_path,
            self.layer_norm_eps, self.final_norm, self.remat, self.dtype, self.param_dtype, self.attention,
            scan=self.scan_blocks, name="transformer")(tokens, train)


def vit_kwargs(variant: Optional[str] = None, **overrides) -> dict:
    """Keyword arguments for :class:`ViT` from a variant string plus explicit overrides (None = keep)."""
    kw: dict = {}
    if variant:
        spec = parse_variant(variant)
        kw.update(width=spec.width, depth=spec.depth, mlp_dim=spec.mlp_dim, num_heads=spec.num_heads)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw
