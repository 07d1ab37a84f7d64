"""Evaluation over the mesh instead of replicated host loops.

An evaluation batch is a global ``jax.Array`` whose rows are split over every mesh axis, like a
training batch; each process loads (and transforms) only the rows its own devices hold. The batch
is padded to a multiple of the device count by repeating the last real example, and a ``valid``
row mask (1 real, 0 padding) lets metrics count every real example exactly once. Outputs come
back replicated, so every process computes the same metrics from the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from medmae_jax.data.pipeline import stack_examples


def default_mesh(mesh: Optional[Mesh] = None) -> Mesh:
    """The given mesh, or one axis over every device (evaluation outside a training run)."""
    if mesh is not None:
        return mesh
    return Mesh(np.asarray(jax.devices()), ("devices",))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over all mesh axes (the batch axes of a training step), the rest replicated."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_size(batch_size: int, mesh: Mesh) -> int:
    """Smallest multiple of the mesh's device count that holds ``batch_size`` rows."""
    return -(-int(batch_size) // mesh.size) * mesh.size


def local_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """Sorted row indices (of a ``global_rows``-row batch) held by this process's devices."""
    index_map = row_sharding(mesh).addressable_devices_indices_map((global_rows,))
    rows: set[int] = set()
    for index in index_map.values():
        rows.update(range(global_rows)[index[0]])
    return np.asarray(sorted(rows), np.int64)


def to_global(mesh: Mesh, rows: np.ndarray, local: np.ndarray, global_rows: int) -> jax.Array:
    """A global row-sharded array from the ``rows`` this process holds (``local[i]`` is row ``rows[i]``)."""
    position = {int(r): i for i, r in enumerate(rows)}

    def shard(index):
        wanted = range(global_rows)[index[0]]
        return local[[position[r] for r in wanted]]

    return jax.make_array_from_callback((global_rows,) + local.shape[1:], row_sharding(mesh), shard)


def replicate(mesh: Mesh, value: np.ndarray) -> jax.Array:
    """A host array (the same on every process) as a global array replicated over the mesh."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, replicated(mesh), lambda index: value[index])


def place_params(mesh: Mesh, params: Any) -> Any:
    """Host (numpy) parameters replicated over the mesh; global arrays (a training state) are kept as they are."""
    def one(x):
        if isinstance(x, jax.Array):
            return x
        return replicate(mesh, np.asarray(x))
    return jax.tree.map(one, params)


def eval_batches(source, batch_size: int, mesh: Mesh, transform: Optional[Callable[[dict], dict]] = None,
                 limit: Optional[int] = None, keys: Optional[tuple[str, ...]] = None
                 ) -> Iterator[tuple[dict[str, jax.Array], int]]:
    """One ordered pass over ``source`` in global batches of ``padded_size(batch_size)`` rows.

    Yields ``(batch, real)``: ``batch`` maps each array entry (or only ``keys``) to a row-sharded
    global array plus ``valid`` (float32, 0 on padding rows); ``real`` is the number of real rows.
    This process reads and transforms only its own rows.
    """
    n = len(source) if limit is None else min(len(source), int(limit))
    size = padded_size(batch_size, mesh)
    rows = local_rows(mesh, size)
    for start in range(0, n, size):
        real = min(size, n - start)
        index = np.minimum(start + rows, n - 1)
        examples = [source[int(i)] for i in index]
        if transform is not None:
            examples = [transform(e) for e in examples]
        local = stack_examples(examples)
        local = {k: v for k, v in local.items() if isinstance(v, np.ndarray) and (keys is None or k in keys)}
        local["valid"] = (start + rows < n).astype(np.float32)
        yield {k: to_global(mesh, rows, v, size) for k, v in local.items()}, real
