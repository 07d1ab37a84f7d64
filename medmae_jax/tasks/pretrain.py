"""MAE self pre-training: masked-patch reconstruction on the target data set itself."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from medmae_jax.data import augment
from medmae_jax.data.pipeline import evaluation_batches
from medmae_jax.evaluate import sharded
from medmae_jax.models import mae as mae_lib
from medmae_jax.models.builders import build_mae, encoder_kwargs, model_input
from medmae_jax.tasks import base


class PretrainTask(base.Task):
    name = "pretrain"
    rng_streams = ("masking", "dropout", "droppath")
    best_metric = None
    _summary_fn = None  # jitted reconstruction for summary_images, compiled once

    def __init__(self, config):
        super().__init__(config)
        self._eval_fns: dict = {}  # mesh -> jitted eval_losses

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

    def eval_losses(self, params: Any, images: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B,) MAE loss and (B,) loss of the trivial patch-mean predictor (see mae.trivial_loss) of each example,
        with the masks of evaluation batch ``index`` (fixed across evaluations)."""
        pred, masking, x = self.reconstruct(params, images, jax.random.key(index), False)
        target = mae_lib.patch_targets(x, self.patch_size, self.config.model.norm_pix_loss)
        trivial = jnp.broadcast_to(target.mean(axis=-1, keepdims=True), target.shape)
        return (mae_lib.mae_loss_per_example(pred, target, masking.mask),
                mae_lib.mae_loss_per_example(trivial, target, masking.mask))

    def eval_function(self, mesh):
        """``eval_losses`` jitted for ``mesh``: rows split over its devices, the losses replicated."""
        if self._eval_fns.get(mesh) is None:
            self._eval_fns[mesh] = jax.jit(self.eval_losses, out_shardings=sharded.replicated(mesh))
        return self._eval_fns[mesh]

    def evaluate(self, params: Any, mesh, step: int) -> dict:
        """Mean MAE loss on the evaluation split with fixed masks (the same every evaluation), beside the loss of
        predicting each masked patch's mean (``eval_trivial_loss``) and their ratio: below 1 is learning. Sharded
        over the mesh (each process loads its rows); padding rows are left out."""
        mesh = sharded.default_mesh(mesh)
        source = self.source(self.config.data.eval_split)
        params = sharded.place_params(mesh, params)
        fn = self.eval_function(mesh)
        total, trivial, count = 0.0, 0.0, 0
        batches = sharded.eval_batches(source, self.config.batch_size, mesh, augment.eval_transform(self.config),
                                       limit=256, keys=("image",))
        for i, (batch, real) in enumerate(batches):
            losses, base = jax.device_get(fn(params, batch["image"], sharded.replicate(mesh, np.int32(i))))
            total += float(np.sum(np.asarray(losses)[:real], dtype=np.float64))
            trivial += float(np.sum(np.asarray(base)[:real], dtype=np.float64))
            count += real
        loss, trivial = total / max(count, 1), trivial / max(count, 1)
        out = {"eval_loss": loss, "eval_trivial_loss": trivial}
        if trivial > 0:  # all-flat masked patches (trivial 0) have no meaningful ratio
            out["eval_loss_over_trivial"] = loss / trivial
        return out

    def summary_images(self, params: Any, mesh, step: int) -> dict:
        """Original / masked / reconstruction of the first evaluation examples (4 in 2-D, 2 in 3-D), same masks
        every evaluation."""
        from medmae_jax import summaries  # matplotlib only when drawing
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
