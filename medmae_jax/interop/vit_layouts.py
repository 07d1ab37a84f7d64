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
  UNETR decoder, converted by :mod:`medmae_jax.interop.monai_unetr`.

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

from typing import Any, Mapping, Optional

import numpy as np

from medmae_jax.errors import ConversionError
from medmae_jax.interop.encoder_maps import (
    _decoder_to_jax,
    _decoder_to_torch,
    _encoder_to_jax,
    _encoder_to_torch,
    _require_tree,
)
from medmae_jax.interop.key_maps import (
    MONAI_BLOCK,
    TIMM_BLOCK,
    DecoderKeys,
    EncoderKeys,
    _Reader,
)
from medmae_jax.interop.monai_unetr import import_monai_unetr, jax_to_monai_unetr, monai_unetr_to_jax
from medmae_jax.interop.report import ConversionReport
from medmae_jax.interop.torch_checkpoints import detect_layout, load_state_dict, save_state_dict
from medmae_jax.interop.weight_transforms import (
    HINT_KEYS,
    StateDict,
    _get,
    _plain,
    _put,
    _require,
    default_heads,
    dense_to_linear,
    linear_to_dense,
)
from medmae_jax.models.classifier import ViTClassifier
from medmae_jax.models.mae import MAE
from medmae_jax.models.vit import ViT


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
            sd = jax_to_monai_unetr(_strip_vit_for_monai(params))
            out.update({"decoder." + k: v for k, v in sd.items() if not k.startswith("vit.")})
        return out


def _convert_unetr_decoder(decoder_sd: Mapping[str, Any], vit: Mapping, enc: Mapping, grid):
    """MONAI-UNETR decoder keys -> (params, report) via :mod:`.monai_unetr`.

    That converter reads a whole MONAI UNETR; the ViT part is written here from the
    already converted encoder (without its cls token, which MONAI's UNETR lacks) so the
    decoder's shapes are checked against it.
    """

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

        _check_hints(hints)
        return import_monai_unetr(state_dict, strict=strict, config=config, **hints)

    def to_torch(self, params, config=None):

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

        return MAE(**kw)
    if model == "classifier":

        return ViTClassifier(**kw)

    return ViT(**kw)
