"""ViT classifier: the project's ViT + a pooled linear head (multi-label ChestX-ray14 fine-tuning).

Pooling ``gap`` follows MAE fine-tuning (``models_vit.py`` with ``global_pool``):
mean of the patch tokens, then a LayerNorm ``fc_norm``, the encoder's final
norm switched off. Pooling ``cls`` takes the cls token after the final norm
(timm's default and MONAI's ``ViT(classification=True)``, whose head ends in a
``Tanh``: ``post_activation='tanh'`` reproduces it). ``repeat_gray_to_rgb`` feeds
one-channel images to three-channel (ImageNet) weights.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from medmae_jax.models.precision import Dense, Dropout, at_least_float32
from medmae_jax.models.vit import ViT, _axes, _layer_norm

Dtype = Any

POOLINGS = ("gap", "cls")
POST_ACTIVATIONS = (None, "tanh")


class ViTClassifier(nn.Module):
    """ViT encoder + pooling + Dense head; returns float32 logits ``(B, num_classes)``.

    ``encoder`` holds :class:`~medmae_jax.models.vit.ViT` keyword arguments. For
    ``gap`` pooling with ``fc_norm`` the encoder's ``final_norm`` defaults to off
    (as in MAE fine-tuning); an explicit ``final_norm`` in ``encoder`` wins.
    ``drop_path`` / ``dropout`` (rng streams ``droppath`` / ``dropout``) override
    the encoder dict when set. The head starts at zero (``head_init_std=0``) or
    from a truncated normal of that std (MAE fine-tuning uses 2e-5).
    """

    encoder: dict
    num_classes: int
    pooling: str = "gap"
    fc_norm: Optional[bool] = None          # default: True for 'gap', False for 'cls'
    post_activation: Optional[str] = None   # None | 'tanh' (MONAI's classification_head)
    head_init_std: float = 2e-5
    head_dropout: float = 0.0
    drop_path: Optional[float] = None
    dropout: Optional[float] = None
    repeat_gray_to_rgb: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _use_fc_norm(self) -> bool:
        return (self.pooling == "gap") if self.fc_norm is None else bool(self.fc_norm)

    def encoder_kwargs(self) -> dict:
        """The ViT's keyword arguments after the classifier's defaults and overrides."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; use one of {POOLINGS}")
        if self.post_activation not in POST_ACTIVATIONS:
            raise ValueError(f"unknown post_activation {self.post_activation!r}; use one of {POST_ACTIVATIONS}")
        kw = dict(self.encoder)
        for key in ("dtype", "param_dtype"):
            if key in kw:
                raise ValueError(f"ViTClassifier: give {key} on the classifier, not in the encoder dict")
        if self.drop_path is not None:
            kw["drop_path"] = self.drop_path
        if self.dropout is not None:
            kw["dropout"] = self.dropout
        if self.pooling == "gap" and self._use_fc_norm():
            kw.setdefault("final_norm", False)
        if self.pooling == "cls" and not kw.get("cls_token", True):
            raise ValueError("pooling='cls' needs an encoder with cls_token=True")
        return kw

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if self.repeat_gray_to_rgb and images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        kw = self.encoder_kwargs()
        tokens, _ = ViT(**kw, dtype=self.dtype, param_dtype=self.param_dtype, name="encoder")(images, train=train)
        prefix = int(kw.get("cls_token", True))
        if self.pooling == "gap":
            pooled = jnp.mean(at_least_float32(tokens[:, prefix:]), axis=1).astype(tokens.dtype)
        else:
            pooled = tokens[:, 0]
        if self._use_fc_norm():
            pooled = _layer_norm(kw.get("layer_norm_eps", 1e-6), self.dtype, self.param_dtype, "fc_norm")(pooled)
        pooled = Dropout(self.head_dropout)(pooled, deterministic=not train)
        init = (nn.initializers.zeros if self.head_init_std <= 0
                else nn.initializers.truncated_normal(stddev=self.head_init_std))
        logits = Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                       kernel_init=_axes(init, ("embed", None)),
                       bias_init=_axes(nn.initializers.zeros, (None,)))(pooled)
        logits = at_least_float32(logits)
        if self.post_activation == "tanh":
            logits = jnp.tanh(logits)
        return logits
