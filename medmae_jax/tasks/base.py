"""What the shared trainer needs from a task: a model, data, a loss and (optionally) an evaluation."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np

from medmae_jax.data import cache as cache_lib
from medmae_jax.data import sources
from medmae_jax.models.builders import encoder_kwargs


class Task:
    """Base class; subclasses set ``model`` and implement ``loss`` (and usually ``evaluate``).

    ``loss(params, batch, rng, train)`` is a pure function of its arguments and
    returns ``(scalar loss, dict of scalar metrics)``; the trainer jits it.
    """

    name = "task"
    rng_streams: tuple[str, ...] = ("dropout", "droppath")
    # Metric that selects the best checkpoint (None = no best-checkpoint keeping) and whether larger is better.
    best_metric: Optional[str] = None
    best_mode: str = "max"

    def __init__(self, config):
        self.config = config
        self.model: nn.Module = self.build_model()

    # --- model -----------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def init_inputs(self) -> dict:
        """Arguments for ``model.init`` (batch of 1, shapes only matter)."""
        raise NotImplementedError

    def init_variables(self, rng: jax.Array) -> Any:
        rngs = {"params": rng, **{s: jax.random.fold_in(rng, i + 1) for i, s in enumerate(self.rng_streams)}}
        return self.model.init(rngs, **self.init_inputs())

    def apply_rngs(self, rng: jax.Array) -> dict:
        return {s: jax.random.fold_in(rng, i + 1) for i, s in enumerate(self.rng_streams)}

    def model_depth(self) -> int:
        """Encoder depth (for layer-wise lr decay)."""
        return encoder_kwargs(self.config.model)["depth"]

    def initial_params(self, params: Any) -> Any:
        """Hook to replace freshly initialised params (e.g. from a pre-trained checkpoint). Host-side."""
        return params

    # --- data ------------------------------------------------------------------------------------------------
    def source(self, split: str):
        return sources.open_source(self.config.data, split)

    def train_source(self):
        """The training split, kept in memory after its first read (decoded and ``prepare_example``-d) up to
        ``data.cache_gib`` per host."""
        source = self.source(self.config.data.train_split)
        return cache_lib.cached(source, self.prepare_example, float(self.config.data.get("cache_gib", 0.0)))

    def prepare_example(self, example: dict) -> dict:
        """Deterministic per-example work done once before caching (the random transform runs every time)."""
        return example

    def train_transform(self) -> Optional[Callable[[dict, np.random.Generator], dict]]:
        """Per-example random transform (numpy, in the loader); None = identity."""
        return None

    def batch_keys(self) -> tuple[str, ...]:
        """The batch entries that go to the device."""
        return ("image",)

    # --- objective -------------------------------------------------------------------------------------------
    def rows_per_example(self) -> int:
        """Rows one training example adds to a step's device batch (crops per volume for segmentation)."""
        return 1

    def fold_rows(self, local_batch: dict) -> dict:
        """Host batch -> the rows the device batch holds (identity; segmentation folds crops into the batch)."""
        return local_batch

    def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, train: bool):
        raise NotImplementedError

    def evaluate(self, params: Any, mesh, step: int) -> dict:
        """Metrics on the evaluation split; default: none."""
        return {}

    def summary_images(self, params: Any, mesh, step: int) -> dict[str, np.ndarray]:
        """Named ``(H, W, 3)`` uint8 images for TensorBoard at an evaluation (every process calls it); default: none."""
        return {}
