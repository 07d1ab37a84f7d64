"""Remote workdirs: a ``gs://`` workdir is never turned into a local ``gs:`` folder, and a run there trains, writes
metrics and TensorBoard, checkpoints, resumes and is read back.

Stand-in for Google Cloud Storage (no network, no credentials): etils.epath's ``gs`` backend is replaced by one that
maps ``gs://bucket/...`` onto ``<tmp>/store/bucket/...``, and orbax's TensorStore GCS spec by a file spec at the same
place (and its bucket-layout query answers "flat"). Everything above those storage calls (paths, checkpoint
manager, metric writer, trainer) runs as it would on GCS. fsspec's ``memory://`` is not usable here: epath does not
register it and orbax writes arrays through TensorStore, whose file driver needs an absolute local path.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import tiny_pretrain_config
from etils.epath import backend as backend_lib
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

from medmae_jax import paths
from medmae_jax.train import checkpoint as ckpt_lib
from medmae_jax.train.metrics_writer import MetricsWriter
from medmae_jax.train.trainer import train_and_evaluate


class _MappedBackend(type(backend_lib.os_backend)):
    """epath's local backend with ``gs://`` paths mapped under a root folder (and mapped back in listings)."""

    def __init__(self, root: str):
        self.root = root

    def to_local(self, path):
        text = os.fspath(path)
        return os.path.join(self.root, text[len("gs://"):]) if text.startswith("gs://") else text

    def to_remote(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root) if path.startswith(self.root) else path

    def open(self, path, mode):
        local = self.to_local(path)
        if "w" in mode or "a" in mode:  # an object store has no folders to create first
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return super().open(local, mode)

    def exists(self, path):
        return super().exists(self.to_local(path))

    def isdir(self, path):
        return super().isdir(self.to_local(path))

    def listdir(self, path):
        return super().listdir(self.to_local(path))

    def glob(self, path):
        return [self.to_remote(p) for p in super().glob(self.to_local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.to_local(top), top_down=top_down, on_error=on_error):
            yield self.to_remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=0o777):
        return super().makedirs(self.to_local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=0o777):
        return super().mkdir(self.to_local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        return super().rmtree(self.to_local(path))

    def remove(self, path):
        return super().remove(self.to_local(path))

    def rename(self, path, dst):
        return super().rename(self.to_local(path), self.to_local(dst))

    def replace(self, path, dst):
        return super().replace(self.to_local(path), self.to_local(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self.to_local(path), self.to_local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.to_local(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://`` served from ``tmp_path/store``; the test runs in ``tmp_path/cwd`` (where a stray ``gs:`` would go)."""
    store = tmp_path / "store"
    store.mkdir()
    backend = _MappedBackend(str(store))
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False, raising=False)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": backend.to_local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(gcs_utils, "rmtree", lambda path: backend.rmtree(path))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return store


def _no_local_gs_folder(tmp_path):
    stray = [p for p in tmp_path.rglob("*") if p.name in ("gs:", "gs") and "store" not in p.parts]
    assert not stray, stray


def test_paths_keep_remote_uris_and_make_local_ones_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("gs://b/run")) == "gs://b/run"
    assert paths.join("gs://b/run", "checkpoints") == "gs://b/run/checkpoints"
    assert str(paths.resolve("runs/a")) == str(tmp_path / "runs" / "a")
    assert paths.is_remote("s3://x/y") and not paths.is_remote("/a/b") and not paths.is_remote("file:///a")


def test_metrics_and_checkpoint_manager_on_gs_stay_off_the_local_disk(fake_gcs, tmp_path):
    writer = MetricsWriter("gs://bucket/w")
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.0})
    writer.close()
    lines = (fake_gcs / "bucket" / "w" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [2.0, 1.0]
    mngr = ckpt_lib.manager("gs://bucket/w/checkpoints", keep=2, async_save=False)
    assert str(mngr.directory) == "gs://bucket/w/checkpoints"
    mngr.close()
    assert (fake_gcs / "bucket" / "w" / "checkpoints").is_dir()
    _no_local_gs_folder(tmp_path)


@pytest.mark.slow
def test_training_run_on_gs_checkpoints_resumes_and_reads_back(fake_gcs, tmp_path):
    workdir = "gs://bucket/run"
    config = tiny_pretrain_config(2, steps=2)
    config.eval_every_steps = -1
    config.checkpoint.every_steps = 2
    first = train_and_evaluate(config, workdir)
    assert first.last_step == 2
    config.num_train_steps = 3
    second = train_and_evaluate(config, workdir)
    assert second.first_step == 2 and second.last_step == 3
    run = fake_gcs / "bucket" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if r["split"] == "train"} >= {2, 3}
    assert any("tfevents" in p.name for p in (run / "tensorboard").rglob("*")) or not _has_tensorboardx()
    assert (run / "config.json").exists()
    params, meta = ckpt_lib.restore_params(workdir)
    assert meta["step"] == 3
    import jax
    restored, final = jax.tree.leaves(params), jax.tree.leaves(jax.device_get(second.state.params))
    assert len(restored) == len(final) > 10
    for a, b in zip(restored, final):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _no_local_gs_folder(tmp_path)


def _has_tensorboardx() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True
