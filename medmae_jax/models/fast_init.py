"""Fast parameter initialisation: XLA compiles every threefry draw of ``init`` as its own kernel (~0.5 s each on a CPU,
and UNETR makes ~50 draws: 15-20 s before the first step). Parameters are drawn from a counter-based hash generator
instead (a murmur3-style finaliser of (key, counter): a few integer ops per value, same distributions, the same
values on every backend and sharding). Only ``init`` uses it; dropout and drop path keep the threefry keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
        from jax.extend.random import define_prng_impl  # registered on first use, not on import
        _HASH_PRNG = define_prng_impl(key_shape=(2,), seed=_hash_seed, split=_hash_split, random_bits=_hash_bits,
                                      fold_in=_hash_fold_in, name="medmae_hash32")
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    data = jnp.stack([data[0], data[-1]]) if data.shape[0] != 2 else data
    return jax.random.wrap_key_data(data, impl=_HASH_PRNG)
