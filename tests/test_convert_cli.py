"""``medmae-jax convert`` both ways, exact round trips, and converted weights used by the normal CLI."""

import json

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_pretrain_config
from flax import traverse_util

from medmae_jax.main import main
from medmae_jax.train import checkpoint as ckpt_lib
from medmae_jax.train.trainer import train_and_evaluate


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.mark.parametrize("dims,layout", [(2, "fair-mae"), (2, "monai-mae"), (3, "selfmedmae-mae3d"),
                                         (3, "monai-mae")])
@pytest.mark.slow
def test_round_trip_jax_torch_layout_jax_is_exact(tmp_path, dims, layout, capsys):
    c = tiny_pretrain_config(dims, steps=1)
    train_and_evaluate(c, str(tmp_path / "run"))
    original, _ = ckpt_lib.restore_params(str(tmp_path / "run"))
    exported = tmp_path / "weights.npz"
    assert main(["convert", "--to", "torch", "--layout", layout, str(tmp_path / "run"), str(exported)]) == 0
    keys = set(np.load(exported).files)
    assert any(k.startswith(("blocks.0.", "encoder.blocks.0.")) for k in keys)
    assert main(["convert", "--from", "torch", "--layout", layout, "--num-heads", str(c.model.num_heads),
                 "--decoder-heads", str(c.model.decoder_heads), str(exported), str(tmp_path / "back")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["clean"] and report["layout"] == layout
    back, meta = ckpt_lib.restore_params(str(tmp_path / "back"))
    a, b = _flat(original), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The converted checkpoint carries a training config for the model it holds.
    assert meta["config"]["model"]["width"] == c.model.width and meta["layout"] == layout


@pytest.mark.slow
def test_converted_checkpoint_records_its_model(tmp_path, capsys):
    """A converted checkpoint folder describes the model it holds (layout and sizes) in model.json."""
    c = tiny_pretrain_config(2, steps=1)
    train_and_evaluate(c, str(tmp_path / "run"))
    main(["convert", "--to", "torch", "--layout", "fair-mae", str(tmp_path / "run"), str(tmp_path / "w.safetensors")])
    main(["convert", "--from", "torch", "--num-heads", "3", "--decoder-heads", "3", str(tmp_path / "w.safetensors"),
          str(tmp_path / "conv")])
    capsys.readouterr()
    with open(tmp_path / "conv" / "model.json") as f:
        model = json.load(f)
    assert model["layout"] == "fair-mae" and model["encoder"]["width"] == c.model.width


def test_unknown_layout_and_bad_file_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"something.weight": np.zeros((3, 3), np.float32)})
    assert main(["convert", "--from", "torch", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "layout" in err.lower()


@pytest.mark.slow
def test_converted_mae_fine_tunes_through_the_cli(tmp_path, capsys):
    """PyTorch-layout MAE weights -> convert -> `train` with init=mae on the :quick fine-tuning config."""
    pretrain = str(REPO / "configs/cxr14_mae.py:quick,data=synthetic")
    assert main(["train", "--config", pretrain, "--workdir", str(tmp_path / "mae"), "--config.num_train_steps=1"]) == 0
    assert main(["convert", "--to", "torch", "--layout", "fair-mae", str(tmp_path / "mae"),
                 str(tmp_path / "mae.npz")]) == 0
    assert main(["convert", "--from", "torch", "--num-heads", "3", "--decoder-heads", "3", str(tmp_path / "mae.npz"),
                 str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    finetune = str(REPO / f"configs/cxr14_finetune.py:quick,data=synthetic,init=mae,"
                          f"init_checkpoint={tmp_path / 'converted'}")
    assert main(["train", "--config", finetune, "--workdir", str(tmp_path / "ft"), "--config.num_train_steps=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 2 and np.isfinite(report["eval"]["mean_auc"])
    # The fine-tuned encoder started from the converted weights: block 0 moved only by two small steps.
    mae, _ = ckpt_lib.restore_params(str(tmp_path / "converted"))
    ft, _ = ckpt_lib.restore_params(str(tmp_path / "ft"))
    a = mae["encoder"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
    b = ft["encoder"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))
