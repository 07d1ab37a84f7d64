"""The in-memory input cache: same examples, prepared once, within its budget, read-only; the cached
segmentation pipeline gives the same crops as the uncached one; the input benchmark reports both."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from medmae_jax.config_loading import load_config
from medmae_jax.data import pipeline
from medmae_jax.data.cache import CachedSource, cached, example_nbytes
from medmae_jax.tasks import get_task


class CountingSource:
    def __init__(self, n=6, size=1000):
        self.n, self.size, self.reads = n, size, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return {"image": np.full(self.size, i, np.float32), "index": np.int64(i)}


def test_cache_returns_the_same_examples_and_reads_each_once():
    source = CountingSource()
    prepared = []

    def prepare(ex):
        prepared.append(int(ex["index"]))
        return dict(ex, twice=ex["image"] * 2)

    c = CachedSource(source, prepare, max_bytes=1 << 30)
    for _ in range(3):
        for i in range(len(c)):
            ex = c[i]
            np.testing.assert_array_equal(ex["image"], np.full(1000, i, np.float32))
            np.testing.assert_array_equal(ex["twice"], 2 * ex["image"])
    assert source.reads == 6 and sorted(prepared) == list(range(6)) and c.num_cached == 6
    assert c.cached_bytes == sum(example_nbytes(c[i]) for i in range(6))


def test_cache_stays_within_its_budget_and_passes_the_rest_through():
    source = CountingSource(n=6, size=1000)           # 4008 bytes per example
    c = CachedSource(source, None, max_bytes=3 * 4008)
    for _ in range(2):
        for i in range(6):
            assert c[i]["image"][0] == i
    assert c.num_cached == 3 and c.cached_bytes <= 3 * 4008
    assert source.reads == 6 + 3                      # the uncached half is read again in the second epoch


def test_cached_arrays_are_read_only():
    c = CachedSource(CountingSource(), None)
    with pytest.raises(ValueError, match="read-only"):
        c[0]["image"][0] = 5.0
    assert cached(CountingSource(), None, 0.0).__class__ is CountingSource   # cache_gib 0: no wrapper


def test_cached_segmentation_pipeline_gives_the_same_crops():
    config = load_config(f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic")
    task = get_task(config)
    assert isinstance(task.train_source(), CachedSource)
    transform = task.train_transform()
    plain = pipeline.example_stream(task.source("train"), seed=3, transform=transform)
    cached_stream = pipeline.example_stream(task.train_source(), seed=3, transform=transform)
    for k in range(6):  # more than one epoch: the second one reads from the cache
        a, b = plain[k], cached_stream[k]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["target"], b["target"])


def test_input_benchmark_reports_both_pipelines():
    out = subprocess.run([sys.executable, "-m", "medmae_jax.main", "benchmark", "--what", "input", "--config",
                          f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic", "--examples", "2", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r.get("cache") for r in records[:2]] == [False, True]
    assert all(r["crops_per_s_per_core"] > 0 and r["crops_per_example"] == 2 for r in records[:2])
    assert records[2]["speedup_per_core"] == pytest.approx(
        records[1]["crops_per_s_per_core"] / records[0]["crops_per_s_per_core"], rel=0.02)
