"""``medmae-jax benchmark --what input``: training examples per second of a config's input pipeline.

Reads the config's training split through the same stream the trainer uses (shuffle, random
transform), once as read from disk every time and once through the in-memory cache
(``data.cache_gib``), and prints one JSON line per setting: examples/s and crops/s in one thread
(per core) and with ``data.loader_threads`` threads, and how many train steps per second of the
config's global batch that feeds. With ``processes`` (``--worker-processes N`` or
``data.worker_processes``) > 0 each record also has the figures of ``N`` worker processes: the
seconds to the first batch (spawning, imports and, with the cache, each worker's own first reads)
and the steady crops/s after each worker has prepared an epoch's worth of batches.
``--synthetic-volume D H W`` first writes BTCV-layout NIfTI phantoms of that size and builds
them with ``medmae-jax build btcv`` into a temporary folder, so the figures include the real
array_record read and decode.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from medmae_jax.data import cache as cache_lib
from medmae_jax.data import pipeline
from medmae_jax.data.datasets.synthetic import SyntheticPhantom3D
from medmae_jax.tasks import get_task

# A few SelfMedMAE-split case ids: train cases first, then one validation case.
_PHANTOM_CASES = {"train": (5, 6, 7, 9), "validation": (1,)}


def write_btcv_phantoms(root: str, shape: Sequence[int], spacing=(1.5, 1.5, 2.0), seed: int = 0) -> str:
    """BTCV ``RawData/Training/{img,label}`` NIfTI files of synthetic abdominal phantoms; returns the manual dir."""
    cases = [c for ids in _PHANTOM_CASES.values() for c in ids]
    phantoms = SyntheticPhantom3D(len(cases), tuple(int(s) for s in shape), seed)
    affine = np.diag([*spacing, 1.0])
    for i, case in enumerate(cases):
        ex = phantoms[i]
        hu = (np.asarray(ex["image"])[..., 0] * 425.0 - 175.0).astype(np.int16)  # undo the [-175, 250] window
        for kind, array in (("img", hu), ("label", np.asarray(ex["label"], np.uint8))):
            folder = os.path.join(root, "RawData", "Training", kind)
            os.makedirs(folder, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), os.path.join(folder, f"{kind}{case:04d}.nii.gz"))
    return root


def _time_stream(stream, count: int, start: int = 0) -> float:
    t0 = time.perf_counter()
    for k in range(start, start + count):
        stream[k]
    return time.perf_counter() - t0


def _time_loader(stream, batch: int, steps: int, threads: int) -> float:
    t0 = time.perf_counter()  # from a cold start: prefetching cannot hide work done before the clock starts
    loader = pipeline.BatchLoader(stream, batch, start_step=0, num_threads=threads, prefetch=2,
                                  process_index=0, process_count=1)
    try:
        for _ in range(steps):
            next(loader)
        return time.perf_counter() - t0
    finally:
        loader.close()


def _time_processes(stream, batch: int, steps: int, processes: int, warm_batches: int) -> tuple[float, float]:
    """(seconds to the first batch, seconds for ``steps`` batches after ``warm_batches``) with worker processes."""
    t0 = time.perf_counter()
    loader = pipeline.BatchLoader(stream, batch, start_step=0, num_threads=1, prefetch=2, process_index=0,
                                  process_count=1, num_processes=processes)
    try:
        next(loader)
        first = time.perf_counter() - t0
        for _ in range(warm_batches - 1):
            next(loader)
        t1 = time.perf_counter()
        for _ in range(steps):
            next(loader)
        return first, time.perf_counter() - t1
    finally:
        loader.close()


def measure_input(config, *, examples: int = 8, threads: Optional[int] = None,
                  processes: Optional[int] = None) -> list[dict]:
    """One record each for the pipeline read from disk every time and through the filled cache (with the
    worker-process figures when ``processes`` or ``data.worker_processes`` > 0)."""
    task = get_task(config)
    transform = task.train_transform()
    crops = int(config.get("segmentation", {}).get("crops_per_volume", 1)) if config.task == "segmentation" else 1
    threads = int(threads or config.data.loader_threads)
    processes = int(processes if processes is not None else config.data.get("worker_processes", 0))
    batch = int(config.batch_size)
    source = task.source(config.data.train_split)
    records = []
    for cached in (False, True):
        src = cache_lib.CachedSource(source, task.prepare_example, 1 << 62) if cached else source
        stream = pipeline.example_stream(src, seed=int(config.seed), transform=transform)
        fill = None
        if cached:  # one epoch fills the cache (the first epoch of training costs what the uncached pipeline does)
            t0 = time.perf_counter()
            for i in range(len(src)):
                src[i]
            fill = time.perf_counter() - t0
        _time_stream(stream, 1)  # warm-up (imports, first allocation)
        one = _time_stream(stream, examples, start=1)
        steps = max(2, examples // batch)
        many = _time_loader(stream, batch, steps, threads)
        per_core = examples / one
        per_host = steps * batch / many
        extra = {}
        if processes > 0:  # each worker fills its own cache: warm up for an epoch's worth of batches per worker
            warm = processes * max(2, -(-len(source) // batch))
            first, timed = _time_processes(stream, batch, steps, processes, warm)
            extra = {"worker_processes": processes, "first_batch_s": round(first, 2),
                     "crops_per_s_per_host_processes": round(steps * batch / timed * crops, 2)}
        records.append({
            "what": "input", "cache": cached, "data": config.data.name, "split": config.data.train_split,
            "examples": len(source), "crops_per_example": crops,
            "examples_per_s_per_core": round(per_core, 3), "crops_per_s_per_core": round(per_core * crops, 2),
            "loader_threads": threads, "crops_per_s_per_host": round(per_host * crops, 2),
            "global_batch": batch, "feeds_steps_per_s": round(per_host / batch, 3),
            "cache_fill_s": None if fill is None else round(fill, 2),
            "cache_gib": None if not cached else round(src.cached_bytes / cache_lib.GIB, 3),
            **extra,
        })
    records.append({"what": "input", "speedup_per_core": round(records[1]["crops_per_s_per_core"]
                                                               / records[0]["crops_per_s_per_core"], 2)})
    return records


def run(config, *, examples: int, threads: Optional[int], synthetic_volume: Optional[Sequence[int]] = None,
        processes: Optional[int] = None, emit=lambda r: print(json.dumps(r), flush=True)) -> list[dict]:
    """Measures ``config`` (after building BTCV-layout phantoms when ``synthetic_volume`` is given)."""
    if synthetic_volume is None:
        records = measure_input(config, examples=examples, threads=threads, processes=processes)
    else:
        from medmae_jax.data.datasets import btcv, tfds_utils  # tensorflow_datasets: only to build phantoms
        with tempfile.TemporaryDirectory(prefix="medmae-input-") as tmp:
            manual = write_btcv_phantoms(os.path.join(tmp, "manual"), synthetic_volume)
            tfds_utils.build(btcv.Btcv, manual, os.path.join(tmp, "tfds"), "selfmedmae")
            config.data.name, config.data.tfds_name = "btcv", "btcv/selfmedmae"
            config.data.data_dir = os.path.join(tmp, "tfds")
            records = measure_input(config, examples=examples, threads=threads, processes=processes)
            for r in records:
                r["volume"] = list(synthetic_volume)
    for r in records:
        emit(r)
    return records
