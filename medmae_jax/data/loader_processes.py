"""Whole training batches loaded in worker processes (``data.worker_processes``), through grain's ``mp_prefetch``.

3-D examples (NIfTI decode, resampling, ROI crops in numpy) are CPU bound and threads share one
GIL, so ``BatchLoader`` can hand the work to processes instead. The position-based design maps
onto grain directly: a ``MapDataset`` over step numbers ``start, start + 1, ...`` whose element
``s`` is this process's share of the global batch of step ``s`` (stream positions fixed by
``(seed, s)``), turned into an ``IterDataset`` and prefetched by ``mp_prefetch``: worker ``w`` of
``N`` builds the batches of steps ``start + w, start + w + N, ...`` and grain interleaves them
round robin, so batches are bit-identical to the thread loader's and resume at step ``s`` only
needs ``s``. Workers are spawned (never forked: JAX is multithreaded) and receive the stream
once, pickled with cloudpickle; a stream that cannot be pickled is a ``ConfigError``.

Workers never touch an accelerator: before the stream is unpickled they set
``JAX_PLATFORMS=cpu`` (and hide CUDA devices), and they ignore SIGINT and SIGTERM so the parent
decides when to stop: a Ctrl-C or a preemption SIGTERM sent to the whole process group reaches
the trainer, which saves a checkpoint and closes the loader, instead of killing the workers under
it. They end when the loader is closed (the trainer closes it on success, exception and
SIGTERM preemption) and, by a watchdog thread, as soon as the parent process is gone (a parent
killed outright leaves no orphans).

A script that trains with worker processes needs the ``if __name__ == "__main__":`` guard (a
spawned worker imports the parent's main module; ``medmae-jax`` and notebooks need nothing).

Decoded-volume cache (``data.cache_gib``): each worker unpickles its own copy of the stream and
so holds its own, initially empty :class:`~medmae_jax.data.cache.CachedSource`; every worker sees
every volume over an epoch, so a host holds up to ``N * data.cache_gib`` of cached volumes and
fills the cache ``N`` times (once per worker, in parallel) during the first epoch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from multiprocessing import parent_process
from typing import Callable

import cloudpickle
import grain
import numpy as np
from absl import flags

from medmae_jax.errors import ConfigError

_NO_END = sys.maxsize  # the stream repeats forever; the trainer stops asking


def _exit_with_parent():
    parent = parent_process()
    if parent is not None:
        parent.join()  # returns when the parent process ends, however it ended
        os._exit(0)


def worker_init(index: int, count: int):
    """Runs first in each worker: CPU-only JAX, SIGINT/SIGTERM left to the parent, exit with the parent."""
    del index, count
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    jax = sys.modules.get("jax")  # grain imports jax, but no backend has been initialised yet
    if jax is not None:
        jax.config.update("jax_platforms", "cpu")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def check_picklable(stream) -> None:
    """Raise a ``ConfigError`` naming ``data.worker_processes`` when the stream cannot go to a worker process."""
    try:
        cloudpickle.dumps(stream)
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError, ... depending on the object
        raise ConfigError(
            f"data.worker_processes > 0 needs a picklable data source and transform, but pickling the training "
            f"stream failed: {type(exc).__name__}: {exc}. Set data.worker_processes=0 (loader threads) or make "
            f"the source/transform picklable") from exc


def _own_arrays(value):
    """Plain numpy copies of grain's shared-memory arrays (a 0.02 s copy per 100 MB): the segments are released
    at once instead of whenever the consumer drops the batch, and callers get the thread loader's types."""
    if isinstance(value, np.ndarray):
        return np.array(value)
    if isinstance(value, dict):
        return {k: _own_arrays(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_own_arrays(v) for v in value)
    return value


class ProcessBatches:
    """Iterator over ``step_batch(s)`` for ``s = start_step, start_step + 1, ...``, built in ``num_workers`` spawned
    processes (``step_batch`` is any picklable callable; ``pipeline.StepBatch`` in the trainer)."""

    def __init__(self, step_batch: Callable[[int], object], start_step: int, num_workers: int, prefetch: int):
        check_picklable(step_batch)
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults here) when it starts workers
            flags.FLAGS.mark_as_parsed()
        steps = grain.MapDataset.range(int(start_step), _NO_END).map(step_batch)
        per_worker = max(1, -(-int(prefetch) // int(num_workers)))  # ceil: at least `prefetch` batches in flight
        options = grain.multiprocessing.MultiprocessingOptions(num_workers=int(num_workers),
                                                               per_worker_buffer_size=per_worker)
        # One batch at a time in each worker: grain's default ReadOptions would prefetch up to 500 batches in 16
        # threads inside every worker (gigabytes of 3-D crops, and GIL contention); the depth is set above.
        sequential = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        batches = steps.to_iter_dataset(read_options=sequential)
        self._iterator = iter(batches.mp_prefetch(options, worker_init_fn=worker_init))
        self._closed = False

    def __next__(self):
        return _own_arrays(next(self._iterator))

    def close(self):
        if not self._closed:
            self._closed = True
            self._iterator.close()
            self._iterator = None  # collected now, not at interpreter exit (grain's __del__ closes once more)
