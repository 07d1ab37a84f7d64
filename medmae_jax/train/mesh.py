"""Device mesh from the config, and logical-axis rules -> ``NamedSharding`` for params, state and batches.

The mesh has axes ``data`` and ``fsdp``: the batch is split over both, and
parameters (plus their optimizer state) are split over ``fsdp`` along the
logical axes the rule table names. ``data=8`` is plain data parallelism,
``fsdp=8`` is ZeRO-3-style sharding, ``data=1, fsdp=1`` is one device; all come
from the same rules. A dimension that a mesh axis does not divide is kept
replicated rather than failing, and reported once.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medmae_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None). Parameters are sharded over 'fsdp' along their embedding axis; with
# fsdp=1 that is replication, so one table serves replicated, data-parallel and FSDP runs.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("patch", None),
)


def mesh_shape(config_mesh: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve ``-1`` (at most one) so that the product is the device count."""
    sizes = [int(config_mesh.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"{num_devices} available")
    return tuple(sizes)


def make_mesh(config_mesh: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config_mesh, len(devices))
    # Auto axes: the jit in/out shardings decide the layout (newer JAX may default to Explicit axes).
    auto = (jax.sharding.AxisType.Auto,) * len(shape) if hasattr(jax.sharding, "AxisType") else None
    try:  # topology-aware device order (ICI rings on TPU, NVLink islands on GPU)
        return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)
    except Exception:  # unusual topologies: plain order is fine
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(rules: Optional[Sequence] = None) -> tuple:
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


_warned: set = set()


def _spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: Mapping) -> P:
    used: set = set()
    spec = []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size == 0:
            spec.append(axes[0] if len(axes) == 1 else axes)
            used.update(axes)
        else:
            if axes and (name, dim) not in _warned:
                _warned.add((name, dim))
                log.info("axis %s of size %d is not divisible by mesh axes %s; kept replicated", name, dim, axes)
            spec.append(None)
    return P(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree whose leaves may be logically-partitioned boxes (others are replicated).

    The result has the structure of ``flax.linen.unbox(abstract_tree)``.
    """
    rule_map = dict(rules)

    def one(leaf):
        if _is_box(leaf):
            value = leaf.unbox()
            return NamedSharding(mesh, _spec_for(leaf.names, value.shape, mesh, rule_map))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def check_batch_fits(batch_size: int, rows_per_example: int, config_mesh: Mapping[str, int], num_devices: int,
                     num_processes: int = 1) -> None:
    """Fail early (before data or compilation) when a step's rows do not split over the batch axes or processes.

    A step has ``batch_size * rows_per_example`` rows (segmentation folds its crops into the batch axis).
    """
    shape = mesh_shape(config_mesh, num_devices)
    split = math.prod(shape[MESH_AXES.index(a)] for a in BATCH_AXES)
    rows = int(batch_size) * int(rows_per_example)
    what = f"batch_size {batch_size}" + (f" x {rows_per_example} crops = {rows} rows" if rows_per_example > 1 else "")
    if batch_size % num_processes:
        raise ConfigError(f"{what}: batch_size must be a multiple of the {num_processes} processes (each loads an "
                          f"equal share); use batch_size={_next_multiple(batch_size, num_processes)}")
    if rows % split:
        fits = math.gcd(rows, num_devices)
        suggested = (_next_multiple(rows, split) if rows_per_example == 1
                     else _fit(batch_size, rows_per_example, split))
        raise ConfigError(
            f"{what} does not split over the mesh's batch axes {dict(zip(MESH_AXES, shape))} ({split} devices): "
            f"use batch_size={suggested}"
            f" on this mesh, or a mesh of {fits} devices (mesh.data={fits}, mesh.fsdp=1)")


def _next_multiple(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def _fit(batch_size: int, rows_per_example: int, split: int) -> int:
    """Smallest batch >= batch_size whose rows (batch x crops) divide over ``split`` devices."""
    b = batch_size
    while (b * rows_per_example) % split:
        b += 1
    return b
