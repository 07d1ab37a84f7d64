"""Per-sample random masking by argsort of uniform noise (MAE), jit-friendly.

The noise is drawn for the whole global batch from one key, so with
``jax_threefry_partitionable`` (the default in current JAX) the mask of every
sample is the same whatever the number of devices the batch is sharded over.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
    keep_indices: jax.Array     # (B, K) int32: visible tokens, in shuffled order
    restore_indices: jax.Array  # (B, L) int32: argsort of the shuffle; un-shuffles [visible, masked]
    mask: jax.Array             # (B, L) float32: 1 = masked (hidden from the encoder), 0 = visible


def num_kept(num_tokens: int, ratio: float) -> int:
    """Visible tokens per sample, ``int(L * (1 - ratio))`` as in the official MAE."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
    return max(int(num_tokens * (1.0 - ratio)), 1)


def masking_from_noise(noise: jax.Array, len_keep: int) -> Masking:
    """Masking from per-token scores: the ``len_keep`` smallest scores of each row stay visible."""
    shuffle = jnp.argsort(noise, axis=1)
    restore = jnp.argsort(shuffle, axis=1)
    mask = (restore >= len_keep).astype(jnp.float32)
    return Masking(shuffle[:, :len_keep].astype(jnp.int32), restore.astype(jnp.int32), mask)


def random_masking(key: jax.Array, batch: int, num_tokens: int, ratio: float) -> Masking:
    """Random keep/restore indices and binary mask for ``batch`` samples of ``num_tokens`` tokens."""
    noise = jax.random.uniform(key, (batch, num_tokens), jnp.float32)  # float32 under jax_enable_x64 too
    return masking_from_noise(noise, num_kept(num_tokens, ratio))


def gather_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """(B, L, D) tokens at (B, K) indices -> (B, K, D)."""
    return jnp.take_along_axis(tokens, indices[..., None], axis=1)
