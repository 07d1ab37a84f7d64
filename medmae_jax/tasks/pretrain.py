"""MAE self pre-training: masked-patch reconstruction on the target data set itself."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from medmae_jax.data import augment
from medmae_jax.data.pipeline import evaluation_batches
from medmae_jax.models import mae as mae_lib
from medmae_jax.models.builders import build_mae, encoder_kwargs, model_input
from medmae_jax.tasks import base


class PretrainTask(base.Task):
    name = "pretrain"
    rng_streams = ("masking", "dropout", "droppath")
    best_metric = None
    _summary_fn = None  # jitted reconstruction for summary_images, compiled once

    def build_model(self):
        return build_mae(self.config.model)

    def init_inputs(self) -> dict:
        m = self.config.model
        return {"images": jnp.zeros((1, *m.input_size, m.in_channels), jnp.float32)}

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(encoder_kwargs(self.config.model)["patch_size"])

    def train_transform(self):
        return augment.pretrain_transform(self.config)

    def reconstruct(self, params: Any, images: jax.Array, rng: jax.Array, train: bool = False):
        """(pred patches, masking, model input) for a batch of raw images."""
        x = model_input(images, self.config)
        pred, masking = self.model.apply({"params": params}, x, train=train, rngs=self.apply_rngs(rng))
        return pred, masking, x

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, train: bool):
        pred, masking, x = self.reconstruct(params, batch["image"], rng, train)
        target = mae_lib.patch_targets(x, self.patch_size, self.config.model.norm_pix_loss)
        loss = mae_lib.mae_loss(pred, target, masking.mask)
        return loss, {"loss": loss}

    def evaluate(self, params: Any, mesh, step: int) -> dict:
        """Mean MAE loss on the evaluation split with fixed masks (the same every evaluation)."""
        source = self.source(self.config.data.eval_split)
        transform = augment.eval_transform(self.config)
        loss_fn = jax.jit(lambda p, images, key: self.loss(p, {"image": images}, key, False)[0])
        total, count = 0.0, 0
        for i, (batch, real) in enumerate(evaluation_batches(source, self.config.batch_size, transform, limit=256)):
            # Padded examples repeat a real one; the per-batch loss is weighted by the real count.
            loss = float(loss_fn(params, jnp.asarray(batch["image"][:real]), jax.random.key(i)))
            total += loss * real
            count += real
        return {"eval_loss": total / max(count, 1)}

    def summary_images(self, params: Any, mesh, step: int) -> dict:
        """Original / masked / reconstruction of the first evaluation examples (4 in 2-D, 2 in 3-D), same masks
        every evaluation."""
        from medmae_jax import summaries
        count = 4 if self.config.model.spatial_dims == 2 else 2
        source = self.source(self.config.data.eval_split)
        batch, real = next(evaluation_batches(source, count, augment.eval_transform(self.config), limit=count))
        if self._summary_fn is None:
            shardings = {} if mesh is None else {"out_shardings": NamedSharding(mesh, PartitionSpec())}
            self._summary_fn = jax.jit(self._reconstruction, **shardings)
        pred, mask, x = jax.device_get(self._summary_fn(params, jnp.asarray(batch["image"][:real])))
        image = summaries.reconstruction_image(x, pred, mask, self.patch_size, bool(self.config.model.norm_pix_loss))
        return {"reconstruction": image}

    def _reconstruction(self, params: Any, images: jax.Array):
        pred, masking, x = self.reconstruct(params, images, jax.random.key(0))
        return pred, masking.mask, x
