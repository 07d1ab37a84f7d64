"""The segmentation task: UNETR fine-tuning with pos/neg crops, Dice(+CE) loss, sliding-window evaluation."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from medmae_jax.checkpoint_files import restore_params
from medmae_jax.data.labels import SegmentationLabels, label_to_regions, region_definition, regions_to_label
from medmae_jax.errors import ConfigError
from medmae_jax.evaluate.segmentation_eval import evaluate_split
from medmae_jax.evaluate.sliding_window import predict_volume
from medmae_jax.models.fast_init import fast_init_key
from medmae_jax.models.precision import at_least_float32
from medmae_jax.tasks import base
from medmae_jax.tasks.segmentation.losses import dice_ce_loss, sigmoid_dice_bce_loss, sigmoid_dice_loss
from medmae_jax.tasks.segmentation.model import build_unetr, init_from_mae
from medmae_jax.tasks.segmentation.synthetic import SyntheticTumourSource
from medmae_jax.tasks.segmentation.train_transforms import make_train_transform, prepare_volume

log = logging.getLogger(__name__)


class SegmentationTask(base.Task):
    """UNETR fine-tuning: pos/neg crops + augmentation, Dice(+CE) loss, sliding-window Dice evaluation."""

    name = "segmentation"
    rng_streams = ("dropout", "droppath")
    best_metric = "mean_dice"
    best_mode = "max"

    def __init__(self, config):
        if "segmentation" not in config:
            raise ConfigError("task 'segmentation' needs a config.segmentation section "
                              "(medmae_jax.tasks.segmentation.segmentation_config())")
        s = config.segmentation
        if s.kind == "regions":
            region_definition(s.label_convention)  # validates early
        if s.loss not in ("dice_ce", "dice"):
            raise ConfigError(f"segmentation.loss must be 'dice_ce' or 'dice', got {s.loss!r}")
        if int(s.crops_per_volume) < 1:
            raise ConfigError(f"segmentation.crops_per_volume must be >= 1, got {s.crops_per_volume}")
        self.init_report = None  # what init=mae copied (a ConversionReport), after initial_params
        super().__init__(config)

    # --- model -----------------------------------------------------------------------------------------------
    def build_model(self):
        return build_unetr(self.config)

    def init_inputs(self) -> dict:
        m = self.config.model
        return {"x": jnp.zeros((1, *m.input_size, m.in_channels), jnp.float32)}

    def init_variables(self, rng: jax.Array) -> Any:
        """Fresh UNETR variables; with ``segmentation.fast_init`` drawn from the hash generator (models.fast_init)."""
        if not self.config.segmentation.get("fast_init", True):
            return super().init_variables(rng)
        try:
            key = fast_init_key(rng)
        except (ImportError, AttributeError, TypeError):  # a JAX without jax.extend.random.define_prng_impl
            return super().init_variables(rng)
        return self.model.init({"params": key}, **self.init_inputs())

    @property
    def num_outputs(self) -> int:
        s = self.config.segmentation
        return int(s.num_classes if s.kind == "multiclass" else len(s.regions))

    def initial_params(self, params: Any) -> Any:
        """``config.init``: ``scratch`` keeps the fresh params; ``mae`` copies an MAE encoder into ``params['vit']``."""
        init = self.config.get("init", "scratch")
        if init == "scratch":
            return params
        if init != "mae":
            raise ConfigError(f"segmentation supports init=scratch|mae, got {init!r}")
        path = self.config.get("init_checkpoint", "")
        if not path:
            raise ConfigError("init=mae needs init_checkpoint= (a pre-training workdir or checkpoint directory)")
        source, meta = restore_params(path)
        new_params, report = init_from_mae(params, source, path)
        self.init_report = report
        log.info("init=mae from %s (step %s): %s", path, meta.get("step"), report)
        return new_params

    # --- data ------------------------------------------------------------------------------------------------
    def source(self, split: str):
        src = super().source(split)
        if self.config.data.name == "synthetic3d" and self.config.segmentation.kind == "regions":
            src = SyntheticTumourSource(src, self.config.model.in_channels)
        return src

    def batch_keys(self) -> tuple[str, ...]:
        return ("image", "target")

    def rows_per_example(self) -> int:
        return int(self.config.segmentation.crops_per_volume)

    def fold_rows(self, local_batch: dict) -> dict:
        """(B, crops, ...) -> (B * crops, ...): the crops axis is split over the mesh with the batch, so a batch of
        6 volumes x 4 crops runs on 4 or 8 devices."""
        if local_batch["image"].ndim != len(self.config.model.input_size) + 3:
            return local_batch
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in local_batch.items()}

    def target_of(self, label: np.ndarray) -> np.ndarray:
        """Training target from a label map: the labels (multiclass) or region masks (regions)."""
        s = self.config.segmentation
        if s.kind == "regions":
            return label_to_regions(label, s.regions, s.label_convention)
        return label

    def train_transform(self) -> Callable[[dict, np.random.Generator], dict]:
        return make_train_transform(self.config, self.target_of)

    def prepare_example(self, example: dict) -> dict:
        return prepare_volume(example, self.config.segmentation.image_threshold)

    # --- objective -------------------------------------------------------------------------------------------
    def logits(self, params: Any, images: jax.Array, rng: Optional[jax.Array] = None, train: bool = False):
        rngs = self.apply_rngs(rng) if rng is not None else {}
        return self.model.apply({"params": params}, at_least_float32(images), train=train, rngs=rngs)

    def loss_from_logits(self, logits: jax.Array, target: jax.Array) -> tuple[jax.Array, dict]:
        s = self.config.segmentation
        dice_kw = dict(squared_pred=bool(s.squared_pred), smooth_nr=float(s.smooth_nr), smooth_dr=float(s.smooth_dr),
                       batch=bool(s.batch_dice))
        if s.kind == "multiclass":
            if s.loss == "dice_ce":
                return dice_ce_loss(logits, target, include_background=bool(s.include_background),
                                    lambda_dice=float(s.lambda_dice), lambda_ce=float(s.lambda_ce), **dice_kw)
            return dice_ce_loss(logits, target, include_background=bool(s.include_background),
                                lambda_dice=float(s.lambda_dice), lambda_ce=0.0, **dice_kw)
        if s.loss == "dice_ce":
            return sigmoid_dice_bce_loss(logits, target, lambda_dice=float(s.lambda_dice),
                                         lambda_ce=float(s.lambda_ce), **dice_kw)
        loss, parts = sigmoid_dice_loss(logits, target, **dice_kw)
        return float(s.lambda_dice) * loss, parts

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, train: bool):
        images, target = batch["image"], batch["target"]
        spatial = len(self.config.model.input_size)
        if images.ndim == spatial + 3:  # (B, crops, *roi, C): fold the crops into the batch
            images = images.reshape((-1,) + images.shape[2:])
            target = target.reshape((-1,) + target.shape[2:])
        logits = self.logits(params, images, rng, train)
        loss, parts = self.loss_from_logits(logits, target)
        return loss, {"loss": loss, **parts}

    # --- evaluation ------------------------------------------------------------------------------------------
    def predict(self, params: Any, image: np.ndarray, *, probabilities: bool = False, mesh=None) -> np.ndarray:
        """Sliding-window prediction of one volume ``(*spatial, C)``: labels (multiclass), region masks ``(*spatial,
        R)`` (regions), or the blended softmax/sigmoid probabilities ``(*spatial, K)`` with ``probabilities``.
        With a ``mesh`` the windows are split over its devices."""
        s = self.config.segmentation
        image = np.asarray(image, np.float32)
        want = self.config.model.in_channels
        if image.ndim != 4 or image.shape[-1] != want:
            raise ConfigError(f"expected a volume (X, Y, Z, {want}), got shape {image.shape}")
        activation = "softmax" if s.kind == "multiclass" else "sigmoid"
        post = {}
        if not probabilities:
            post = {"argmax": True} if s.kind == "multiclass" else {"threshold": float(s.threshold)}
        out = predict_volume(self.model.apply, {"params": params}, image[None], tuple(self.config.model.input_size),
                             sw_batch_size=int(s.sw_batch_size), overlap=float(s.sw_overlap), mode=s.sw_mode,
                             activation=activation, mesh=mesh, train=False, **post)
        out = np.asarray(jax.device_get(out))[0]
        return out.astype(np.uint8) if not probabilities else out

    def predictor(self, params: Any, *, mesh=None) -> Callable[[np.ndarray], np.ndarray]:
        """:meth:`predict` with ``params`` (and the windows split over ``mesh``) bound: what evaluation calls."""
        return lambda image: self.predict(params, image, mesh=mesh)

    @property
    def labels(self) -> SegmentationLabels:
        """How this task's outputs and the data set's label maps are read and reported."""
        return SegmentationLabels.from_config(self.config)

    def evaluate(self, params: Any, mesh, step: int) -> dict:
        """Mean Dice (and per-class Dice; HD95 with ``eval_hd95``) over the eval split by sliding windows."""
        s = self.config.segmentation
        if int(s.eval_limit) == 0:
            return {}
        split = self.config.data.eval_split
        result = evaluate_split(self.predictor(params, mesh=mesh), self.source(split), self.labels, split=split,
                                limit=None if int(s.eval_limit) < 0 else int(s.eval_limit), hd95=bool(s.eval_hd95))
        return result.scalar_metrics()

    def summary_images(self, params: Any, mesh, step: int) -> dict:
        """Image / ground truth / prediction of the first evaluation case (the same case every evaluation)."""
        from medmae_jax import summaries  # matplotlib only when drawing
        s = self.config.segmentation
        source = self.source(self.config.data.eval_split)
        if len(source) == 0:
            return {}
        ex = source[0]
        label = np.asarray(ex.get("label", np.zeros((0,), np.uint8)))
        if label.size == 0 or (s.kind == "regions" and not {"WT", "TC", "ET"} <= set(s.regions)):
            return {}
        image = np.asarray(ex["image"], np.float32)
        pred = self.predict(params, image if image.ndim == 4 else image[..., None], mesh=mesh)
        if s.kind == "regions":
            pred = regions_to_label(pred, tuple(s.regions), s.label_convention)
        num_labels = max(int(label.max()), int(pred.max()), self.num_outputs - 1) + 1
        return {"overlay": summaries.overlay_image(image, label, pred, num_labels)}
