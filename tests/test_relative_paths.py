"""Every command that reads a checkpoint accepts a path relative to the working directory (orbax wants absolute
ones; the project makes them so)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from medmae_jax.main import main

COMMON = ["--config.num_train_steps=1", "--config.checkpoint.async_save=false", "--config.data.loader_threads=2",
          "--no-progress"]


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-step 2-D MAE and a one-step UNETR, trained once for the module (absolute workdirs)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--config", f"{REPO}/configs/cxr14_mae.py:quick,data=synthetic", "--workdir",
                 str(root / "mae"), "--config.data.num_train=8", "--config.data.num_eval=4", *COMMON]) == 0
    assert main(["train", "--config", f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic", "--workdir",
                 str(root / "unetr"), "--config.batch_size=1", "--config.segmentation.eval_limit=0", *COMMON]) == 0
    return root


@pytest.mark.slow
def test_checkpoint_reading_commands_take_relative_paths(runs, tmp_path, monkeypatch, capsys):
    capsys.readouterr()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    mae, unetr = os.path.relpath(runs / "mae"), os.path.relpath(runs / "unetr")
    assert not os.path.isabs(mae) and mae.startswith("..")

    out = _cli(capsys, "train", "--config",
               f"{REPO}/configs/cxr14_finetune.py:quick,data=synthetic,init=mae,init_checkpoint={mae}",
               "--workdir", "ft", "--config.data.num_train=8", "--config.data.num_eval=4", *COMMON)
    assert json.loads(out.strip().splitlines()[-1])["step"] == 1

    out = _cli(capsys, "evaluate", "--checkpoint", "ft", "--output", "metrics.json", "--no-progress")
    assert json.loads((tmp_path / "here" / "metrics.json").read_text())

    png = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    Image.fromarray(png).save("x.png")
    _cli(capsys, "reconstruct", "--checkpoint", mae, "--images", "x.png", "--output", "recon.png", "--no-progress")
    assert (tmp_path / "here" / "recon.png").stat().st_size > 0

    ct = np.random.default_rng(1).uniform(-200, 300, (20, 20, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 1.5, 1.0])), "ct.nii.gz")
    _cli(capsys, "predict", "--checkpoint", unetr, "--input", "ct.nii.gz", "--output", "seg.nii.gz", "--no-progress")
    assert nib.load(tmp_path / "here" / "seg.nii.gz").shape == (20, 20, 20)

    _cli(capsys, "convert", "--to", "torch", "--layout", "fair-mae", mae, "mae.npz")
    assert any(k.startswith("blocks.0.") for k in np.load(tmp_path / "here" / "mae.npz").files)
