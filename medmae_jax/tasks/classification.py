"""ChestX-ray14 multi-label classification: ViT + pooled head, BCE over 14 labels, per-class ROC-AUC.

Fine-tuning follows MAE / SelfMedMAE: layer-wise lr decay and drop path come from
``config.optimizer.layer_decay`` / ``config.model.drop_path`` (the trainer wires
them), augmentation is :mod:`medmae_jax.data.augment_2d` (random resized crop,
flip, RandAugment-style policy), evaluation is ``Resize(256) + CenterCrop(224)``.
``config.init`` picks the starting weights: ``scratch``; ``mae`` (the encoder of
an MAE pre-training checkpoint, decoder dropped, cls token kept); ``imagenet`` (a
PyTorch ViT file in timm / FAIR-MAE layout: .pth with torch, .npz / .safetensors
without). A label whose evaluation targets hold one class only has no AUC: it is
reported as NaN, counted in ``num_labels_undefined`` and left out of ``mean_auc``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medmae_jax import paths
from medmae_jax.checkpoint_files import config_from_checkpoint, find_checkpoint, restore_params
from medmae_jax.data import augment_2d
from medmae_jax.data.labels import CXR14_LABELS
from medmae_jax.errors import ConfigError, ConversionError, EncoderMismatchError
from medmae_jax.evaluate import sharded
from medmae_jax.evaluate.metrics import AUCResult, roc_auc_per_class
from medmae_jax.interop import vit_layouts
from medmae_jax.interop.finetune_init import encoder_init_from_mae
from medmae_jax.interop.torch_checkpoints import detect_layout, load_state_dict
from medmae_jax.models.builders import dtype, encoder_kwargs, model_input
from medmae_jax.models.classifier import ViTClassifier
from medmae_jax.models.vit import sincos_position_table
from medmae_jax.tasks import base

log = logging.getLogger(__name__)

INITS = ("scratch", "mae", "imagenet")


def classification_config() -> ml_collections.ConfigDict:
    """``config.classification``: head, labels, augmentation and evaluation settings (defaults = the paper's)."""
    c = ml_collections.ConfigDict()
    c.num_classes = 14                     # outputs (ChestX-ray14: 14 findings, multi-label)
    c.label_names = tuple(CXR14_LABELS)    # names of the outputs, in the data set's label order
    c.pooling = "gap"                      # gap (mean of patch tokens + fc_norm, MAE fine-tuning) | cls
    c.head_init_std = 2e-5                 # head kernel ~ truncated normal(std) (MAE: 2e-5); 0 = zeros
    c.head_dropout = 0.0                   # dropout before the head
    c.pos_embed_init = "sincos"            # scratch: initial value of the learnable position table (sincos|normal)
    c.crop_scale = (0.08, 1.0)             # random resized crop: area fraction range (torchvision default)
    c.crop_ratio = (3 / 4, 4 / 3)          # random resized crop: aspect ratio range
    c.hflip = 0.5                          # horizontal flip probability
    c.randaug_num_ops = 2                  # RandAugment ops per image (0 = off); ops in data/augment_2d.py
    c.randaug_magnitude = 9.0              # RandAugment magnitude (0..10)
    c.randaug_magnitude_std = 0.5          # per-op Gaussian noise on the magnitude
    c.randaug_prob = 0.5                   # probability to apply each drawn op
    c.randaug_ops = augment_2d.DEFAULT_OPS  # the ops drawn from (subset of augment_2d.RANDAUG_OPS)
    c.eval_crop_fraction = 224 / 256       # evaluation: resize shorter side to size / fraction, centre crop
    c.eval_batch_size = 0                  # evaluation batch (0 = batch_size)
    c.eval_limit = 0                       # evaluate on the first N examples only (0 = the whole split)
    c.init_strict = True                   # init=mae|imagenet: fail when encoder weights are missing or left over
    return c


def _cls_config(config) -> ml_collections.ConfigDict:
    """The config's classification section, completed with defaults for fields it lacks."""
    out = classification_config().to_dict()
    given = config.get("classification") if hasattr(config, "get") else None
    if given:
        for key, value in dict(given).items():
            if key not in out:
                raise ConfigError(f"config.classification has no field {key!r}; known: {sorted(out)}")
            # Configs read back from JSON (checkpoint meta) hold lists where the defaults hold tuples.
            out[key] = tuple(value) if isinstance(out[key], tuple) and isinstance(value, list) else value
    return ml_collections.ConfigDict(out)


class ClassificationTask(base.Task):
    name = "classification"
    rng_streams = ("dropout", "droppath")
    best_metric = "mean_auc"
    best_mode = "max"

    def __init__(self, config):
        self.cls = _cls_config(config)
        if len(self.cls.label_names) != self.cls.num_classes:
            raise ConfigError(f"classification.label_names has {len(self.cls.label_names)} names for "
                              f"num_classes={self.cls.num_classes}")
        if config.get("init", "scratch") not in INITS:
            raise ConfigError(f"config.init={config.get('init')!r}; use one of {INITS}")
        if config.model.spatial_dims != 2:
            raise ConfigError("the classification task is 2-D (config.model.spatial_dims=2)")
        augment_2d.check_ops(self.cls.randaug_ops)
        super().__init__(config)

    # --- model -----------------------------------------------------------------------------------------------
    def encoder_kwargs(self) -> dict:
        kw = encoder_kwargs(self.config.model)
        kw.update(cls_token=True, pos_embed="learn", pos_embed_init=self.cls.pos_embed_init)
        return kw

    def build_model(self) -> ViTClassifier:
        m = self.config.model
        return ViTClassifier(encoder=self.encoder_kwargs(), num_classes=int(self.cls.num_classes),
                             pooling=self.cls.pooling, head_init_std=float(self.cls.head_init_std),
                             head_dropout=float(self.cls.head_dropout), drop_path=float(m.drop_path),
                             dropout=float(m.dropout), dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))

    def init_inputs(self) -> dict:
        m = self.config.model
        return {"images": jnp.zeros((1, *m.input_size, m.in_channels), jnp.float32)}

    @property
    def grid(self) -> tuple[int, ...]:
        patch = self.encoder_kwargs()["patch_size"]
        return tuple(int(s) // int(p) for s, p in zip(self.config.model.input_size, patch))

    def logits(self, params: Any, images: jax.Array, rng: Optional[jax.Array] = None, train: bool = False):
        """Raw uint8 (or float) images -> float32 logits (B, num_classes)."""
        x = model_input(images, self.config)
        rngs = self.apply_rngs(rng) if rng is not None else {}
        return self.model.apply({"params": params}, x, train=train, rngs=rngs)

    # --- pre-trained initialisation ----------------------------------------------------------------------------
    def initial_params(self, params: Any) -> Any:
        init = self.config.get("init", "scratch")
        if init == "scratch":
            return params
        path = self.config.get("init_checkpoint", "")
        if not path:
            raise ConfigError(f"config.init={init!r} needs config.init_checkpoint (a pre-training "
                              f"workdir / checkpoint for 'mae', a PyTorch ViT file for 'imagenet')")
        source = load_init_encoder(path, self.encoder_kwargs())
        host = jax.device_get(params)
        new_encoder, report = _encoder_from(host["encoder"], source, self.grid, path)
        if self.cls.init_strict and (report.missing or report.unused):
            raise EncoderMismatchError(f"{path}: the checkpoint's encoder does not fit the model "
                                  f"(set classification.init_strict=False to load it partially)\n{report}")
        log.info("init=%s from %s:\n%s", init, path, report)
        self.init_report = report
        return dict(host, encoder=new_encoder)

    # --- data ------------------------------------------------------------------------------------------------
    def train_transform(self):
        size = tuple(self.config.model.input_size)
        c = self.cls
        randaug = dict(num_ops=int(c.randaug_num_ops), magnitude=float(c.randaug_magnitude),
                       magnitude_std=float(c.randaug_magnitude_std), prob=float(c.randaug_prob),
                       ops=tuple(c.randaug_ops))
        scale, ratio, hflip = tuple(c.crop_scale), tuple(c.crop_ratio), float(c.hflip)

        def transform(example, rng):
            image = augment_2d.train_view(_as_image(example["image"]), size, rng, scale=scale, ratio=ratio,
                                          hflip=hflip, randaug=randaug)
            return {"image": image, "labels": np.asarray(example["labels"], np.float32)}

        return transform

    def eval_transform(self):
        size, fraction = tuple(self.config.model.input_size), float(self.cls.eval_crop_fraction)
        return lambda example: {"image": augment_2d.eval_view(_as_image(example["image"]), size, fraction),
                                "labels": np.asarray(example["labels"], np.float32)}

    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "labels")

    # --- objective -------------------------------------------------------------------------------------------
    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, train: bool):
        logits = self.logits(params, batch["image"], rng, train)
        labels = batch["labels"].astype(logits.dtype)
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
        return loss, {"loss": loss}

    # --- evaluation ------------------------------------------------------------------------------------------
    def eval_function(self, mesh):
        """Evaluation logits jitted for ``mesh`` (rows split over its devices, logits replicated); compiled once
        per task and mesh, reused every evaluation."""
        fns = self.__dict__.setdefault("_eval_fns", {})
        if mesh not in fns:
            fns[mesh] = jax.jit(lambda p, im: self.logits(p, im, None, False), out_shardings=sharded.replicated(mesh))
        return fns[mesh]

    def predict(self, params: Any, split: Optional[str] = None, source=None, limit: Optional[int] = None,
                mesh=None):
        """(labels (N, K), sigmoid scores (N, K), mean BCE) over a split with the evaluation view, batches split
        over ``mesh`` (default: all devices), each process loading its rows."""
        if source is None:
            source = self.source(split or self.config.data.eval_split)
        bs = int(self.cls.eval_batch_size or self.config.batch_size)
        limit = limit if limit is not None else (int(self.cls.eval_limit) or None)
        mesh = sharded.default_mesh(mesh)
        fn = self.eval_function(mesh)
        params = sharded.place_params(mesh, params)
        labels, scores, losses = [], [], []
        for batch, real in sharded.eval_batches(source, bs, mesh, self.eval_transform(), limit=limit,
                                                keys=("image", "labels")):
            logits = np.asarray(jax.device_get(fn(params, batch["image"])), np.float64)[:real]
            y = np.asarray(jax.device_get(_replicated(mesh, batch["labels"])), np.float64)[:real]
            labels.append(y)
            scores.append(1.0 / (1.0 + np.exp(-logits)))
            losses.append(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits))))
        if not labels:
            raise ConfigError(f"evaluation split {split!r} is empty")
        labels, scores = np.concatenate(labels), np.concatenate(scores)
        if labels.shape[1] != self.cls.num_classes:
            raise ConfigError(f"the data has {labels.shape[1]} labels, classification.num_classes is "
                              f"{self.cls.num_classes}")
        return labels, scores, float(np.concatenate(losses).mean())

    def auc(self, labels: np.ndarray, scores: np.ndarray) -> AUCResult:
        return roc_auc_per_class(labels, scores, names=tuple(self.cls.label_names))

    def evaluate(self, params: Any, mesh, step: int) -> dict:
        """Scalar metrics on ``data.eval_split``: mean_auc, auc/<label>, undefined/<label>, counts, eval_loss."""
        labels, scores, loss = self.predict(params, mesh=mesh)
        result = self.auc(labels, scores)
        if result.skipped:
            log.warning("step %d: AUC undefined (one class only in %s) for %s; left out of mean_auc", step,
                        self.config.data.eval_split, ", ".join(result.skipped))
        return scalar_metrics(result, loss, len(labels))


@functools.lru_cache(maxsize=8)
def _gather(mesh):
    return jax.jit(lambda x: x, out_shardings=sharded.replicated(mesh))


def _replicated(mesh, x: jax.Array) -> jax.Array:
    """A row-sharded global array gathered to every device (so every process can read it whole)."""
    return _gather(mesh)(x)


def scalar_metrics(result: AUCResult, loss: float, n: int) -> dict:
    out = {"mean_auc": float(result.mean), "eval_loss": float(loss), "num_examples": float(n),
           "num_labels_defined": float(len(result.names) - len(result.skipped)),
           "num_labels_undefined": float(len(result.skipped))}
    # Undefined labels get no auc/ entry (no NaN in the logs) but an ``undefined/<label> = 1`` marker.
    for name, v in zip(result.names, result.per_class):
        out[f"auc/{name}" if np.isfinite(v) else f"undefined/{name}"] = float(v) if np.isfinite(v) else 1.0
    return out


def _as_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        raise ConfigError(f"classification expects uint8 images, got {image.dtype} {image.shape}")
    return image


# ------------------------------------------------------------------------------------------------------------
# Pre-trained encoders.
# ------------------------------------------------------------------------------------------------------------
def load_init_encoder(path: str, encoder_kw: Mapping) -> dict:
    """Params holding an ``encoder`` subtree from an orbax checkpoint / workdir or a PyTorch-layout file."""
    if paths.resolve(path).is_dir():
        params, _ = restore_params(path)
        if not isinstance(params, Mapping) or "encoder" not in params:
            keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ConversionError(f"{path}: the checkpoint's params have no 'encoder' subtree (top level: {keys})")
        return dict(params)
    if not paths.resolve(path).exists():
        raise ConfigError(f"config.init_checkpoint {path!r} does not exist")

    state_dict = load_state_dict(path)
    layout = detect_layout(state_dict)
    if layout not in ("timm-vit", "fair-mae"):
        raise ConversionError(f"{path}: a {layout!r} checkpoint; init=imagenet reads timm ViT or FAIR MAE weights")
    params, cfg, report = vit_layouts.to_jax(state_dict, layout, num_heads=int(encoder_kw["num_heads"]),
                                             layer_norm_eps=float(encoder_kw.get("layer_norm_eps", 1e-6)))
    if report.missing:
        raise ConversionError(f"{path}: incomplete {layout} checkpoint\n{report}")
    encoder = dict(params["encoder"])
    if "pos_embedding" not in encoder and cfg.get("grid") is not None:
        # A fixed sin-cos table (FAIR MAE): materialise it in the checkpoint's own channel order and grid.
        width = int(cfg["encoder"]["width"])
        body = sincos_position_table(tuple(cfg["grid"]), width, axis_order=cfg["encoder"].get("pos_axis_order"))
        prefix = np.zeros((int(bool(cfg["encoder"].get("cls_token"))), width), np.float32)
        encoder["pos_embedding"] = np.concatenate([prefix, body], 0)[None].astype(np.float32)
    return dict(params, encoder=encoder)


def _encoder_from(target_encoder: Mapping, source: Mapping, grid, path: str):

    try:
        return encoder_init_from_mae(target_encoder, source, drop_cls=False, target_grid=grid)
    except ConversionError as err:
        raise EncoderMismatchError(f"{path}: {err}") from err


# ------------------------------------------------------------------------------------------------------------
# Checkpoint evaluation (used by ``medmae-jax evaluate`` for task == 'classification').
# ------------------------------------------------------------------------------------------------------------
def evaluate_checkpoint(config, checkpoint: str, split: str = "test", *, limit: Optional[int] = None,
                        task: Optional[ClassificationTask] = None) -> dict:
    """Per-class ROC-AUC of a fine-tuned classifier checkpoint on ``split`` (JSON-ready dict).

    ``config`` may be None: the config saved with the checkpoint is used. ``checkpoint``
    is a workdir (latest step), its ``best`` folder, or a step folder. Keys: split,
    checkpoint, step, num_examples, mean_auc, per_class (None = undefined), undefined_labels,
    num_labels_defined, eval_loss, table (text). Pass ``task`` to reuse its compiled model across calls.
    """
    params, meta = restore_params(checkpoint)
    if config is None:
        config = config_from_checkpoint(checkpoint)
    if not isinstance(params, Mapping) or "head" not in params or "encoder" not in params:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ConfigError(f"{checkpoint}: not a classifier checkpoint (params top level: {keys})")
    task = task if task is not None else ClassificationTask(config)
    labels, scores, loss = task.predict(params, split, limit=limit)
    result = task.auc(labels, scores)
    directory, step = find_checkpoint(checkpoint)
    return {"split": split, "checkpoint": paths.join(directory, str(step)), "step": int(meta.get("step", step)),
            "num_examples": int(len(labels)), "mean_auc": None if not np.isfinite(result.mean) else result.mean,
            "per_class": {n: (float(v) if np.isfinite(v) else None) for n, v in zip(result.names, result.per_class)},
            "undefined_labels": list(result.skipped), "num_labels_defined": len(result.names) - len(result.skipped),
            "eval_loss": loss, "table": result.table()}
