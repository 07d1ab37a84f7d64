"""Optimizer: AdamW, linear warmup + cosine decay per step, weight-decay masks, layer-wise lr decay.

As in MAE/SelfMedMAE, the learning rate is given as a base rate for a batch of
256 (``lr = base_lr * batch / 256``). Layer-wise decay (BEiT/MAE fine-tuning)
scales the whole AdamW update of a parameter at depth ``i`` of an ``L``-block
encoder by ``decay ** (L + 1 - i)``: the patch embedding, cls token and
position table are depth 0, block ``k`` is depth ``k + 1``, and everything
else (final norm, heads, decoders) is depth ``L + 1`` (full rate).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = ("pos_embedding", "cls_token", "mask_token")
_BLOCK = re.compile(r"^block_(\d+)$")


def learning_rate(base_lr: float, batch_size: int, scaling: str = "linear") -> float:
    """Effective peak learning rate from the base rate (``linear``: x batch/256, ``none``: as given)."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling {scaling!r}; use 'linear' or 'none'")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr``, then half-cosine down to ``min_lr`` at ``total_steps``."""
    warmup_steps = min(max(int(warmup_steps), 0), max(total_steps - 1, 0))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and kernels, not biases, norms, tokens or position tables."""
    def decide(path, leaf):
        names = _path_names(path)
        return leaf.ndim > 1 and names[-1] not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(decide, params)


def layer_index(path_names: list[str], num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay (see module docstring)."""
    if "patch_embed" in path_names or path_names[-1] in ("pos_embedding", "cls_token"):
        return 0
    for parent, name in zip(path_names[:-1], path_names[1:]):
        match = _BLOCK.match(name)
        if match and parent == "transformer":
            return int(match.group(1)) + 1
    return num_layers + 1


def layer_decay_scales(params: Any, decay: float, num_layers: int) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decay ** (num_layers + 1 - layer_index(_path_names(path), num_layers)), params)


class _ScaleState(NamedTuple):
    pass


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor."""
    def init(params):
        del params
        return _ScaleState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(opt_config: Mapping, params: Any, *, batch_size: int, total_steps: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW from ``config.optimizer``; returns the transformation and its learning-rate schedule."""
    peak = learning_rate(opt_config["base_lr"], batch_size, opt_config.get("lr_scaling", "linear"))
    warmup = opt_config.get("warmup_steps", -1)
    if warmup is None or warmup < 0:
        warmup = int(round(opt_config.get("warmup_epochs", 0) * steps_per_epoch))
    schedule = warmup_cosine(peak, total_steps, warmup, opt_config.get("min_lr", 0.0))
    parts = []
    if opt_config.get("grad_clip_norm", 0.0):
        parts.append(optax.clip_by_global_norm(opt_config["grad_clip_norm"]))
    parts.append(optax.adamw(schedule, b1=opt_config.get("b1", 0.9), b2=opt_config.get("b2", 0.95),
                             eps=opt_config.get("eps", 1e-8), weight_decay=opt_config.get("weight_decay", 0.05),
                             mask=weight_decay_mask))
    decay = opt_config.get("layer_decay", 1.0)
    if decay and decay != 1.0:
        num_layers = opt_config.get("num_layers")
        if not num_layers:
            raise ValueError("optimizer.layer_decay needs optimizer.num_layers (the encoder depth)")
        parts.append(scale_by_tree(layer_decay_scales(params, decay, num_layers)))
    return optax.chain(*parts), schedule
