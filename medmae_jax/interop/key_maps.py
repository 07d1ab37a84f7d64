"""Where each ViT-family layout keeps its weights: a state-dict reader that reports what it used, the
encoder/decoder key descriptions, and the per-block maps between torch keys and the project's blocks.
"""


from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.interop.report import ConversionReport
from medmae_jax.interop.weight_transforms import (
    StateDict,
    _get,
    _put,
    _require,
    dense_to_linear,
    linear_to_dense,
    out_proj_to_flax,
    out_proj_to_torch,
    qkv_to_flax,
    qkv_to_torch,
)


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
