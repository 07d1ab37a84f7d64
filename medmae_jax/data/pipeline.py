"""Deterministic, resumable loaders over random-access data sources (TFDS array_record or synthetic).

Example ``k`` of the (infinite, per-epoch reshuffled) stream is fixed by
``(seed, k)``: grain's ``MapDataset`` shuffles by epoch and seeds each random
transform from the stream position. The global batch of step ``s`` is stream
positions ``[s * B, (s + 1) * B)``; process ``p`` of ``P`` loads its contiguous
``B / P`` share. Resuming at step ``s`` therefore replays exactly the same
batches, with no iterator state to checkpoint beyond the step number.

``BatchLoader`` builds examples in threads (``data.loader_threads``) or, with
``data.worker_processes`` > 0, whole batches in spawned worker processes
(``loader_processes.py``); both give bit-identical batches for the same seed and step.
"""

from __future__ import annotations

import concurrent.futures
import queue
from typing import Callable, Iterator, Optional

import grain
import jax
import numpy as np

from medmae_jax.data import loader_processes

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


class StepBatch:
    """``step -> (step, this process's share of that step's global batch)``: a picklable job for a worker process."""

    def __init__(self, stream, global_batch_size: int, local_batch_size: int, process_index: int):
        self.stream = stream
        self.global_batch_size, self.local_batch_size = int(global_batch_size), int(local_batch_size)
        self.process_index = int(process_index)

    def positions(self, step: int) -> range:
        start = int(step) * self.global_batch_size + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def __call__(self, step: int) -> tuple[int, dict]:
        return int(step), stack_examples([self.stream[i] for i in self.positions(step)])


class BatchLoader:
    """Iterates this process's share of global batches from ``start_step`` on, prefetching in threads or, with
    ``num_processes`` > 0, in that many worker processes (each builds whole batches; see ``loader_processes``).

    With processes, each worker unpickles its own copy of ``stream``: a ``CachedSource`` in it is one cache per
    worker (up to ``num_processes`` x its budget per host). ``close()`` stops the workers; call it (or use the
    loader as a context manager) on every exit path.
    """

    def __init__(self, stream, global_batch_size: int, *, start_step: int = 0, num_threads: int = 4,
                 prefetch: int = 2, process_index: Optional[int] = None, process_count: Optional[int] = None,
                 num_processes: int = 0):
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
        self._step_batch = StepBatch(stream, self.global_batch_size, self.local_batch_size, self.process_index)
        self._processes = None
        if num_processes and num_processes > 0:
            self._processes = loader_processes.ProcessBatches(self._step_batch, self.step, int(num_processes),
                                                              self._prefetch)

    def positions(self, step: int) -> range:
        return self._step_batch.positions(step)

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
        if self._processes is not None:
            step, batch = next(self._processes)
            if step != self.step:
                raise RuntimeError(f"worker processes returned the batch of step {step}, expected {self.step}")
            self.step += 1
            return batch
        while self._pending.qsize() < self._prefetch:
            self._submit()
        step, futures = self._pending.get()
        assert step == self.step
        self.step += 1
        return stack_examples([f.result() for f in futures])

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.close()

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc):
        self.close()


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
