"""Deterministic, resumable loaders over random-access data sources (TFDS array_record or synthetic).

Example ``k`` of the (infinite, per-epoch reshuffled) stream is fixed by
``(seed, k)``: grain's ``MapDataset`` shuffles by epoch and seeds each random
transform from the stream position. The global batch of step ``s`` is stream
positions ``[s * B, (s + 1) * B)``; process ``p`` of ``P`` loads its contiguous
``B / P`` share. Resuming at step ``s`` therefore replays exactly the same
batches, with no iterator state to checkpoint beyond the step number.
"""

from __future__ import annotations

import concurrent.futures
import queue
from typing import Callable, Iterator, Optional

import grain
import jax
import numpy as np

Example = dict
RandomTransform = Callable[[Example, np.random.Generator], Example]


def example_stream(source, *, seed: int, shuffle: bool = True, transform: Optional[RandomTransform] = None,
                   repeat: bool = True) -> grain.MapDataset:
    """An indexable stream: shuffled per epoch (if asked), repeated, randomly transformed per position."""
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    if transform is not None:
        ds = ds.random_map(transform, seed=seed + 1)
    return ds


def stack_examples(examples: list[Example]) -> dict:
    """List of dicts of arrays -> dict of stacked arrays (non-array values are kept as lists)."""
    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if isinstance(values[0], (np.ndarray, np.generic, int, float, bool)):
            out[key] = np.stack([np.asarray(v) for v in values])
        else:
            out[key] = values
    return out


class BatchLoader:
    """Iterates this process's share of global batches from ``start_step`` on, prefetching in threads."""

    def __init__(self, stream, global_batch_size: int, *, start_step: int = 0, num_threads: int = 4,
                 prefetch: int = 2, process_index: Optional[int] = None, process_count: Optional[int] = None):
        self.stream = stream
        self.global_batch_size = int(global_batch_size)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {self.process_count} processes")
        self.local_batch_size = self.global_batch_size // self.process_count
        self.step = int(start_step)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(num_threads, 1))
        self._prefetch = max(prefetch, 1)
        self._pending: "queue.Queue" = queue.Queue()
        self._next_to_submit = self.step

    def positions(self, step: int) -> range:
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def load(self, step: int) -> dict:
        """This process's share of the global batch of ``step`` (synchronous)."""
        return stack_examples(list(self._pool.map(self.stream.__getitem__, self.positions(step))))

    def _submit(self):
        step = self._next_to_submit
        futures = [self._pool.submit(self.stream.__getitem__, i) for i in self.positions(step)]
        self._pending.put((step, futures))
        self._next_to_submit += 1

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while self._pending.qsize() < self._prefetch:
            self._submit()
        step, futures = self._pending.get()
        assert step == self.step
        self.step += 1
        return stack_examples([f.result() for f in futures])

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def to_global_arrays(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
    """Assemble per-process numpy batches into global ``jax.Array``s sharded over the mesh's batch axes."""
    out = {}
    for key, value in local_batch.items():
        if not isinstance(value, np.ndarray):
            continue
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def evaluation_batches(source, batch_size: int, transform: Optional[Callable[[Example], Example]] = None,
                       limit: Optional[int] = None) -> Iterator[tuple[dict, int]]:
    """One pass over a source in order, padded to full batches; yields (batch, number of real examples)."""
    n = len(source) if limit is None else min(len(source), int(limit))
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        examples = [source[i] for i in idx]
        if transform is not None:
            examples = [transform(e) for e in examples]
        real = len(examples)
        examples += [examples[-1]] * (batch_size - real)
        yield stack_examples(examples), real
