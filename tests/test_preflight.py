"""Config checks before the first step: each failure is one ConfigError naming the data set, split and fix."""

import json

import pytest

from medmae_jax import config_base
from medmae_jax.errors import ConfigError
from medmae_jax.train import preflight


def _collection_config(tmp_path, channels=1, classes=3, **info):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "collection.json").write_text(json.dumps({"name": "mine", "num_channels": channels,
                                                                   "num_classes": classes, **info}))
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


def test_roi_must_fit_the_stored_volumes(tmp_path):
    shapes = {"pretrain": {"min": [20, 30, 10], "max": [70, 90, 40]}}
    c = _collection_config(tmp_path, spacing=[1.5, 1.5, 2.0], volume_shapes=shapes)
    c.data.train_split = "pretrain"
    c.model.input_size = (64, 64, 64)  # larger than the largest volume along axis 2, but 40 / 64 of a crop is data
    preflight.check_collection(c)
    c.model.input_size = (128, 128, 64)
    wanted = (r"mine: the ROI model.input_size \(128, 128, 64\) voxels = 192 x 192 x 128 mm at the collection's "
              r"spacing 1.5 x 1.5 x 2 mm is mostly padding: the largest volume of split 'pretrain' is "
              r"\(70, 90, 40\) voxels \(smaller along axis 0, 1, 2\), so at most 24% of a crop holds data; "
              r"use a smaller ROI, e.g. --config.model.input_size='\(64,80,32\)', or rebuild with a finer --spacing")
    with pytest.raises(ConfigError, match=wanted):
        preflight.check_collection(c)
    c.data.train_split = "train"  # no sizes recorded for it: nothing to check here (check_splits names a bad split)
    preflight.check_collection(c)


def test_2d_input_must_fit_the_stored_images(tmp_path):
    c = _collection_config(tmp_path, image_size=32)
    c.data.name = c.data.tfds_name = "image_folder"
    c.model.spatial_dims, c.model.input_size, c.model.patch_size = 2, (32, 32), 8
    preflight.check_collection(c)
    c.model.input_size = (64, 64)
    with pytest.raises(ConfigError, match=r"mine: model.input_size \(64, 64\) is larger than the stored images "
                                          r"\(32x32, build images --image-size\); rebuild with --image-size 64"):
        preflight.check_collection(c)


def _write_info(root, name, **info):
    (root / name).mkdir()
    (root / name / "collection.json").write_text(json.dumps({"name": name, **info}))


def test_generic_configs_read_counts_and_refuse_unlabeled_collections(tmp_path):
    from medmae_jax import config_loading
    _write_info(tmp_path, "mr", num_channels=4, num_classes=3, class_names=["background", "edema", "tumour"])
    _write_info(tmp_path, "scans", num_channels=1, num_classes=0, class_names=[])
    _write_info(tmp_path, "xr", num_channels=1, num_classes=0, class_names=[], image_size=64)
    c = config_loading.config_from_args(f"nifti_unetr:quick,dataset=mr,data_dir={tmp_path}", [])
    assert (c.model.in_channels, c.segmentation.num_classes, tuple(c.segmentation.class_names)) == (
        4, 3, ("edema", "tumour"))
    assert config_loading.config_from_args(f"nifti_mae3d:quick,dataset=mr,data_dir={tmp_path}", []).model.in_channels \
        == 4
    with pytest.raises(ConfigError, match=r"scans: the collection has no labeled case \(num_classes 0\); UNETR needs"):
        config_loading.config_from_args(f"nifti_unetr:quick,dataset=scans,data_dir={tmp_path}", [])
    with pytest.raises(ConfigError, match=r"xr: no labels were built; rebuild with --labels labels.csv"):
        config_loading.config_from_args(f"images_finetune:quick,dataset=xr,data_dir={tmp_path}", [])
    assert config_loading.config_from_args(f"images_mae:quick,dataset=xr,data_dir={tmp_path}", []).data.image_size \
        == (64, 64)
