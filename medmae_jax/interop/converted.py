"""Converted checkpoints: PyTorch weights as an orbax checkpoint the CLI accepts, and back.

``OUT_DIR/checkpoints/0/`` holds ``{"params": ...}`` plus a JSON record whose
``config`` is a full training config for the model the weights imply (so
``train --config.init=mae --config.init_checkpoint=OUT_DIR``, ``evaluate`` and
``reconstruct`` work unchanged), and ``OUT_DIR/model.json`` holds the
conversion's model description (layout, encoder/decoder sizes, what was assumed).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import jax
import numpy as np

from medmae_jax import checkpoint_files as ckpt_lib
from medmae_jax import config_base, paths
from medmae_jax.errors import ConversionError
from medmae_jax.interop.report import ConversionReport
from medmae_jax.models.builders import encoder_kwargs

MODEL_JSON = "model.json"


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def training_config(model_config: Mapping, segmentation=None):
    """A training config (``config_base.base_config`` fields) describing the converted model.

    A UNETR needs ``segmentation``, the task's ``config.segmentation`` section (defaults), which this fills in.
    """
    enc = model_config["encoder"]
    c = config_base.base_config()
    kind = model_config.get("model", "vit")
    c.task = {"mae": "pretrain", "classifier": "classification", "unetr": "segmentation"}.get(kind, "pretrain")
    patch = tuple(int(p) for p in enc["patch_size"])
    if len(set(patch)) != 1:
        raise ConversionError(f"the training configs use one patch edge for every axis, got {patch}")
    grid = model_config.get("grid")
    if grid is None:
        raise ConversionError("the checkpoint does not tell its token grid: pass --grid")
    ndim = len(patch)
    c.model.variant, c.model.patch_size, c.model.spatial_dims = "B", patch[0], ndim
    c.model.width, c.model.depth = int(enc["width"]), int(enc["depth"])
    c.model.num_heads, c.model.mlp_dim = int(enc["num_heads"]), int(enc["mlp_dim"])
    c.model.in_channels = int(model_config["in_channels"])
    c.model.input_size = tuple(int(g) * patch[0] for g in grid)
    c.model.qkv_bias = bool(enc.get("qkv_bias", True))
    c.model.layer_norm_eps = float(enc.get("layer_norm_eps", 1e-6))
    if kind == "mae":
        dec = model_config["decoder"]
        c.model.decoder_width, c.model.decoder_depth = int(dec["width"]), int(dec["depth"])
        c.model.decoder_heads = int(dec["num_heads"])
    if kind == "unetr":
        _unetr_sections(c, model_config, segmentation)
    c.data.name = "synthetic2d" if ndim == 2 else "synthetic3d"
    c.data.image_size = tuple(c.model.input_size) if ndim == 2 else c.data.image_size
    c.data.volume_size = tuple(c.model.input_size) if ndim == 3 else c.data.volume_size
    return c


def _unetr_sections(c, model_config: Mapping, segmentation) -> None:
    """``config.model`` / ``config.segmentation`` of a converted MONAI UNETR (the project builds conv embeddings)."""
    if segmentation is None:
        raise ConversionError("a UNETR training config needs the segmentation section")
    enc, unetr = model_config["encoder"], model_config["unetr"]
    if enc.get("patch_embed", "conv") != "conv":
        raise ConversionError(f"the training configs build a conv patch embedding, the weights hold a "
                              f"{enc['patch_embed']} one (use the weights through the library)")
    c.model.layer_norm_eps = float(enc.get("layer_norm_eps", 1e-5))
    c.model.qkv_bias = bool(enc.get("qkv_bias", False))
    segmentation.kind, segmentation.num_classes = "multiclass", int(unetr["out_channels"])
    segmentation.feature_size = int(unetr["feature_size"])
    segmentation.res_block, segmentation.conv_block = bool(unetr["res_block"]), bool(unetr["conv_block"])
    c.segmentation = segmentation


def _empty_or_absent(out_dir: str) -> bool:
    """True when ``out_dir`` is to be created (absent); a ConversionError when it exists and is not empty."""
    where = paths.resolve(out_dir)
    if not where.exists():
        return True
    if not where.is_dir() or any(where.iterdir()):
        raise ConversionError(f"{out_dir}: the output must be an empty or new folder")
    return False


def save_converted(out_dir: str, params: Any, model_config: Mapping, report: Optional[ConversionReport],
                   source: str, segmentation=None) -> str:
    """Write params as ``out_dir/checkpoints/0`` plus ``model.json``; returns the checkpoint directory.

    ``out_dir`` must be new or empty; a failure part way removes what was written (a new folder entirely).
    ``segmentation``: see :func:`training_config`.
    """
    meta = {"step": 0, "seed": 0, "converted_from": str(paths.resolve(source)),
            "layout": model_config.get("layout"), "model": _jsonable(dict(model_config))}
    try:
        meta["config"] = json.loads(training_config(model_config, segmentation).to_json_best_effort())
    except ConversionError as exc:  # still usable as weights; say why there is no training config
        meta["config_note"] = str(exc)
    if report is not None:
        meta["report"] = {"unused": report.unused, "missing": report.missing, "ignored": report.ignored}
    state = {"params": jax.tree.map(np.asarray, params)}
    created = _empty_or_absent(out_dir)
    try:
        paths.resolve(out_dir).mkdir(parents=True, exist_ok=True)
        mngr = ckpt_lib.manager(paths.join(out_dir, "checkpoints"), keep=1, async_save=False)
        try:
            ckpt_lib.save(mngr, 0, state, meta, force=True)
            mngr.wait_until_finished()
        finally:
            mngr.close()
        (paths.resolve(out_dir) / MODEL_JSON).write_text(json.dumps(_jsonable(dict(model_config)), indent=2))
    except BaseException:
        where = paths.resolve(out_dir)
        for child in ([where] if created else list(where.iterdir())) if where.exists() else []:
            if child.is_dir():
                child.rmtree(missing_ok=True)
            else:
                child.unlink(missing_ok=True)
        raise
    return paths.join(out_dir, "checkpoints")


def model_config_for_checkpoint(path: str, meta: Mapping) -> dict:
    """The conversion model description of a checkpoint: ``model.json`` if converted, else from its training config."""
    where = paths.resolve(path)
    for candidate in (where / MODEL_JSON, where.parent / MODEL_JSON):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if "model" in meta and isinstance(meta["model"], Mapping):
        return dict(meta["model"])
    train = meta.get("config")
    if not train:
        raise ConversionError(f"{path}: neither {MODEL_JSON} nor a training config; cannot tell the model")
    return model_config_from_training(train)


def model_config_from_training(train: Mapping) -> dict:
    """Conversion model description of a model trained here (MAE pre-training or classification)."""
    m = train["model"]
    enc = encoder_kwargs(m)
    patch = tuple(enc["patch_size"])
    grid = tuple(int(s) // p for s, p in zip(m["input_size"], patch))
    enc.update(cls_token=True, patch_embed="conv", final_norm=True)
    config = dict(ndim=len(patch), in_channels=int(m["in_channels"]), grid=grid, assumed=[])
    if train.get("task") == "pretrain":
        enc["pos_embed"] = "sincos"
        config.update(model="mae", encoder=enc, decoder=dict(width=m["decoder_width"], depth=m["decoder_depth"],
                                                            num_heads=m["decoder_heads"],
                                                            mlp_dim=4 * m["decoder_width"], pos_embed="sincos"))
    elif train.get("task") == "classification":
        cls = train.get("classification", {})
        enc["pos_embed"] = "learn"
        config.update(model="classifier", encoder=enc,
                      head=dict(num_classes=cls.get("num_classes", 14), pooling=cls.get("pooling", "gap")))
    else:
        config.update(model="unetr", encoder=enc)
    return config
