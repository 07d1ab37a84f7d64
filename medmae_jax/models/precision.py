"""Mixed precision for accelerators: compute dtype per backend, dense layers with float32 weight gradients,
attention implementation per backend, and named remat policies.

Norms, softmax and losses compute in :func:`at_least_float32`: float32 for bfloat16/float16 activations, and the
activations' own dtype when that is wider, so the float64 mode (``model.dtype='float64'`` under ``jax_enable_x64``,
e.g. ``medmae-jax gradients --float64``) stays float64 end to end.

With ``dtype=bfloat16`` and float32 parameters, a plain ``nn.Dense`` casts the kernel to bfloat16 before the
matmul, so the weight gradient comes out of the backward matmul in bfloat16 and is rounded before it reaches the
float32 parameter. :class:`Dense` keeps the matmul inputs in the compute dtype (tensor cores) but accumulates and
returns the weight gradient in float32.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medmae_jax.errors import ConfigError

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
ATTENTION = ("auto", "xla", "cudnn")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def resolve_dtype(name: str, backend: str | None = None):
    """``"auto"`` -> bfloat16 on GPU/TPU, float32 on CPU; other names map to their jnp dtype."""
    if name == "auto":
        backend = backend or jax.default_backend()
        return jnp.float32 if backend == "cpu" else jnp.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"model.dtype or param_dtype: unknown dtype {name!r}; use 'auto' or one of {sorted(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("model.dtype/model.param_dtype 'float64' needs 64-bit JAX, which is off (JAX would "
                          "compute in float32): enable it before any array is made (JAX_ENABLE_X64=1, or "
                          "`medmae-jax gradients --float64`), or use 'float32'")
    return DTYPES[name]


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same fields, name and rng stream) whose mask comes from float32 uniforms whatever the compute
    dtype: under ``jax_enable_x64`` a Python-float rate would draw float64 uniforms, so the float64 mode would drop
    other units than the float32 run whose step it recomputes. Without x64 the masks are flax's, bit for bit."""

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # as flax: no NaN gradients at rate 1
            return jnp.zeros_like(inputs)
        keep = 1.0 - self.rate
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        shape = [1 if i in self.broadcast_dims else n for i, n in enumerate(inputs.shape)]
        mask = jnp.broadcast_to(jax.random.bernoulli(rng, jnp.float32(keep), shape), inputs.shape)
        return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in float32 if it is narrower (bfloat16, float16, integers), else unchanged (float32, float64): where
    norms, softmax and losses need at least float32, without lowering the float64 mode to float32."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dtype_name(name: str, backend: str | None = None) -> str:
    """The concrete dtype name behind ``name`` ('auto' resolved), e.g. for FLOP peaks and torch autocast."""
    return jnp.dtype(resolve_dtype(name, backend)).name


def resolve_attention(name: str, dtype, head_dim: int, backend: str | None = None) -> str | None:
    """Implementation for ``jax.nn.dot_product_attention``: cuDNN on GPU in 16-bit where its kernels apply
    (head dim a multiple of 8, at most 128), XLA (None) elsewhere."""
    if name not in ATTENTION:
        raise ConfigError(f"unknown attention implementation {name!r}; use one of {ATTENTION}")
    if name == "auto":
        backend = backend or jax.default_backend()
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        fits = head_dim % 8 == 0 and head_dim <= 128
        return "cudnn" if backend == "gpu" and half and fits else None
    return None if name == "xla" else name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, attention: str = "auto") -> jax.Array:
    """``jax.nn.dot_product_attention`` (B, L, H, D) with the configured implementation; 'auto' falls back to
    XLA when the cuDNN kernel refuses the shapes at trace time."""
    implementation = resolve_attention(attention, q.dtype, q.shape[-1])
    if implementation == "cudnn" and attention == "auto":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except Exception as err:  # noqa: BLE001 - any refusal of the fused kernel means: use XLA
            logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using XLA", err)
            return jax.nn.dot_product_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def remat_policy_name(remat: bool | str) -> str:
    """Accepts the former on/off switch: True -> 'full', False -> 'none'."""
    name = {True: "full", False: "none"}[remat] if isinstance(remat, bool) else str(remat)
    name = {"true": "full", "false": "none"}.get(name.lower(), name)
    if name not in REMAT_POLICIES:
        raise ConfigError(f"unknown remat policy {remat!r}; use one of {sorted(REMAT_POLICIES)} (or true/false)")
    return name


def remat_block(block_cls, remat: bool | str, static_argnums=(2,)):
    """The block class wrapped in ``nn.remat`` with the named policy (unchanged for 'none')."""
    name = remat_policy_name(remat)
    if name == "none":
        return block_cls
    return nn.remat(block_cls, static_argnums=static_argnums, policy=REMAT_POLICIES[name])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_matmul(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """(M, K) @ (K, N) with inputs in ``compute_dtype``, accumulated and returned in float32."""
    return jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x, w, compute_dtype):
    # Residuals in their own dtypes: activations are already in the compute dtype, the kernel is a parameter.
    return mixed_matmul(x, w, compute_dtype), (x, w)


def _mixed_matmul_bwd(compute_dtype, residuals, g):
    x, w = residuals
    xc, wc, g = x.astype(compute_dtype), w.astype(compute_dtype), g.astype(compute_dtype)
    dx = jnp.dot(g, wc.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(xc.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def contract(x: jax.Array, kernel: jax.Array, num_in_axes: int, compute_dtype) -> jax.Array:
    """Contracts the last ``num_in_axes`` of ``x`` with the first of ``kernel``.

    In float32 (or when kernel and compute dtype agree) this is an ordinary contraction; otherwise the
    mixed-precision matmul above, so weight gradients stay float32.
    """
    in_shape, out_shape = kernel.shape[:num_in_axes], kernel.shape[num_in_axes:]
    batch_shape = x.shape[: x.ndim - num_in_axes]
    k, n = math.prod(in_shape), math.prod(out_shape)
    x2, w2 = x.reshape(-1, k), kernel.reshape(k, n)
    if jnp.dtype(compute_dtype) == jnp.dtype(kernel.dtype):
        y = jnp.dot(x2.astype(compute_dtype), w2)
    else:
        y = mixed_matmul(x2, w2, jnp.dtype(compute_dtype))  # float32; the caller adds the bias, then casts
    return y.reshape(*batch_shape, *out_shape)


class Dense(nn.Module):
    """Dense layer over the last ``num_in_axes`` input axes to ``features`` output axes.

    Parameter names, shapes and initialisation equal ``nn.Dense`` / ``nn.DenseGeneral`` (a flat 2-D fan for the
    initialiser), so checkpoints and weight conversion are unaffected; only the gradient precision differs.
    """

    features: int | Sequence[int]
    num_in_axes: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = tuple(x.shape[x.ndim - self.num_in_axes:])
        shape = in_shape + features
        flat = (int(np.prod(in_shape)), int(np.prod(features)))
        kernel_init = self.kernel_init

        def init_flat(key, _shape, dtype=jnp.float32):
            kernel = kernel_init(key, flat, dtype)
            if isinstance(kernel, nn.meta.AxisMetadata):
                return nn.meta.replace_boxed(kernel, jnp.reshape(kernel.unbox(), shape))
            return jnp.reshape(kernel, shape)

        kernel = self.param("kernel", init_flat, shape, self.param_dtype)
        y = contract(x, kernel, self.num_in_axes, self.dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            y = y + bias.astype(y.dtype)  # in float32 on the mixed path: the bias gradient is summed in float32
        return y.astype(self.dtype)
