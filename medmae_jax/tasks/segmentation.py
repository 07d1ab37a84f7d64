"""UNETR fine-tuning for 3-D segmentation (BTCV multi-organ CT, MSD brain-tumour MRI): the paper's Tables 2/3.

The model is :class:`medmae_jax.models.unetr.UNETR` whose ViT takes the same
``config.model`` fields as MAE pre-training (width, depth, heads, patch,
qkv bias, LayerNorm eps), with the fine-tuning settings of SelfMedMAE / MONAI:
no cls token, a learnable position table, conv patch embedding. So an MAE from
``configs/btcv_mae3d.py`` (or ``brats_mae3d.py``) with the same model fields
maps parameter for parameter onto it (``config.init = "mae"``): the cls token
is dropped and the MAE's fixed sin-cos table becomes the learnable table's
starting value (:func:`medmae_jax.interop.finetune_init.encoder_init_from_mae`).

Two kinds of output (``config.segmentation.kind``):

- ``multiclass`` (BTCV): softmax over ``num_classes`` (background included),
  loss Dice + cross-entropy with MONAI ``DiceCELoss(to_onehot_y=True,
  softmax=True)`` semantics; prediction = argmax.
- ``regions`` (MSD): one sigmoid channel per tumour region (default order TC,
  WT, ET like MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``), regions
  built from the label map under ``label_convention``; loss MONAI
  ``DiceLoss(sigmoid=True)`` (``loss="dice_ce"`` adds binary cross-entropy; MONAI's
  ``DiceCELoss(sigmoid=True)`` would instead apply a softmax cross-entropy across
  the region channels); prediction = probability > ``threshold``.

The Dice settings (``squared_pred``, ``smooth_nr``/``smooth_dr``, ``batch_dice``,
``include_background``) default to MONAI's; the paper configs set SelfMedMAE's
(``squared_pred=True``, 0 / 1e-6).

Crops: each training example is one volume giving ``crops_per_volume`` ROI
crops (MONAI ``RandCropByPosNegLabeld``, centres foreground:background =
``pos:neg``), each augmented independently (flips per axis, rot90, intensity
scale/shift); the crops are stacked on a leading axis of the example and the
loss folds them into the batch. So ``batch_size`` counts volumes and one step
sees ``batch_size * crops_per_volume`` crops, exactly as SelfMedMAE's loader
(batch 6 x 4 crops), and one volume read serves all its crops.

Synthetic data (``data.name = "synthetic3d"``): the phantoms' label maps use
BTCV numbers (spleen 1, kidneys 2/3, liver 6, aorta 8) and serve the multiclass
configs directly. For the ``regions`` kind the phantom is turned into a
brain-tumour stand-in (:class:`SyntheticTumourSource`): liver -> 1 (edema),
spleen -> 2 (non-enhancing tumour), kidneys -> 3 (enhancing tumour), aorta ->
background (MSD dataset.json numbers), and ``model.in_channels`` intensity
channels derived from the one CT-like channel (x, x^2, sqrt(x), 1 - x inside
the body), z-scored on non-zero voxels like the MSD builder.

Evaluation (:mod:`medmae_jax.evaluate.segmentation_eval`) runs sliding windows over whole
volumes of the eval split on every process (each computes the same metrics); jitted
predictors are compiled once per volume shape and reused across evaluations.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medmae_jax.checkpoint_files import restore_params
from medmae_jax.data import transforms
from medmae_jax.data.labels import label_to_regions, region_definition, regions_to_label
from medmae_jax.errors import ConfigError, EncoderMismatchError
from medmae_jax.models.builders import dtype as dtype_of
from medmae_jax.models.builders import encoder_kwargs
from medmae_jax.models.unetr import MONAI_SKIP_LAYERS, UNETR
from medmae_jax.tasks import base

log = logging.getLogger(__name__)

KINDS = ("multiclass", "regions")
# Synthetic phantom organ (BTCV number) -> MSD dataset.json label, for the ``regions`` stand-in.
PHANTOM_TO_MSD = {6: 1, 1: 2, 2: 3, 3: 3}


def segmentation_config(**overrides) -> ml_collections.ConfigDict:
    """The ``config.segmentation`` section, MONAI defaults (BTCV multiclass); ``overrides`` set fields."""
    s = ml_collections.ConfigDict()
    s.kind = "multiclass"          # multiclass (softmax over classes; BTCV) | regions (sigmoid per region; MSD)
    s.num_classes = 14             # multiclass: output channels = classes with background (BTCV: 14)
    s.regions = ("TC", "WT", "ET")  # regions: output channel order (MONAI / SelfMedMAE order)
    s.label_convention = "msd"     # regions: msd (ET={3}) | monai_tutorial (ET={2}) | brats (1/2/4 labels)
    s.feature_size = 16            # UNETR decoder width f (channels f, 2f, 4f, 8f)
    s.skip_layers = MONAI_SKIP_LAYERS  # 0-based blocks feeding the skips: MONAI (3, 6, 9); paper's z3/6/9 (2, 5, 8)
    s.res_block = True             # residual conv blocks in the decoder (MONAI res_block)
    s.conv_block = True            # conv blocks between the projection upsamplings (MONAI conv_block)
    s.pos_embed_init = "normal"    # learnable position table at init=scratch: normal (MONAI trunc-normal .02) | sincos
    s.loss = "dice_ce"             # dice_ce (Dice + cross-entropy, softmax) | dice (Dice only; sigmoid for regions)
    s.include_background = True    # multiclass Dice over the background channel too (MONAI default True)
    s.squared_pred = False         # Dice denominator sum(p^2) + sum(g^2) (True in SelfMedMAE; MONAI default False)
    s.smooth_nr = 1e-5             # Dice numerator smoothing (MONAI default 1e-5; SelfMedMAE 0)
    s.smooth_dr = 1e-5             # Dice denominator smoothing (MONAI default 1e-5; SelfMedMAE 1e-6)
    s.batch_dice = False           # Dice over the whole batch instead of per sample (MONAI batch=False)
    s.lambda_dice = 1.0            # weight of the Dice term
    s.lambda_ce = 1.0              # weight of the cross-entropy term (dice_ce)
    s.crops_per_volume = 4         # ROI crops per volume per step (SelfMedMAE BTCV 4, MSD 1)
    s.pos = 1.0                    # crop centres on foreground : background = pos : neg
    s.neg = 1.0                    # see pos
    s.image_threshold = 0.0        # crop centres only where the image > threshold (MONAI image_key/image_threshold)
    s.flip_prob = 0.2              # flip probability, independently per spatial axis
    s.rot90_prob = 0.2             # probability of a k*90 degree rotation (k in 1..3) in the first two axes
    s.scale_intensity_prob = 0.1   # probability of x * (1 + f), f ~ U(-factor, factor)
    s.scale_intensity_factor = 0.1  # see scale_intensity_prob
    s.shift_intensity_prob = 0.1   # probability of x + o, o ~ U(-offset, offset)
    s.shift_intensity_offset = 0.1  # see shift_intensity_prob
    s.sw_overlap = 0.5             # sliding-window overlap at evaluation (references: 0.5)
    s.sw_mode = "constant"         # sliding-window blending: constant | gaussian
    s.sw_batch_size = 4            # windows per model call in sliding-window inference
    s.threshold = 0.5              # regions: a voxel is in a region when its sigmoid > threshold
    s.eval_limit = -1              # volumes evaluated during training (-1: the whole eval split, 0: no evaluation)
    s.eval_hd95 = False            # also HD95 during training evaluations (slow; `medmae-jax evaluate` always does it)
    s.fast_init = True             # initial params from a cheap hash generator (threefry init: ~20 s compile on CPU)
    for key, value in overrides.items():
        if key not in s:
            raise ConfigError(f"segmentation_config: unknown field {key!r}")
        s[key] = value
    return s


# ----------------------------------------------------------------------------------------------------------------
# Losses (pure jnp, channels-last, computed in float32)
# ----------------------------------------------------------------------------------------------------------------
def soft_dice_loss(probs: jax.Array, target: jax.Array, *, squared_pred: bool = False, smooth_nr: float = 1e-5,
                   smooth_dr: float = 1e-5, batch: bool = False) -> jax.Array:
    """MONAI ``DiceLoss`` on probabilities and a one-hot/multi-hot target, both ``(B, *spatial, K)``.

    ``1 - (2 sum(p g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` per sample and channel
    (squares in the denominator with ``squared_pred``; sums over the batch too with ``batch``),
    averaged over samples and channels.
    """
    p = probs.astype(jnp.float32)
    g = target.astype(jnp.float32)
    axes = tuple(range(1, p.ndim - 1))
    if batch:
        axes = (0,) + axes
    inter = jnp.sum(p * g, axis=axes)
    if squared_pred:
        denom = jnp.sum(p * p, axis=axes) + jnp.sum(g * g, axis=axes)
    else:
        denom = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
    return jnp.mean(1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr))


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = True,
                 squared_pred: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch: bool = False,
                 lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> tuple[jax.Array, dict]:
    """MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``: logits ``(B, *spatial, K)``, labels ``(B, *spatial)``.

    Cross-entropy is the mean over every voxel of every sample (torch ``CrossEntropyLoss``);
    ``include_background`` only affects the Dice term, as in MONAI. Returns ``(loss, parts)``.
    """
    logits = logits.astype(jnp.float32)
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if not include_background:
        probs, dice_target = probs[..., 1:], onehot[..., 1:]
    else:
        dice_target = onehot
    dice = soft_dice_loss(probs, dice_target, squared_pred=squared_pred, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                          batch=batch)
    ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return lambda_dice * dice + lambda_ce * ce, {"dice_loss": dice, "ce_loss": ce}


def sigmoid_dice_loss(logits: jax.Array, masks: jax.Array, *, squared_pred: bool = False, smooth_nr: float = 1e-5,
                      smooth_dr: float = 1e-5, batch: bool = False) -> tuple[jax.Array, dict]:
    """MONAI ``DiceLoss(sigmoid=True)`` over multi-hot region masks ``(B, *spatial, R)``. Returns ``(loss, parts)``."""
    dice = soft_dice_loss(jax.nn.sigmoid(logits.astype(jnp.float32)), masks, squared_pred=squared_pred,
                          smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch)
    return dice, {"dice_loss": dice}


def sigmoid_dice_bce_loss(logits: jax.Array, masks: jax.Array, *, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                          **dice_kwargs) -> tuple[jax.Array, dict]:
    """MONAI ``DiceCELoss(sigmoid=True)`` on region masks: Dice + BCE with logits (mean over voxels and channels)."""
    dice, _ = sigmoid_dice_loss(logits, masks, **dice_kwargs)
    x = logits.astype(jnp.float32)
    t = masks.astype(jnp.float32)
    bce = jnp.mean(jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))
    return lambda_dice * dice + lambda_ce * bce, {"dice_loss": dice, "ce_loss": bce}


# ----------------------------------------------------------------------------------------------------------------
# Labels and regions
# ----------------------------------------------------------------------------------------------------------------
class SyntheticTumourSource:
    """A ``synthetic3d`` phantom source dressed as MSD brain-tumour data (see the module docstring)."""

    def __init__(self, source, channels: int):
        self.source, self.channels = source, int(channels)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        ex = dict(self.source[index])
        x = ex["image"][..., 0]
        body = x > 0.05
        candidates = [x, x * x, np.sqrt(x), (1.0 - x) * body]
        chans = [candidates[c % len(candidates)] for c in range(self.channels)]
        ex["image"] = transforms.normalize_nonzero(np.stack(chans, -1).astype(np.float32), channel_axis=-1)
        label = np.zeros_like(ex["label"])
        for organ, value in PHANTOM_TO_MSD.items():
            label[ex["label"] == organ] = value
        ex["label"] = label
        return ex


# ----------------------------------------------------------------------------------------------------------------
# Fast initialisation: XLA compiles every threefry draw of ``init`` as its own kernel (~0.5 s each on a CPU, and
# UNETR makes ~50 draws: 15-20 s before the first step). Parameters are drawn from a counter-based hash generator
# instead (a murmur3-style finaliser of (key, counter): a few integer ops per value, same distributions, the same
# values on every backend and sharding). Only ``init`` uses it; dropout and drop path keep the threefry keys.
# ----------------------------------------------------------------------------------------------------------------
def _mix(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _hash(key: jax.Array, counter: jax.Array) -> jax.Array:
    key = key.astype(jnp.uint32)
    return _mix(_mix(counter.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + key[..., 0]) ^ key[..., 1])


def _hash_seed(seed: jax.Array) -> jax.Array:
    return jnp.stack([jnp.uint32(0x243F6A88), jnp.asarray(seed).astype(jnp.uint32)])


def _hash_split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n = int(np.prod(shape))
    i = jax.lax.iota(jnp.uint32, n) * jnp.uint32(2)
    return jnp.stack([_hash(key, i), _hash(key, i + jnp.uint32(1))], -1).reshape(*shape, 2)


def _hash_fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    data = jnp.asarray(data).astype(jnp.uint32)
    return jnp.stack([_hash(key, data), _hash(key[::-1], data)])


def _hash_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    n = int(np.prod(shape))
    counter = jax.lax.iota(jnp.uint32, n)
    low = _hash(key, counter).reshape(shape)
    if bit_width == 64:
        high = _hash(key[::-1], counter).reshape(shape)
        return (high.astype(jnp.uint64) << jnp.uint64(32)) | low.astype(jnp.uint64)
    dtypes = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}
    if bit_width not in dtypes:
        raise ValueError(f"unsupported bit width {bit_width}")
    return (low >> jnp.uint32(32 - bit_width)).astype(dtypes[bit_width]) if bit_width < 32 else low


_HASH_PRNG = None


def fast_init_key(key: jax.Array) -> jax.Array:
    """A key of the hash generator carrying ``key``'s data (see above); usable inside ``jit``."""
    global _HASH_PRNG
    if _HASH_PRNG is None:
        from jax.extend.random import define_prng_impl
        _HASH_PRNG = define_prng_impl(key_shape=(2,), seed=_hash_seed, split=_hash_split, random_bits=_hash_bits,
                                      fold_in=_hash_fold_in, name="medmae_hash32")
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    data = jnp.stack([data[0], data[-1]]) if data.shape[0] != 2 else data
    return jax.random.wrap_key_data(data, impl=_HASH_PRNG)


# ----------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------
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
        """Fresh UNETR variables; with ``segmentation.fast_init`` drawn from the hash generator (see above)."""
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
        return self.model.apply({"params": params}, images.astype(jnp.float32), train=train, rngs=rngs)

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
        from medmae_jax.evaluate.sliding_window import predict_volume
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

    def evaluate(self, params: Any, mesh, step: int) -> dict:
        """Mean Dice (and per-class Dice; HD95 with ``eval_hd95``) over the eval split by sliding windows."""
        s = self.config.segmentation
        if int(s.eval_limit) == 0:
            return {}
        from medmae_jax.evaluate.segmentation_eval import evaluate_split
        result = evaluate_split(self, params, self.config.data.eval_split,
                                limit=None if int(s.eval_limit) < 0 else int(s.eval_limit), hd95=bool(s.eval_hd95),
                                mesh=mesh)
        return result.scalar_metrics()

    def summary_images(self, params: Any, mesh, step: int) -> dict:
        """Image / ground truth / prediction of the first evaluation case (the same case every evaluation)."""
        from medmae_jax import summaries
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


def init_from_mae(params: Mapping, source: Mapping, where: str = "checkpoint") -> tuple[dict, Any]:
    """UNETR params with ``vit`` replaced by the MAE encoder in ``source`` (an MAE's params ``{encoder, decoder}``,
    a bare ViT encoder, or another model's params with a ``vit`` subtree). Every encoder parameter must be filled
    and every MAE encoder parameter used (else an EncoderMismatchError naming ``where`` and the keys)."""
    from medmae_jax.interop.finetune_init import encoder_init_from_mae
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


def prepare_volume(example: dict, image_threshold: Optional[float]) -> dict:
    """Channels-last float32 image plus the foreground/background voxel indices of positive/negative crop
    sampling: the per-volume work of the train transform that does not depend on the random draw."""
    image = np.ascontiguousarray(np.asarray(example["image"], np.float32))
    if image.ndim == 3:
        image = image[..., None]
    label = np.asarray(example["label"])
    out = dict(example, image=image, label=label)
    if label.shape == image.shape[:3]:
        fg, bg = transforms.fg_bg_indices(label, None if image_threshold is None else image,
                                          0.0 if image_threshold is None else float(image_threshold))
        index_dtype = np.int32 if label.size < 2 ** 31 else np.int64
        out["fg_indices"], out["bg_indices"] = fg.astype(index_dtype), bg.astype(index_dtype)
    return out


def make_train_transform(config, target_of: Callable[[np.ndarray], np.ndarray]):
    """Per-volume random transform: ``crops_per_volume`` pos/neg ROI crops, each flipped/rotated/intensity-jittered.

    Returns ``{"image": (N, *roi, C) float32, "target": (N, *roi) uint8 or (N, *roi, R) uint8}``.
    """
    s = config.segmentation
    roi = tuple(int(r) for r in config.model.input_size)
    n = int(s.crops_per_volume)
    threshold = None if s.image_threshold is None else float(s.image_threshold)
    max_label = int(s.num_classes) - 1 if s.kind == "multiclass" else None
    rotate = roi[0] == roi[1]  # a 90-degree turn of a non-square ROI would change the crop's shape

    def transform(example: dict, rng: np.random.Generator) -> dict:
        image = np.asarray(example["image"], np.float32)
        label = np.asarray(example["label"])
        if image.ndim == 3:
            image = image[..., None]
        name = example.get("case_id", example.get("index", "?"))
        if label.shape != image.shape[:3]:
            raise ValueError(f"example {name!r}: label {label.shape} and image {image.shape} differ in spatial shape")
        if max_label is not None and label.size and int(label.max()) > max_label:
            raise ValueError(f"example {name!r}: label value {int(label.max())} >= segmentation.num_classes "
                             f"{max_label + 1}")
        indices = (example["fg_indices"], example["bg_indices"]) if "fg_indices" in example else None
        images, labels = transforms.rand_crop_by_pos_neg_label(rng, image, label, roi, n, pos=float(s.pos),
                                                               neg=float(s.neg), image_threshold=threshold,
                                                               indices=indices)
        out_images, out_targets = [], []
        for img, lab in zip(images, labels):
            img, lab = transforms.random_flip(rng, [img, lab], prob=float(s.flip_prob))
            if rotate:
                img, lab = transforms.random_rot90(rng, [img, lab], prob=float(s.rot90_prob))
            img = transforms.random_scale_intensity(rng, img, float(s.scale_intensity_factor),
                                                    float(s.scale_intensity_prob))
            img = transforms.random_shift_intensity(rng, img, float(s.shift_intensity_offset),
                                                    float(s.shift_intensity_prob))
            out_images.append(np.ascontiguousarray(img, np.float32))
            out_targets.append(np.ascontiguousarray(target_of(np.asarray(lab))).astype(np.uint8))
        return {"image": np.stack(out_images), "target": np.stack(out_targets)}

    return transform
