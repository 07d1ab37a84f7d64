"""Config checks before the first step: each failure is one ConfigError naming the data set, split and fix."""

import json

import pytest

from medmae_jax import config_base
from medmae_jax.errors import ConfigError
from medmae_jax.train import preflight


def _collection_config(tmp_path, channels=1, classes=3):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "collection.json").write_text(json.dumps({"name": "mine", "num_channels": channels,
                                                                   "num_classes": classes}))
    c = config_base.base_config()
    c.data.name = c.data.tfds_name = "nifti_collection"
    c.data.data_dir = str(tmp_path / "mine")
    c.model.spatial_dims, c.model.input_size, c.model.patch_size = 3, (32, 32, 32), 16
    return c


def test_batch_must_divide_the_mesh():
    c = config_base.base_config()
    c.batch_size = 6
    preflight.check_mesh(c, 3)
    with pytest.raises(ConfigError, match="batch_size 6 does not divide over 4 devices"):
        preflight.check_mesh(c, 4)


def test_roi_must_be_a_multiple_of_the_patch():
    c = config_base.base_config()
    c.model.input_size, c.model.patch_size = (96, 100), 16
    with pytest.raises(ConfigError, match=r"input_size \(96, 100\) is not a multiple of model.patch_size 16"):
        preflight.check_roi(c)


def test_channel_count_must_match_the_collection(tmp_path):
    c = _collection_config(tmp_path, channels=4)
    with pytest.raises(ConfigError, match=r"mine: the data set has 4 channel\(s\).*model.in_channels is 1"):
        preflight.check_collection(c)


def test_missing_split_is_named_before_training(tmp_path):
    c = _collection_config(tmp_path)
    c.data.train_split = "pretrain"
    wanted = r"nifti_collection in .*mine: split 'pretrain' \(data.train_split\) cannot be opened"
    with pytest.raises(ConfigError, match=wanted):
        preflight.check_splits(c)
