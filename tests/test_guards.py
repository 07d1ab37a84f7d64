"""Bad inputs fail fast, in one line, before anything is written: a voxel size that would need a giant resampled
grid, a prediction output that cannot be a NIfTI file; a failed build or fine-tune leaves no partial folders."""

import os
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

from medmae_jax.config_loading import load_config
from medmae_jax.data import nifti
from medmae_jax.errors import DataError
from medmae_jax.main import main
from medmae_jax.train import checkpoint as ckpt_lib


def _volume(path, spacing):
    data = np.random.default_rng(0).uniform(-100, 200, (12, 12, 8)).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


def _fails_fast(capsys, *argv, words=(), limit=5.0):
    started = time.time()
    code = main([str(a) for a in argv])
    seconds = time.time() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and seconds < limit, (code, seconds, err)
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert str(word) in err, (word, err)
    return err


@pytest.fixture(scope="module")
def unetr_checkpoint(tmp_path_factory):
    """A checkpoint folder whose record holds a :quick UNETR config (the commands fail before its weights)."""
    run = tmp_path_factory.mktemp("unetr")
    config = load_config(f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic")
    mngr = ckpt_lib.manager(str(run / "checkpoints"), keep=1, async_save=False)
    ckpt_lib.save(mngr, 1, {"params": {"w": np.zeros(2, np.float32)}},
                  {"step": 1, "seed": 0, "config": __import__("json").loads(config.to_json_best_effort())}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return run


def test_huge_voxel_size_is_refused_before_resampling(tmp_path, capsys, unetr_checkpoint):
    huge = _volume(tmp_path / "in" / "huge.nii.gz", (1000.0, 1000.0, 1000.0))
    started = time.time()
    with pytest.raises(DataError, match=r"huge\.nii\.gz: resampling \(12, 12, 8\) voxels of 1000x1000x1000 mm to "
                                        r"1\.5x1\.5x2 mm gives a \(7334, 7334, 3501\) grid"):
        nifti.load_case(huge, pixdim=(1.5, 1.5, 2.0))
    assert time.time() - started < 5

    out = tmp_path / "seg.nii.gz"
    _fails_fast(capsys, "predict", "--checkpoint", unetr_checkpoint, "--input", huge, "--output", out, "--no-progress",
                words=(huge, "(12, 12, 8)", "voxels", "header"))
    assert not out.exists()

    data_dir = tmp_path / "tfds"
    _fails_fast(capsys, "build", "nifti", "--manual-dir", tmp_path / "in", "--data-dir", data_dir, "--name", "mine",
                "--no-progress", words=(huge, "grid"))
    assert not data_dir.exists()
    # An existing data_dir keeps what it held; only the failed build's folders go.
    (data_dir / "other").mkdir(parents=True)
    (data_dir / "other" / "keep.txt").write_text("x")
    _fails_fast(capsys, "build", "nifti", "--manual-dir", tmp_path / "in", "--data-dir", data_dir, "--name", "mine",
                "--no-progress", words=(huge,))
    assert sorted(os.listdir(data_dir)) == ["other"] and (data_dir / "other" / "keep.txt").exists()


@pytest.mark.parametrize("output,words", [("seg", ".nii.gz"), ("seg.txt", ".nii.gz"), ("afile/seg.nii.gz", "a file"),
                                          ("adir", "folder")])
def test_bad_prediction_output_is_refused_before_inference(tmp_path, capsys, unetr_checkpoint, output, words):
    ct = _volume(tmp_path / "ct.nii.gz", (1.5, 1.5, 2.0))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.nii.gz").mkdir()
    output = "adir.nii.gz" if output == "adir" else output
    before = sorted(os.listdir(tmp_path))
    _fails_fast(capsys, "predict", "--checkpoint", unetr_checkpoint, "--input", ct, "--output", tmp_path / output,
                "--no-progress", words=(tmp_path / output, words))
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_init_checkpoint_fails_before_training(tmp_path, capsys):
    workdir = tmp_path / "ft"
    _fails_fast(capsys, "train", "--config", f"{REPO}/configs/cxr14_finetune.py:quick,data=synthetic,init=mae,"
                f"init_checkpoint={tmp_path / 'missing'}", "--workdir", workdir, "--no-progress",
                words=(tmp_path / "missing", "does not exist"), limit=30)  # first imports of the task, no data
    assert not (workdir / "checkpoints").exists()


def test_failed_fine_tune_leaves_no_empty_checkpoints(tmp_path, monkeypatch):
    """A run that dies before its first save (here: in its first step) removes the checkpoints/ it made."""
    from conftest import tiny_pretrain_config

    from medmae_jax.train.trainer import Trainer

    trainer = Trainer(tiny_pretrain_config(2, steps=1), str(tmp_path / "run"))

    def crash(mngr):
        assert (tmp_path / "run" / "checkpoints").is_dir()
        raise RuntimeError("killed")

    monkeypatch.setattr(trainer, "_run", crash)
    with pytest.raises(RuntimeError, match="killed"):
        trainer.run()
    assert not (tmp_path / "run" / "checkpoints").exists()
