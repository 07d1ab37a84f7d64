"""MONAI ``UNETR`` state dicts <-> :class:`medmae_jax.models.unetr.UNETR` parameters, without torch.

State dicts are ``dict[str, numpy.ndarray]`` (e.g. ``{k: v.numpy() for k, v in
torch.load(path)["state_dict"].items()}``); the result is the plain ``params``
collection, used as ``model.apply({"params": params}, x)`` with a model built
from :meth:`MonaiUnetrConfig.unetr_kwargs`. Layout changes: Linear weights are
transposed; conv weights go (out, in, *k) -> (*k, in, out); transposed-conv
weights go (in, out, *k) -> (*k, in, out) without flipping (the model's
``UpConv`` places ``x[i] @ kernel[a]`` at ``2i + a`` like PyTorch; a flax
``nn.ConvTranspose`` kernel would be this one flipped on its spatial axes); the
fused qkv weight (3*W, W) becomes (W, 3, heads, head_dim).

MONAI >= 1.4 stores cross-attention weights its UNETR never uses
(``vit.blocks.N.cross_attn.*``, ``vit.blocks.N.norm_cross_attn.*``): they are
listed as ``ignored`` on import and can be re-created (inert values) on export.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.interop.report import ConversionReport
from medmae_jax.interop.weight_transforms import conv_to_flax, conv_to_torch

LAYOUT = "MONAI UNETR"
_PATCH = 16
_IGNORED = re.compile(r"^vit\.blocks\.\d+\.(cross_attn|norm_cross_attn)\.")
# Standard ViT widths -> heads (the head count is not stored in the weights).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}


@dataclasses.dataclass(frozen=True)
class MonaiUnetrConfig:
    """The settings of a MONAI ``UNETR``, in MONAI's own argument names."""

    in_channels: int
    out_channels: int
    img_size: tuple[int, ...]
    feature_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    proj_type: str = "conv"   # 'conv' | 'perceptron'
    qkv_bias: bool = False
    res_block: bool = True
    conv_block: bool = True

    @property
    def spatial_dims(self) -> int:
        return len(self.img_size)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // _PATCH for s in self.img_size)

    def unetr_kwargs(self) -> dict:
        """Keyword arguments of :class:`medmae_jax.models.unetr.UNETR` for the same network."""
        return dict(
            out_channels=self.out_channels, feature_size=self.feature_size, res_block=self.res_block,
            conv_block=self.conv_block,
            encoder=dict(patch_size=_PATCH, width=self.hidden_size, depth=self.num_layers, num_heads=self.num_heads,
                         mlp_dim=self.mlp_dim, patch_embed=self.proj_type, qkv_bias=self.qkv_bias),
        )

    def monai_kwargs(self) -> dict:
        """Keyword arguments of ``monai.networks.nets.UNETR`` (which always has 12 layers and patch 16)."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, img_size=self.img_size,
                    feature_size=self.feature_size, hidden_size=self.hidden_size, mlp_dim=self.mlp_dim,
                    num_heads=self.num_heads, proj_type=self.proj_type, res_block=self.res_block,
                    conv_block=self.conv_block, qkv_bias=self.qkv_bias, spatial_dims=self.spatial_dims)

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Channels-last input shape of the JAX model (the position table fixes the spatial size)."""
        return (batch, *self.img_size, self.in_channels)


# --------------------------------------------------------------------------
# Layout transforms: torch array -> jax array, and back.
# --------------------------------------------------------------------------
def _convt_fwd(w):          # (in, out, *k) -> (*k, in, out); UpConv uses PyTorch's orientation, no flip
    return np.transpose(w, tuple(range(2, w.ndim)) + (0, 1))


def _convt_bwd(w):
    nd = w.ndim - 2
    return np.transpose(w, (nd, nd + 1) + tuple(range(nd)))


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str                        # MONAI key
    path: tuple[str, ...]           # path in the flax params tree
    shape: tuple[int, ...]          # expected MONAI (torch) shape
    fwd: Callable[[np.ndarray], np.ndarray]
    bwd: Callable[[np.ndarray], np.ndarray]


def _identity(w):
    return w


def _entries(cfg: MonaiUnetrConfig) -> list[_Entry]:
    """Every MONAI key of ``cfg``'s network, with its flax path, torch shape and layout transforms."""
    nd, w, f = cfg.spatial_dims, cfg.hidden_size, cfg.feature_size
    heads = cfg.num_heads
    if w % heads:
        raise ConversionError(f"{LAYOUT}: hidden size {w} is not divisible by num_heads {heads}")
    hd = w // heads
    out: list[_Entry] = []

    def add(key, path, shape, fwd=_identity, bwd=_identity):
        out.append(_Entry(key, tuple(path.split("/")), tuple(shape), fwd, bwd))

    def linear(key, path, n_out, n_in, bias=True):
        add(f"{key}.weight", f"{path}/kernel", (n_out, n_in), np.transpose, np.transpose)
        if bias:
            add(f"{key}.bias", f"{path}/bias", (n_out,))

    def norm(key, path):
        add(f"{key}.weight", f"{path}/scale", (w,))
        add(f"{key}.bias", f"{path}/bias", (w,))

    def conv(key, path, c_out, c_in, k):
        add(f"{key}.conv.weight", f"{path}/kernel", (c_out, c_in) + (k,) * nd, conv_to_flax, conv_to_torch)

    def convt(key, path, c_in, c_out):
        add(f"{key}.conv.weight", f"{path}/kernel", (c_in, c_out) + (2,) * nd, _convt_fwd, _convt_bwd)

    def res(key, path, c_in, c_out):
        conv(f"{key}.conv1", f"{path}/conv1", c_out, c_in, 3)
        conv(f"{key}.conv2", f"{path}/conv2", c_out, c_out, 3)
        if cfg.res_block and c_in != c_out:
            conv(f"{key}.conv3", f"{path}/conv3", c_out, c_in, 1)

    # ViT
    pe = "vit.patch_embedding"
    add(f"{pe}.position_embeddings", "vit/pos_embedding", (1, math.prod(cfg.grid), w))
    if cfg.proj_type == "conv":
        add(f"{pe}.patch_embeddings.weight", "vit/patch_embed/proj/kernel",
            (w, cfg.in_channels) + (_PATCH,) * nd, conv_to_flax, conv_to_torch)
        add(f"{pe}.patch_embeddings.bias", "vit/patch_embed/proj/bias", (w,))
    elif cfg.proj_type == "perceptron":
        # MONAI's Rearrange flattens each patch as (p1, p2[, p3], c): the order of medmae_jax's patchify.
        linear(f"{pe}.patch_embeddings.1", "vit/patch_embed/proj", w, cfg.in_channels * _PATCH ** nd)
    else:
        raise ConversionError(f"{LAYOUT}: unknown proj_type {cfg.proj_type!r}; use 'conv' or 'perceptron'")
    for i in range(cfg.num_layers):
        k, p = f"vit.blocks.{i}", f"vit/transformer/block_{i}"
        norm(f"{k}.norm1", f"{p}/norm1")
        # MONAI splits qkv output features as (qkv, heads, head_dim): "b h (qkv l d) -> qkv b l h d".
        add(f"{k}.attn.qkv.weight", f"{p}/attn/qkv/kernel", (3 * w, w),
            lambda a: a.T.reshape(w, 3, heads, hd), lambda a: a.reshape(w, 3 * w).T)
        if cfg.qkv_bias:
            add(f"{k}.attn.qkv.bias", f"{p}/attn/qkv/bias", (3 * w,),
                lambda a: a.reshape(3, heads, hd), lambda a: a.reshape(3 * w))
        add(f"{k}.attn.out_proj.weight", f"{p}/attn/proj/kernel", (w, w),
            lambda a: a.T.reshape(heads, hd, w), lambda a: a.reshape(w, w).T)
        add(f"{k}.attn.out_proj.bias", f"{p}/attn/proj/bias", (w,))
        norm(f"{k}.norm2", f"{p}/norm2")
        linear(f"{k}.mlp.linear1", f"{p}/mlp/fc1", cfg.mlp_dim, w)
        linear(f"{k}.mlp.linear2", f"{p}/mlp/fc2", w, cfg.mlp_dim)
    norm("vit.norm", "vit/transformer/norm")

    # Decoder
    res("encoder1.layer", "encoder1", cfg.in_channels, f)
    for name, c, n in (("encoder2", 2 * f, 2), ("encoder3", 4 * f, 1), ("encoder4", 8 * f, 0)):
        convt(f"{name}.transp_conv_init", f"{name}/transp_conv_init", w, c)
        for j in range(n):
            if cfg.conv_block:
                convt(f"{name}.blocks.{j}.0", f"{name}/blocks_{j}_transp_conv", c, c)
                res(f"{name}.blocks.{j}.1", f"{name}/blocks_{j}_conv_block", c, c)
            else:
                convt(f"{name}.blocks.{j}", f"{name}/blocks_{j}", c, c)
    for name, c_in, c_out in (("decoder5", w, 8 * f), ("decoder4", 8 * f, 4 * f), ("decoder3", 4 * f, 2 * f),
                              ("decoder2", 2 * f, f)):
        convt(f"{name}.transp_conv", f"{name}/transp_conv", c_in, c_out)
        res(f"{name}.conv_block", f"{name}/conv_block", 2 * c_out, c_out)
    add("out.conv.conv.weight", "out/kernel", (cfg.out_channels, f) + (1,) * nd, conv_to_flax, conv_to_torch)
    add("out.conv.conv.bias", "out/bias", (cfg.out_channels,))
    return out


# --------------------------------------------------------------------------
# Config inference.
# --------------------------------------------------------------------------
def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Plain numpy arrays; drops a ``module.`` prefix that DataParallel/DDP put on every key."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ConversionError(f"{LAYOUT}: expected a non-empty dict of arrays, got {type(state_dict).__name__}")
    keys = list(state_dict)
    strip = all(k.startswith("module.") for k in keys)
    return {(k[len("module."):] if strip else k): np.asarray(v) for k, v in state_dict.items()}


def _need(sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in sd:
        raise ConversionError(f"{LAYOUT}: key {key!r} not found; this does not look like a MONAI UNETR state dict "
                              f"(first keys: {list(sd)[:5]})")
    return sd[key]


def infer_monai_unetr_config(state_dict: Mapping[str, Any], *, num_heads: Optional[int] = None,
                             img_size: Optional[Sequence[int] | int] = None) -> MonaiUnetrConfig:
    """Reads the UNETR settings from a MONAI state dict's keys and shapes.

    The number of attention heads is not stored in the weights: pass ``num_heads``
    unless the model used the standard count for its width (768 -> 12, MONAI's
    default). The image size comes from the position table, assuming a cube
    (square in 2-D) unless ``img_size`` is given.
    """
    sd = _strip_prefix(state_dict)
    enc1 = _need(sd, "encoder1.layer.conv1.conv.weight")
    nd = enc1.ndim - 2
    if nd not in (2, 3):
        raise ConversionError(f"{LAYOUT}: encoder1.layer.conv1.conv.weight has shape {enc1.shape}; "
                              "expected a 2-D or 3-D conv kernel")
    feature_size, in_channels = int(enc1.shape[0]), int(enc1.shape[1])
    out_channels = int(_need(sd, "out.conv.conv.weight").shape[0])
    hidden = int(_need(sd, "vit.norm.weight").shape[0])
    mlp_dim = int(_need(sd, "vit.blocks.0.mlp.linear1.weight").shape[0])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vit\.blocks\.(\d+)\.", k)))
    if "vit.patch_embedding.patch_embeddings.weight" in sd:
        proj_type = "conv"
        kernel = sd["vit.patch_embedding.patch_embeddings.weight"].shape[2:]
    elif "vit.patch_embedding.patch_embeddings.1.weight" in sd:
        proj_type = "perceptron"
        patch_dim = sd["vit.patch_embedding.patch_embeddings.1.weight"].shape[1]
        kernel = (_PATCH,) * nd if patch_dim == in_channels * _PATCH ** nd else (patch_dim,)
    else:
        raise ConversionError(f"{LAYOUT}: no patch embedding weight (vit.patch_embedding.patch_embeddings.weight "
                              "or .1.weight) in the state dict")
    if tuple(kernel) != (_PATCH,) * nd:
        raise ConversionError(f"{LAYOUT}: patch embedding implies patch {tuple(kernel)}; UNETR uses {_PATCH} per axis")
    tokens = int(_need(sd, "vit.patch_embedding.position_embeddings").shape[1])
    if img_size is None:
        side = round(tokens ** (1.0 / nd))
        if side ** nd != tokens:
            raise ConversionError(f"{LAYOUT}: {tokens} position embeddings is not a {nd}-D cube of patches; "
                                  "pass img_size")
        img = (side * _PATCH,) * nd
    else:
        img = (int(img_size),) * nd if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(img) != nd or any(s % _PATCH for s in img) or math.prod(s // _PATCH for s in img) != tokens:
            raise ConversionError(f"{LAYOUT}: img_size {img} does not fit {tokens} position embeddings "
                                  f"({nd}-D, patch {_PATCH})")
    if num_heads is None:
        if hidden not in _HEADS_BY_WIDTH:
            raise ConversionError(f"{LAYOUT}: the number of heads is not stored in the weights and width {hidden} "
                                  "is not a standard ViT width; pass num_heads")
        num_heads = _HEADS_BY_WIDTH[hidden]
    norm_keys = [k for k in sd if re.search(r"\.norm\d\.", k) and not k.startswith("vit.")]
    if norm_keys:
        raise ConversionError(f"{LAYOUT}: decoder normalisation parameters {norm_keys[:3]} found; only InstanceNorm "
                              "without affine (MONAI's default norm_name='instance') is supported")
    return MonaiUnetrConfig(
        in_channels=in_channels, out_channels=out_channels, img_size=img, feature_size=feature_size,
        hidden_size=hidden, mlp_dim=mlp_dim, num_heads=int(num_heads), num_layers=depth, proj_type=proj_type,
        qkv_bias="vit.blocks.0.attn.qkv.bias" in sd,
        res_block="decoder5.conv_block.conv3.conv.weight" in sd,
        conv_block="encoder2.blocks.0.conv.weight" not in sd,
    )


# --------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------
def _set(tree: dict, path: Sequence[str], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def monai_unetr_to_jax(state_dict: Mapping[str, Any], *, strict: bool = False,
                       config: Optional[MonaiUnetrConfig] = None, num_heads: Optional[int] = None,
                       img_size: Optional[Sequence[int] | int] = None) -> tuple[dict, ConversionReport]:
    """MONAI UNETR state dict -> (flax ``params`` of :class:`~medmae_jax.models.unetr.UNETR`, report).

    ``config`` (default: :func:`infer_monai_unetr_config` with ``num_heads``/``img_size``)
    fixes the expected shapes; a mismatch raises :class:`ConversionError` naming the
    key and both shapes. Unused cross-attention keys of MONAI >= 1.4 are listed in
    ``report.ignored``; other leftovers in ``report.unused``, absent keys in
    ``report.missing`` (those parameters are absent from the tree). ``strict``
    raises unless every key was placed and every parameter filled.
    """
    sd = _strip_prefix(state_dict)
    if config is None:
        config = infer_monai_unetr_config(sd, num_heads=num_heads, img_size=img_size)
    report = LAYOUT + (f" ({config.spatial_dims}-D, {config.proj_type}, hidden {config.hidden_size}, "
                       f"feature {config.feature_size}, {config.in_channels} -> {config.out_channels})")
    report = ConversionReport(layout=report)
    params: dict = {}
    placed = set()
    for e in _entries(config):
        if e.key not in sd:
            report.missing.append(e.key)
            continue
        value = sd[e.key]
        if tuple(value.shape) != e.shape:
            raise ConversionError(f"{LAYOUT}: key {e.key!r} has shape {tuple(value.shape)}, the model expects "
                                  f"{e.shape} (flax parameter {'/'.join(e.path)})")
        _set(params, e.path, np.ascontiguousarray(e.fwd(value)))
        placed.add(e.key)
    for key in sd:
        if key in placed:
            continue
        (report.ignored if _IGNORED.match(key) else report.unused).append(key)
    return params, report.check(strict)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (str(name),)))
        else:
            flat[prefix + (str(name),)] = value
    return flat


def _config_from_params(params: Mapping) -> MonaiUnetrConfig:
    """The MONAI settings of a flax UNETR parameter tree (heads come from the qkv kernel's shape).

    The patch grid's shape is not stored, only its size: a non-cubic grid gets a
    stand-in ``img_size`` with the same number of patches (all the export needs).
    """
    flat = {k: np.shape(v) for k, v in _flatten(params).items()}

    def need(*path):
        if path not in flat:
            raise ConversionError(f"{LAYOUT}: parameter {'/'.join(path)} not found; not a medmae_jax UNETR "
                                  f"parameter tree (top level: {sorted(params)[:8]})")
        return flat[path]

    if ("vit", "cls_token") in flat:
        raise ConversionError(f"{LAYOUT}: the encoder has a cls token (vit/cls_token), which MONAI's UNETR cannot "
                              "represent; fine-tune without one to export")
    enc1 = need("encoder1", "conv1", "kernel")
    nd = len(enc1) - 2
    hidden, _, heads, _ = need("vit", "transformer", "block_0", "attn", "qkv", "kernel")
    pos = need("vit", "pos_embedding")
    tokens = pos[1]
    side = round(tokens ** (1.0 / nd))
    img_size = (side * _PATCH,) * nd if side ** nd == tokens else (tokens * _PATCH,) + (_PATCH,) * (nd - 1)
    depth = 1 + max(int(k[2][len("block_"):]) for k in flat if k[:2] == ("vit", "transformer") and
                    k[2].startswith("block_"))
    patch = need("vit", "patch_embed", "proj", "kernel")
    return MonaiUnetrConfig(
        in_channels=int(enc1[-2]), out_channels=int(need("out", "kernel")[-1]), img_size=img_size,
        feature_size=int(enc1[-1]),
        hidden_size=int(hidden), mlp_dim=int(need("vit", "transformer", "block_0", "mlp", "fc1", "kernel")[-1]),
        num_heads=int(heads), num_layers=depth, proj_type="conv" if len(patch) == nd + 2 else "perceptron",
        qkv_bias=("vit", "transformer", "block_0", "attn", "qkv", "bias") in flat,
        res_block=("decoder5", "conv_block", "conv3", "kernel") in flat,
        conv_block=("encoder2", "blocks_0", "kernel") not in flat,
    )


def jax_to_monai_unetr(params: Mapping, *, cross_attn_keys: str = "norm") -> dict[str, np.ndarray]:
    """Flax UNETR ``params`` (or ``{"params": ...}``, boxed or not) -> MONAI UNETR state dict of numpy arrays.

    ``cross_attn_keys`` re-creates the unused cross-attention entries a fresh MONAI
    model expects under ``load_state_dict(strict=True)``: ``'norm'`` (LayerNorm
    ``norm_cross_attn`` at identity; MONAI 1.6), ``'full'`` (also zero ``cross_attn``
    projections; MONAI 1.4) or ``'none'`` (MONAI <= 1.3). Every flax parameter must be
    placed, else :class:`ConversionError`. Only weights travel: a model run with other
    ``skip_layers`` or LayerNorm eps than MONAI's (3/6/9, 1e-5) computes differently there.
    """
    import flax.linen as nn  # flax is a core dependency; imported here to keep this module light

    if cross_attn_keys not in ("none", "norm", "full"):
        raise ValueError(f"cross_attn_keys must be 'none', 'norm' or 'full', got {cross_attn_keys!r}")
    params = nn.unbox(params)
    if "params" in params and "vit" not in params:
        params = params["params"]
    flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
    config = _config_from_params(params)
    out: dict[str, np.ndarray] = {}
    used = set()
    for e in _entries(config):
        if e.path not in flat:
            raise ConversionError(f"{LAYOUT}: parameter {'/'.join(e.path)} (MONAI {e.key}) not found")
        value = np.ascontiguousarray(e.bwd(flat[e.path]))
        if tuple(value.shape) != e.shape:
            raise ConversionError(f"{LAYOUT}: parameter {'/'.join(e.path)} gives {e.key!r} shape {value.shape}, "
                                  f"MONAI expects {e.shape}")
        out[e.key] = value
        used.add(e.path)
    left = sorted("/".join(k) for k in flat if k not in used)
    if left:
        raise ConversionError(f"{LAYOUT}: parameters with no MONAI counterpart: {left[:10]}")
    if cross_attn_keys != "none":
        w, dtype = config.hidden_size, flat[("vit", "transformer", "norm", "scale")].dtype
        for i in range(config.num_layers):
            k = f"vit.blocks.{i}"
            out[f"{k}.norm_cross_attn.weight"] = np.ones((w,), dtype)
            out[f"{k}.norm_cross_attn.bias"] = np.zeros((w,), dtype)
            if cross_attn_keys == "full":
                out[f"{k}.cross_attn.out_proj.weight"] = np.zeros((w, w), dtype)
                out[f"{k}.cross_attn.out_proj.bias"] = np.zeros((w,), dtype)
                for name in ("to_q", "to_k", "to_v"):
                    out[f"{k}.cross_attn.{name}.weight"] = np.zeros((w, w), dtype)
                    if config.qkv_bias:
                        out[f"{k}.cross_attn.{name}.bias"] = np.zeros((w,), dtype)
    return out


# --------------------------------------------------------------------------
# The ``monai-unetr`` layout of the converter: hints in, model description (with assumptions) out.
# --------------------------------------------------------------------------
# Hints that shape a MONAI UNETR (the rest of the converter's hints describe MAE/classifier parts).
UNETR_HINTS = ("num_heads", "grid", "in_channels", "patch_size")
_FLAG = {"num_heads": "--num-heads", "grid": "--grid", "in_channels": "--in-channels", "patch_size": "--patch-size",
         "decoder_heads": "--decoder-heads", "layer_norm_eps": "layer_norm_eps", "pooling": "pooling"}


def _hinted_config(sd: Mapping[str, np.ndarray], hints: Mapping) -> tuple[MonaiUnetrConfig, list[str]]:
    """The UNETR settings: weights first, then every given hint (checked or used), then stated assumptions."""
    unused = sorted(set(hints) - set(UNETR_HINTS))
    if unused:
        raise ConversionError(f"{LAYOUT}: {', '.join(_FLAG.get(k, k) for k in unused)} does not apply to a MONAI "
                              f"UNETR (its hints: {', '.join(_FLAG[k] for k in UNETR_HINTS)})")
    tokens = int(_need(sd, "vit.patch_embedding.position_embeddings").shape[1])
    nd = _need(sd, "encoder1.layer.conv1.conv.weight").ndim - 2
    hidden = int(_need(sd, "vit.norm.weight").shape[0])
    heads, grid = hints.get("num_heads"), hints.get("grid")
    missing = []
    if heads is None and hidden not in _HEADS_BY_WIDTH:
        missing.append(f"--num-heads (the head count is not stored in the weights and width {hidden} is not a "
                       "standard ViT width)")
    side = round(tokens ** (1.0 / nd))
    if grid is None and side ** nd != tokens:
        missing.append(f"--grid (patches per axis: {tokens} position embeddings are no {nd}-D cube)")
    if missing:
        raise ConversionError(f"{LAYOUT}: pass " + " and ".join(missing))
    if grid is not None and (len(grid) != nd or math.prod(grid) != tokens):
        raise ConversionError(f"{LAYOUT}: --grid {tuple(grid)} does not fit the position table ({tokens} patches, "
                              f"{nd}-D)")
    img_size = None if grid is None else tuple(int(g) * _PATCH for g in grid)
    probe = infer_monai_unetr_config(sd, num_heads=1, img_size=img_size)
    if hints.get("patch_size") is not None and tuple(hints["patch_size"]) not in ((_PATCH,), (_PATCH,) * nd):
        raise ConversionError(f"{LAYOUT}: --patch-size {tuple(hints['patch_size'])} given, but MONAI's UNETR uses "
                              f"patch {_PATCH} on every axis")
    if hints.get("in_channels") is not None and int(hints["in_channels"]) != probe.in_channels:
        raise ConversionError(f"{LAYOUT}: --in-channels {hints['in_channels']} given, but the weights take "
                              f"{probe.in_channels} channels (encoder1.layer.conv1.conv.weight)")
    assumed = []
    if heads is None:
        heads = _HEADS_BY_WIDTH[hidden]
        assumed.append(f"num_heads={heads} (the standard count for width {hidden}; pass --num-heads otherwise)")
    elif hidden % int(heads):
        raise ConversionError(f"{LAYOUT}: --num-heads {heads} does not divide the width {hidden}")
    if grid is None:
        assumed.append(f"grid={probe.grid} (a {'cube' if nd == 3 else 'square'} of patches from the position "
                       f"table's {tokens} entries; pass --grid otherwise)")
    return dataclasses.replace(probe, num_heads=int(heads)), assumed


def import_monai_unetr(state_dict: Mapping[str, Any], *, strict: bool = False, config: Optional[Mapping] = None,
                      **hints) -> tuple[dict, dict, ConversionReport]:
    """MONAI UNETR state dict -> (params, model description, report) for the converter's ``monai-unetr`` layout.

    Every hint given is used (``num_heads``, ``grid``) or checked against the weights
    (``in_channels``, ``patch_size``); a hint that does not apply is an error. What the
    weights cannot tell and no hint said is listed in ``assumed``. ``config`` (a
    description from an earlier import) fixes the settings instead.
    """
    sd = _strip_prefix(state_dict)
    hints = {k: v for k, v in hints.items() if v is not None}
    if config is not None and config.get("monai"):
        monai = dict(config["monai"])
        monai.pop("spatial_dims", None)
        cfg, assumed = MonaiUnetrConfig(**dict(monai, img_size=tuple(monai["img_size"]))), list(config["assumed"])
    else:
        cfg, assumed = _hinted_config(sd, hints)
    params, report = monai_unetr_to_jax(sd, strict=strict, config=cfg)
    kw = cfg.unetr_kwargs()
    encoder = dict(kw.pop("encoder"), patch_size=(_PATCH,) * cfg.spatial_dims, cls_token=False, pos_embed="learn",
                   layer_norm_eps=1e-5)
    description = dict(layout="monai-unetr", model="unetr", ndim=cfg.spatial_dims, in_channels=cfg.in_channels,
                       grid=cfg.grid, encoder=encoder, unetr=kw, monai=cfg.monai_kwargs(), assumed=assumed)
    return params, description, report
