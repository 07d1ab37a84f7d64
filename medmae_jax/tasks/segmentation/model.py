"""The UNETR of a segmentation config (one module object per setting) and its encoder from an MAE."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from medmae_jax.errors import ConfigError, EncoderMismatchError
from medmae_jax.interop.finetune_init import encoder_init_from_mae
from medmae_jax.models.builders import dtype as dtype_of
from medmae_jax.models.builders import encoder_kwargs
from medmae_jax.models.unetr import UNETR
from medmae_jax.tasks.segmentation.config import KINDS

_MODELS: dict = {}


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def build_unetr(config) -> UNETR:
    """UNETR from ``config.model`` (encoder fields shared with pre-training) and ``config.segmentation``."""
    m, s = config.model, config.segmentation
    if s.kind not in KINDS:
        raise ConfigError(f"segmentation.kind must be one of {KINDS}, got {s.kind!r}")
    if m.spatial_dims != 3:
        raise ConfigError(f"segmentation is 3-D: model.spatial_dims must be 3, got {m.spatial_dims}")
    enc = encoder_kwargs(m)
    if any(p != 16 for p in enc["patch_size"]):
        raise ConfigError(f"UNETR needs model.patch_size 16 (its decoder upsamples the patch grid 4 x 2), "
                          f"got {enc['patch_size']}")
    bad = [r for r in m.input_size if r % 16]
    if bad or len(m.input_size) != 3:
        raise ConfigError(f"model.input_size (the ROI) must be 3 multiples of 16, got {tuple(m.input_size)}")
    enc.update(cls_token=False, pos_embed="learn", pos_embed_init=s.pos_embed_init, patch_embed="conv")
    out = s.num_classes if s.kind == "multiclass" else len(s.regions)
    kwargs = dict(out_channels=int(out), encoder=enc, feature_size=int(s.feature_size),
                  skip_layers=tuple(int(i) for i in s.skip_layers), res_block=bool(s.res_block),
                  conv_block=bool(s.conv_block), dtype=dtype_of(m.dtype), param_dtype=dtype_of(m.param_dtype))
    # One module object per setting: jitted sliding-window predictors are cached on ``model.apply``, so a training
    # evaluation, `evaluate` and `predict` in one process share their compilations.
    key = _freeze(kwargs)
    if key not in _MODELS:
        _MODELS[key] = UNETR(**kwargs)
    return _MODELS[key]


def init_from_mae(params: Mapping, source: Mapping, where: str = "checkpoint") -> tuple[dict, Any]:
    """UNETR params with ``vit`` replaced by the MAE encoder in ``source`` (an MAE's params ``{encoder, decoder}``,
    a bare ViT encoder, or another model's params with a ``vit`` subtree). Every encoder parameter must be filled
    and every MAE encoder parameter used (else an EncoderMismatchError naming ``where`` and the keys)."""
    if "vit" not in params:
        raise ConfigError("UNETR params have no 'vit' subtree")
    src = dict(source)
    if "encoder" not in src and "vit" in src:
        src = {"encoder": src["vit"]}
    vit, report = encoder_init_from_mae(params["vit"], src)
    if report.missing or report.unused:
        raise EncoderMismatchError(f"{where}: the MAE encoder does not match the UNETR encoder of this config "
                                   f"(same width, depth, heads, patch, qkv_bias and channels are needed):\n{report}")
    out = dict(params)
    out["vit"] = jax.tree.map(np.asarray, vit)
    return out, report
