"""Config files, ``:arg`` parsing, ``--config.key=value`` overrides and their errors, the CLI."""

import glob
import json
import os

import pytest
from conftest import REPO

from medmae_jax import config_loading
from medmae_jax.errors import ConfigError
from medmae_jax.main import main

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["", "quick"])
def test_every_config_loads(path, arg):
    config = config_loading.load_config(f"{path}:{arg}" if arg else path)
    assert config.task in ("pretrain", "segmentation", "classification")
    assert config.batch_size > 0
    if arg == "quick":
        assert config.model.width <= 192 and 0 < config.num_train_steps <= 50


def test_paper_settings_of_the_pretraining_configs():
    cxr = config_loading.load_config(str(REPO / "configs/cxr14_mae.py"))
    assert (cxr.model.variant, cxr.model.input_size, cxr.model.mask_ratio, cxr.num_epochs) == (
        "B/16", (224, 224), 0.75, 800)
    btcv = config_loading.load_config(str(REPO / "configs/btcv_mae3d.py:mask_ratio=0.5"))
    assert btcv.model.input_size == (96, 96, 96) and btcv.model.in_channels == 1 and btcv.model.mask_ratio == 0.5
    assert (btcv.model.decoder_width, btcv.model.decoder_depth, btcv.model.decoder_heads) == (384, 8, 12)
    brats = config_loading.load_config(str(REPO / "configs/brats_mae3d.py:roi=96"))
    assert brats.model.in_channels == 4 and brats.model.input_size == (96, 96, 96)


def test_overrides_change_typed_values():
    c = config_loading.config_from_args(str(REPO / "configs/cxr14_mae.py:quick"),
                                        ["optimizer.base_lr=1e-3", "batch_size=16", "model.input_size=(64,64)",
                                         "model.norm_pix_loss=false", "data.name=synthetic2d"])
    assert c.optimizer.base_lr == 1e-3 and c.batch_size == 16 and c.model.input_size == (64, 64)
    assert c.model.norm_pix_loss is False and c.data.name == "synthetic2d"


def test_misspelt_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"optimizer has no field 'base_rl'; did you mean 'base_lr'"):
        config_loading.config_from_args(str(REPO / "configs/cxr14_mae.py:quick"), ["optimizer.base_rl=1e-3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        config_loading.config_from_args(str(REPO / "configs/cxr14_mae.py:quick"), ["batch_size=1.5"])
    with pytest.raises(ConfigError, match="unknown config argument 'quik'"):
        config_loading.load_config(str(REPO / "configs/cxr14_mae.py:quik"))


def test_cli_reports_config_errors_cleanly(tmp_path, capsys):
    code = main(["train", "--config", str(REPO / "configs/cxr14_mae.py:quick"), "--workdir", str(tmp_path),
                 "--config.optimizer.base_rl=1e-3"])
    assert code == 2
    assert "did you mean 'base_lr'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cxr14_mae", "btcv_mae3d", "brats_mae3d"])
@pytest.mark.slow
def test_cli_trains_each_pretraining_config_quick(tmp_path, capsys, name):
    code = main(["train", "--config", str(REPO / f"configs/{name}.py:quick,data=synthetic"),
                 "--workdir", str(tmp_path), "--config.num_train_steps=2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 2 and report["eval"]["eval_loss"] > 0


def test_real_data_without_a_built_data_set_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--config", str(REPO / "configs/btcv_mae3d.py:quick"), "--workdir", str(tmp_path)])
    assert code == 2
    assert "data.data_dir" in capsys.readouterr().err


def test_shipped_config_names_resolve_like_paths():
    by_name = config_loading.load_config("btcv_mae3d:quick,mask_ratio=0.5")
    by_file_name = config_loading.load_config("btcv_mae3d.py:quick,mask_ratio=0.5")
    by_path = config_loading.load_config(str(REPO / "configs/btcv_mae3d.py:quick,mask_ratio=0.5"))
    assert by_name.to_dict() == by_file_name.to_dict() == by_path.to_dict()
    assert "cxr14_mae" in config_loading.shipped_config_names()
    with pytest.raises(ConfigError, match="did you mean btcv_mae3d"):
        config_loading.load_config("btcv_mae:quick")


@pytest.mark.parametrize("arg, message", [
    ("mask_ratio=abc", "config argument :mask_ratio=abc: expected a number"),
    ("epochs=ten", "config argument :epochs=ten: expected a number"),
    ("quick=maybe", "config argument :quick=maybe: expected a boolean"),
])
def test_bad_config_argument_value_is_one_clear_line(tmp_path, capsys, arg, message):
    code = main(["train", "--config", f"cxr14_mae:{arg}", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_space_separated_overrides_and_flagfile(tmp_path):
    from medmae_jax.flag_args import expand_flagfiles, split_overrides
    inner = tmp_path / "inner.flags"
    inner.write_text("--config.model.mask_ratio=0.5\n")
    flags = tmp_path / "run.flags"
    flags.write_text(f"# comment\n// comment too\n--config=cxr14_mae:quick\n--config.batch_size 8\n"
                     f"--flagfile={inner}\n--workdir {tmp_path / 'w'}\n")
    argv = expand_flagfiles(["train", "--flagfile", str(flags), "--config.optimizer.base_lr", "1e-3", "--no-progress"])
    rest, overrides = split_overrides(argv)
    assert rest == ["train", "--config=cxr14_mae:quick", "--workdir", str(tmp_path / "w"), "--no-progress"]
    assert overrides == ["batch_size=8", "model.mask_ratio=0.5", "optimizer.base_lr=1e-3"]
    c = config_loading.config_from_args("cxr14_mae:quick", overrides)
    assert (c.batch_size, c.model.mask_ratio, c.optimizer.base_lr) == (8, 0.5, 1e-3)


def test_flag_convention_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "--flagfile", str(tmp_path / "missing.flags")]) == 2
    assert "--flagfile" in capsys.readouterr().err
    assert main(["train", "--config", "cxr14_mae:quick", "--workdir", str(tmp_path), "--config.batch_size"]) == 2
    err = capsys.readouterr().err
    assert "--config.batch_size: expected a value" in err and len(err.strip().splitlines()) == 1
