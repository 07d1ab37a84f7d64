"""Dice / Dice+CE losses with MONAI semantics (``DiceCELoss``, ``DiceLoss(sigmoid=True)``), shared by the
segmentation task and the benchmark's timed step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medmae_jax.models.precision import at_least_float32


def soft_dice_loss(probs: jax.Array, target: jax.Array, *, squared_pred: bool = False, smooth_nr: float = 1e-5,
                   smooth_dr: float = 1e-5, batch: bool = False) -> jax.Array:
    """MONAI ``DiceLoss`` on probabilities and a one-hot/multi-hot target, both ``(B, *spatial, K)``.

    ``1 - (2 sum(p g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)`` per sample and channel
    (squares in the denominator with ``squared_pred``; sums over the batch too with ``batch``),
    averaged over samples and channels.
    """
    p = at_least_float32(probs)
    g = target.astype(p.dtype)
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
    logits = at_least_float32(logits)
    k = logits.shape[-1]
    onehot = jax.nn.one_hot(labels, k, dtype=logits.dtype)
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
    dice = soft_dice_loss(jax.nn.sigmoid(at_least_float32(logits)), masks, squared_pred=squared_pred,
                          smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch)
    return dice, {"dice_loss": dice}


def sigmoid_dice_bce_loss(logits: jax.Array, masks: jax.Array, *, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                          **dice_kwargs) -> tuple[jax.Array, dict]:
    """MONAI ``DiceCELoss(sigmoid=True)`` on region masks: Dice + BCE with logits (mean over voxels and channels)."""
    dice, _ = sigmoid_dice_loss(logits, masks, **dice_kwargs)
    x = at_least_float32(logits)
    t = masks.astype(x.dtype)
    bce = jnp.mean(jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))
    return lambda_dice * dice + lambda_ce * bce, {"dice_loss": dice, "ce_loss": bce}
